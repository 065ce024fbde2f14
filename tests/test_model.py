"""model.py: parameter count, shapes at odd sizes, Meta-format weight loading and position-embedding resize."""
import math

import pytest
import timm.models._builder
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

import model
from model import BACKBONES, build_model, class_scores, count_parameters, load_pretrained, resolve_pretrained


def test_dinov2_s_dpt_has_24_80_m_parameters():
    net = build_model("dpt", "dinov2_s", 19, pretrained=False)
    total, backbone = count_parameters(net), count_parameters(net.backbone)
    assert round(total / 1e6, 2) == 24.80  # README "Models": 22.06 M backbone + 2.74 M head
    assert round(backbone / 1e6, 2) == 22.06
    assert net.pretrained_file is None


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return build_model("dpt", "toy", 5).eval()


def test_toy_dpt_logits_at_input_size(toy):
    assert (toy.arch, toy.patch_size, toy.num_classes) == ("dpt", 8, 5)
    for size in [(24, 24), (24, 32), (8, 40)]:  # shapes shared with other tests: CPU kernels are set up per shape
        with torch.no_grad():
            logits = toy(torch.randn(1, 3, *size))
        assert logits.shape == (1, 5, *size)
        assert torch.isfinite(logits).all()


def test_dinov3_dpt_runs_non_square():
    # DINOv3-S's own depth and taps at a reduced width (the structure under test: RoPE, 4 register tokens)
    spec = BACKBONES["dinov3_s"]
    net = model.DPT(model._create_vit(spec, None, embed_dim=48, num_heads=2), spec, 7).eval()
    assert net.patch_size == 16 and len(net.backbone.blocks) == 12
    with torch.no_grad():
        logits = net(torch.randn(1, 3, 32, 48))
    assert logits.shape == (1, 7, 32, 48)


def test_size_not_multiple_of_patch_is_a_clear_error(toy):
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        toy(torch.randn(1, 3, 100, 96))


def test_every_parameter_gets_a_gradient():
    # DDP without find_unused_parameters needs this (the fusion at path_4 uses both residual units)
    net = build_model("dpt", "toy", 4)
    net(torch.randn(1, 3, 24, 32)).square().mean().backward()
    unused = [name for name, p in net.named_parameters() if p.grad is None]
    assert unused == []


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="--arch"):
        build_model("segformer", "toy", 3)
    with pytest.raises(ValueError, match="--backbone"):
        build_model("dpt", "dinov2_xl", 3)
    with pytest.raises(ValueError, match="anything.pth is not a file"):
        build_model("dpt", "toy", 3, pretrained="anything.pth")


def _meta_dinov2_state_dict(dim: int, depth: int, seed: int = 0) -> dict:
    """A state dict with the key names and shapes of Meta's dinov2_vit*14_pretrain.pth (random values)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + 37 * 37, dim), "mask_token": r(1, dim),
          "patch_embed.proj.weight": r(dim, 3, 14, 14), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
            b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim), b + "ls1.gamma": r(dim),
            b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
            b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
            b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim), b + "ls2.gamma": r(dim),
        })
    return sd


@pytest.fixture
def no_downloads(monkeypatch):
    """Make every remote source of timm's loader fail loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to download weights")
    for name in ("download_cached_file", "load_state_dict_from_url", "load_state_dict_from_hf", "load_custom_from_hf"):
        monkeypatch.setattr(timm.models._builder, name, refuse)


def test_meta_dinov2_file_loads_strictly_and_resizes_like_meta(tmp_path, no_downloads):
    dim = 384  # ViT-S width; depth 1 keeps the test fast (the file and the model are truncated alike)
    sd = _meta_dinov2_state_dict(dim, depth=1)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    vit = load_pretrained("dinov2_s", path, depth=1)
    assert torch.equal(vit.pos_embed, sd["pos_embed"])
    assert torch.equal(vit.blocks[0].ls1.gamma, sd["blocks.0.ls1.gamma"])
    assert torch.equal(vit.blocks[0].mlp.fc2.weight, sd["blocks.0.mlp.fc2.weight"])

    # 798 × 798 -> 57 × 57 patches; zero patch tokens expose the added position embeddings
    with torch.no_grad():
        tokens = vit._pos_embed(torch.zeros(1, 57, 57, dim))  # (1, 1 + 57*57, D)
    grid = sd["pos_embed"][:, 1:].reshape(1, 37, 37, dim).permute(0, 3, 1, 2)
    scale = (57 + 0.1) / 37  # Meta: scale factor (h + 0.1) / M, bicubic, no antialias
    expected = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 57 * 57, dim)
    torch.testing.assert_close(tokens[:, 1:], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens[:, 0], sd["cls_token"][:, 0] + sd["pos_embed"][:, 0], rtol=0, atol=0)
    # timm's own rule (size-based, antialiased) gives visibly different embeddings: the override matters
    timm_rule = resample_abs_pos_embed(sd["pos_embed"], (57, 57), (37, 37), num_prefix_tokens=1)[:, 1:]
    assert (timm_rule - expected).abs().max() > 1e-3
    # at the stored 37 × 37 grid (518 px) the embeddings are used unchanged, as in Meta's code
    with torch.no_grad():
        tokens = vit._pos_embed(torch.zeros(1, 37, 37, dim))
    assert torch.equal(tokens[:, 1:], sd["pos_embed"][:, 1:])


