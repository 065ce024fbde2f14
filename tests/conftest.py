"""Shared test setup: the toy backbone's weight file.

The toy ViT's real weight file (pretrained/toy_vit_pretrain.pth) takes a few CPU minutes to make on first use. Tests
get a stand-in made once per session by the same function on a two-step budget, in a temporary folder that
model.PRETRAINED_DIR points to, so no test trains the real one or depends on it being there.
"""
from pathlib import Path

import pytest

import model


@pytest.fixture(scope="session", autouse=True)
def toy_weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pretrained")
    path = model.pretrain_toy_backbone(folder / model.TOY_WEIGHTS, steps=2, batch=2, size=32, progress=False)
    patch = pytest.MonkeyPatch()
    patch.setattr(model, "PRETRAINED_DIR", folder)
    yield path
    patch.undo()