def test_meta_file_that_does_not_match_is_a_one_line_error(tmp_path, no_downloads):
    sd = _meta_dinov2_state_dict(384, depth=1)
    del sd["blocks.0.ls1.gamma"]
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as error:
        load_pretrained("dinov2_s", path, depth=1)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "blocks.0.ls1.gamma" in message
    with pytest.raises(ValueError, match="not a file"):
        load_pretrained("dinov2_s", tmp_path / "missing.pth")


def test_default_weights_are_the_official_file_under_pretrained(tmp_path, monkeypatch):
    monkeypatch.setattr(model, "PRETRAINED_DIR", tmp_path)
    assert resolve_pretrained("dinov2_s") is None  # absent: random init
    with pytest.raises(ValueError, match="dinov2_vits14_pretrain.pth"):
        resolve_pretrained("dinov2_s", True)  # asked for: must exist
    (tmp_path / "dinov2_vits14_pretrain.pth").write_bytes(b"")
    assert resolve_pretrained("dinov2_s") == tmp_path / "dinov2_vits14_pretrain.pth"
    assert resolve_pretrained("dinov2_s", False) is None
    assert resolve_pretrained("dinov2_s", "none") is None and resolve_pretrained("dinov2_s", "None") is None
    assert BACKBONES["dinov3_l"].weights.startswith("dinov3_vitl16_pretrain")


def test_toy_backbone_is_pretrained_on_first_use_and_loaded_like_meta_files(tmp_path, monkeypatch):
    monkeypatch.setattr(model, "PRETRAINED_DIR", tmp_path)
    made = []
    real = model.pretrain_toy_backbone

    def tiny(path, **_):  # the real entry point, on a two-step budget
        made.append(path)
        return real(path, steps=2, batch=2, size=32, progress=False)

    monkeypatch.setattr(model, "pretrain_toy_backbone", tiny)
    path = tmp_path / model.TOY_WEIGHTS
    assert resolve_pretrained("toy") == path and made == [path] and path.is_file()
    assert resolve_pretrained("toy") == path and len(made) == 1  # made once, then found
    weights = torch.load(path, map_location="cpu", weights_only=True)
    net = build_model("dpt", "toy", 7)
    assert net.pretrained_file == str(path)
    assert all(torch.equal(weights[key], value) for key, value in net.backbone.state_dict().items())
    random = build_model("dpt", "toy", 7, pretrained="none")
    assert random.pretrained_file is None
    assert not torch.equal(random.backbone.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"])
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_pretraining_is_deterministic_and_learns(tmp_path):
    first = model.pretrain_toy_backbone(tmp_path / "a.pth", steps=2, batch=2, size=32, progress=False)
    again = model.pretrain_toy_backbone(tmp_path / "b.pth", steps=2, batch=2, size=32, progress=False)
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (first, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untrained = build_model("dpt", "toy", 7, pretrained="none").backbone.state_dict()
    assert any(not torch.equal(a[k], untrained[k]) for k in a)


def test_class_scores_dpt_are_the_logits(toy):
    images = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(class_scores(toy, images), toy(images))


class _FixedQueries(nn.Module):
    """Mask2Former-shaped outputs from fixed tensors (the contract's output dict)."""
    arch = "mask2former"
    patch_size = 8

    def __init__(self, pred_logits, pred_masks):
        super().__init__()
        self.pred_logits, self.pred_masks = pred_logits, pred_masks

    def forward(self, images):
        return dict(pred_logits=self.pred_logits, pred_masks=self.pred_masks, aux_outputs=[])


def test_class_scores_mask2former_sum_over_queries():
    torch.manual_seed(0)
    B, Q, K = 2, 3, 4
    pred_logits, pred_masks = torch.randn(B, Q, K + 1), torch.randn(B, Q, 4, 6)
    scores = class_scores(_FixedQueries(pred_logits, pred_masks), torch.zeros(B, 3, 16, 24))
    assert scores.shape == (B, K, 16, 24)
    masks = F.interpolate(pred_masks.sigmoid(), size=(16, 24), mode="bilinear", align_corners=False)  # sigmoid first
    b, k, y, x = 1, 2, 5, 7
    expected = sum(pred_logits[b, q].softmax(0)[k] * masks[b, q, y, x] for q in range(Q))
    assert math.isclose(scores[b, k, y, x].item(), expected.item(), rel_tol=1e-5)
    assert scores.sum(1).max() < Q  # "no object" probability is left out
