"""model.py: parameter count, shapes at odd sizes, strict loading of Meta-format weight files (DINOv2, DINOv3), the
position-embedding resize, DINOv3's RoPE (stored periods, train-time rescale) and which weights a run gets."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm.models._builder
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

import model
from model import BACKBONES, build_model, class_scores, count_parameters, load_pretrained, resolve_pretrained

REPO = Path(__file__).resolve().parent.parent


def test_dinov2_s_dpt_has_24_80_m_parameters():
    net = build_model("dpt", "dinov2_s", 19, pretrained=False)
    total, backbone = count_parameters(net), count_parameters(net.backbone)
    assert round(total / 1e6, 2) == 24.80  # docs/models.md: 22.06 M backbone + 2.74 M head
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
    loaded = vit.state_dict()
    assert set(loaded) == set(sd) - {"mask_token"}  # every tensor of the file but the pretraining token
    assert all(torch.equal(loaded[key], sd[key]) for key in loaded)  # bit-exact, nothing resampled

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


def _dinov2_problem_files():
    """(name, change to a correct Meta-format ViT-S file of depth 1, words the error must contain)."""
    def patch16(sd):
        sd["patch_embed.proj.weight"] = torch.randn(384, 3, 16, 16)

    def grid32(sd):  # a 32×32 position grid (448 px) instead of Meta's 37×37
        sd["pos_embed"] = torch.randn(1, 1 + 32 * 32, 384)

    def mlp_width(sd):
        sd["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.fc1.bias"] = torch.randn(1024, 384), torch.randn(1024)
        sd["blocks.0.mlp.fc2.weight"] = torch.randn(384, 1024)

    def missing(sd):
        del sd["blocks.0.ls1.gamma"]

    def extra(sd):
        sd["head.weight"] = torch.randn(1000, 384)

    def registers(sd):  # Meta's dinov2_vits14_reg4_pretrain.pth adds this key
        sd["register_tokens"] = torch.randn(1, 4, 384)

    def other_size(sd):  # a ViT-B file
        sd.clear()
        sd.update(_meta_dinov2_state_dict(768, depth=1))

    return [
        ("patch16", patch16, ["patch_embed.proj.weight", "(384, 3, 16, 16)", "(384, 3, 14, 14)", "patch-16"]),
        ("grid32", grid32, ["pos_embed", "(1, 1025, 384)", "(1, 1370, 384)", "32×32"]),
        ("mlp_width", mlp_width, ["blocks.0.mlp.fc1.weight", "(1024, 384)", "(1536, 384)", "MLP width 1024"]),
        ("missing", missing, ["blocks.0.ls1.gamma is missing", "(384,)", "partial"]),
        ("extra", extra, ["head.weight", "(1000, 384)", "no such key"]),
        ("registers", registers, ["register_tokens", "(1, 4, 384)", "register-token variant"]),
        ("other_size", other_size, ["cls_token", "(1, 1, 768)", "(1, 1, 384)", "ViT-B"]),
    ]


@pytest.mark.parametrize("name, change, words", _dinov2_problem_files(), ids=[c[0] for c in _dinov2_problem_files()])
def test_dinov2_file_that_does_not_fit_is_a_one_line_error(tmp_path, no_downloads, name, change, words):
    # timm's checkpoint filter used to resample a patch-16 kernel and a 32×32 grid silently; nothing is resampled now
    sd = _meta_dinov2_state_dict(384, depth=1)
    change(sd)
    path = tmp_path / f"{name}.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as error:
        load_pretrained("dinov2_s", path, depth=1)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "dinov2_vits14_pretrain.pth" in message
    for word in words:
        assert word in message


def test_unreadable_weight_files_are_one_line_errors(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(_meta_dinov2_state_dict(384, depth=1), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a download cut in the middle
    with pytest.raises(ValueError, match=r"cut\.pth cannot be read by torch.load .*truncated"):
        load_pretrained("dinov2_s", path, depth=1)
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth holds a list that is not a flat state dict"):
        load_pretrained("dinov2_s", tmp_path / "list.pth", depth=1)
    with pytest.raises(ValueError, match="not a file"):
        load_pretrained("dinov2_s", tmp_path / "missing.pth")


def test_model_cli_refuses_a_file_that_does_not_fit_in_one_line(tmp_path):
    vit = timm.create_model("vit_small_patch14_dinov2", num_classes=0)  # the full ViT-S, Meta's naming
    sd = dict(vit.state_dict(), mask_token=torch.zeros(1, 384))
    sd["patch_embed.proj.weight"] = torch.zeros(384, 3, 16, 16)
    torch.save(sd, tmp_path / "p16.pth")
    result = subprocess.run([sys.executable, "model.py", "--backbone", "dinov2_s", "--pretrained",
                             str(tmp_path / "p16.pth")], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "p16.pth" in lines[0] and "patch-16" in lines[0] and "Traceback" not in result.stderr


# ---- DINOv3: Meta's file format, RoPE periods, qkv bias mask, train-time RoPE rescale

def _meta_dinov3_state_dict(dim: int, depth: int, heads: int, seed: int = 0) -> dict:
    """A state dict with the key names of Meta's dinov3_vit*16_pretrain_lvd1689m-*.pth (random values): 4 storage
    (register) tokens, RoPE periods stored in bf16, a qkv bias with its q 1 / k 0 / v 1 mask."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    head = dim // heads
    # Meta's rule with base 100, stored in bf16 as its training leaves it (timm recomputes it in float32)
    periods = (100.0 ** (2 * torch.arange(head // 4, dtype=torch.float32) / (head // 2))).to(torch.bfloat16)
    sd = {"cls_token": r(1, 1, dim), "storage_tokens": r(1, 4, dim), "mask_token": r(1, dim),
          "rope_embed.periods": periods, "patch_embed.proj.weight": r(dim, 3, 16, 16),
          "patch_embed.proj.bias": r(dim), "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
            b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
            b + "attn.qkv.bias_mask": torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)]),
            b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim), b + "ls1.gamma": r(dim),
            b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
            b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
            b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim), b + "ls2.gamma": r(dim),
        })
    return sd


DINOV3_TINY = dict(depth=2, embed_dim=48, num_heads=2)  # DINOv3-S's structure at a CPU-test size: head width 24


def test_meta_dinov3_file_loads_every_tensor_and_its_rope_periods(tmp_path, no_downloads):
    sd = _meta_dinov3_state_dict(48, depth=2, heads=2)
    for i in range(2):  # attention sharp enough and weighted enough for positions to show in the features
        sd[f"blocks.{i}.attn.qkv.weight"] *= 50
        sd[f"blocks.{i}.ls1.gamma"] = torch.ones(48)
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(sd, path)
    vit = load_pretrained("dinov3_s", path, **DINOV3_TINY).eval()
    D = 48
    assert torch.equal(vit.cls_token, sd["cls_token"]) and torch.equal(vit.reg_token, sd["storage_tokens"])
    for i in range(2):
        b, block = f"blocks.{i}.", vit.blocks[i]
        assert torch.equal(block.gamma_1, sd[b + "ls1.gamma"]) and torch.equal(block.gamma_2, sd[b + "ls2.gamma"])
        assert torch.equal(block.attn.qkv.weight, sd[b + "attn.qkv.weight"])
        assert torch.equal(block.attn.q_bias, sd[b + "attn.qkv.bias"][:D])
        assert torch.equal(block.attn.v_bias, sd[b + "attn.qkv.bias"][2 * D:])
        assert torch.equal(block.mlp.fc2.weight, sd[b + "mlp.fc2.weight"])
    # the file's bf16-rounded periods, not timm's float32 recomputation: Meta's code runs the stored ones
    computed = vit.rope._compute_periods()
    assert torch.equal(vit.rope.periods, sd["rope_embed.periods"].float())
    assert not torch.equal(vit.rope.periods, computed)
    assert torch.equal(vit.state_dict()["rope.periods"], vit.rope.periods)  # saved with train.py's checkpoints
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        stored = vit.forward_intermediates(images, indices=[1], intermediates_only=True)[0]
        vit.rope.periods.copy_(computed)
        recomputed = vit.forward_intermediates(images, indices=[1], intermediates_only=True)[0]
    assert (stored - recomputed).abs().max() > 1e-5  # the periods reach the features


def test_correct_files_convert_as_timms_own_filters_do(tmp_path):
    # timm's checkpoint filters (which resample what does not fit) as the reference on files that fit: same tensors
    from timm.models import eva, vision_transformer
    cases = [("dinov2_s", _meta_dinov2_state_dict(384, depth=2), dict(depth=2), vision_transformer),
             ("dinov3_s", _meta_dinov3_state_dict(48, depth=2, heads=2), DINOV3_TINY, eva)]
    for backbone, sd, overrides, module in cases:
        torch.save(sd, tmp_path / f"{backbone}.pth")
        ours = load_pretrained(backbone, tmp_path / f"{backbone}.pth", **overrides).state_dict()
        reference = model._create_vit(BACKBONES[backbone], **overrides)
        result = reference.load_state_dict(module.checkpoint_filter_fn(dict(sd), reference), strict=False)
        assert result.unexpected_keys == [] and set(result.missing_keys) <= {"rope.periods"}
        expected = reference.state_dict()
        assert set(ours) == set(expected)
        for key in ours:
            if key != "rope.periods":  # timm drops the stored periods (tested above)
                assert torch.equal(ours[key], expected[key]), key


def test_dinov3_file_that_does_not_fit_is_a_one_line_error(tmp_path, no_downloads):
    sd = _meta_dinov3_state_dict(48, depth=2, heads=2)
    sd["blocks.1.attn.qkv.bias_mask"] = torch.ones(3 * 48)  # a key bias Meta's released models do not use
    torch.save(sd, tmp_path / "k_bias.pth")
    with pytest.raises(ValueError) as error:
        load_pretrained("dinov3_s", tmp_path / "k_bias.pth", **DINOV3_TINY)
    message = str(error.value)
    assert "\n" not in message and "k_bias.pth" in message and "dinov3_vits16_pretrain" in message
    assert "blocks.1.attn.qkv.bias_mask is q 1 / k 1 / v 1, expected Meta's q 1 / k 0 / v 1" in message

    sd = _meta_dinov3_state_dict(48, depth=2, heads=2)
    sd["patch_embed.proj.weight"] = torch.randn(48, 3, 14, 14)
    torch.save(sd, tmp_path / "p14.pth")
    with pytest.raises(ValueError, match=r"p14\.pth .*\(48, 3, 14, 14\), expected \(48, 3, 16, 16\).*patch-14"):
        load_pretrained("dinov3_s", tmp_path / "p14.pth", **DINOV3_TINY)
    torch.save(_meta_dinov2_state_dict(48, depth=2), tmp_path / "v2.pth")
    with pytest.raises(ValueError, match=r"v2\.pth .*a DINOv2 file"):
        load_pretrained("dinov3_s", tmp_path / "v2.pth", **DINOV3_TINY)


def _meta_rope(h: int, w: int, periods: torch.Tensor, scale: float) -> torch.Tensor:
    """Meta's DINOv3 RoPE for an h × w grid with coordinates rescaled by scale: (h*w, 2d) = [sin, cos], d = 4P."""
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h * 2 - 1  # centred, normalised per side, in [-1, 1]
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2) * scale  # (h*w, 2)
    angles = 2 * math.pi * coords[:, :, None] / periods.double()  # (h*w, 2, P)
    angles = angles.flatten(1).tile(2)  # (h*w, 4P)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def _block_ropes(vit, images) -> list[torch.Tensor]:
    """The RoPE embedding each block received in one forward."""
    seen = []
    hooks = [block.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["rope"].clone()),
                                             with_kwargs=True) for block in vit.blocks]
    with torch.no_grad():
        out = vit.forward_intermediates(images, indices=[len(vit.blocks) - 1], intermediates_only=True)[0]
    for hook in hooks:
        hook.remove()
    return seen, out


def _rope_scale(rope: torch.Tensor, h: int, w: int, periods: torch.Tensor) -> float:
    """The coordinate factor of an embedding, read from the slowest y rotation of the first token (|angle| < π)."""
    P = periods.numel()
    d = 4 * P
    angle = math.atan2(rope[0, P - 1].item(), rope[0, d + P - 1].item())
    return angle / (2 * math.pi * ((0.5 / h) * 2 - 1) / periods[-1].item())


def test_dinov3_rope_rescale_is_drawn_per_block_in_train_mode_and_off_in_eval():
    torch.manual_seed(0)
    spec = BACKBONES["dinov3_s"]
    vit = model._create_vit(spec, depth=3, embed_dim=48, num_heads=2)  # default: Meta's R = 2
    plain = model._create_vit(spec, rope_rescale=None, depth=3, embed_dim=48, num_heads=2)
    plain.load_state_dict(vit.state_dict())
    periods = vit.rope.periods
    images = torch.randn(2, 3, 64, 96)  # 4 × 6 patches
    h, w = 4, 6

    vit.train()
    first, out_1 = _block_ropes(vit, images)
    second, out_2 = _block_ropes(vit, images)
    scales = [_rope_scale(rope, h, w, periods) for rope in first + second]
    for rope, scale in zip(first + second, scales):
        assert 0.5 - 1e-4 <= scale <= 2 + 1e-4  # log-uniform in [1/2, 2]
        torch.testing.assert_close(rope, _meta_rope(h, w, periods, scale), rtol=0, atol=1e-4)
    assert len(set(round(s, 4) for s in scales)) == 6  # every block of every forward draws its own factor
    assert not torch.equal(out_1, out_2)

    vit.eval()
    ropes, out_eval = _block_ropes(vit, images)
    for rope in ropes:
        torch.testing.assert_close(rope, _meta_rope(h, w, periods, 1.0), rtol=0, atol=1e-5)
    _, again = _block_ropes(vit, images)
    plain.eval()
    _, out_plain = _block_ropes(plain, images)
    assert torch.equal(out_eval, again) and torch.equal(out_eval, out_plain)  # eval: timm's forward, unrescaled
    plain.train()  # rope_rescale=None: no rescale in train mode either (no dropout here): the eval output
    _, out_plain_train = _block_ropes(plain, images)
    assert torch.equal(out_plain_train, out_eval)


def test_dinov3_dpt_student_rescales_and_its_eval_copy_does_not():
    net = build_model("dpt", "dinov3_s", 3, pretrained=False)  # full DINOv3-S, R = 2 by default
    teacher = copy.deepcopy(net).eval()  # train.py's EMA teacher: a deep copy in eval mode
    assert teacher.backbone.forward_intermediates.__self__ is teacher.backbone  # bound to the copy, not the student
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(images), teacher(images))
        net.train()
        assert not torch.equal(net(images), net(images))
    off = build_model("dpt", "dinov3_s", 3, pretrained="none", rope_rescale=None)
    assert "forward_intermediates" not in vars(off.backbone)  # timm's own forward


# ---- which weights: official file, explicit file, or random init on purpose

def test_default_weights_are_the_official_file_under_pretrained(tmp_path, monkeypatch):
    monkeypatch.setattr(model, "PRETRAINED_DIR", tmp_path)
    assert resolve_pretrained("dinov2_s") is None  # absent: random init, for callers that say so (model.py's CLI)
    for required in [dict(required=True), dict(pretrained=True)]:  # asked for: must exist
        with pytest.raises(ValueError) as error:
            resolve_pretrained("dinov2_s", **required)
        message = str(error.value)
        assert "\n" not in message and str(tmp_path / "dinov2_vits14_pretrain.pth") in message
        assert "github.com/facebookresearch/dinov2" in message and "--pretrained none" in message
    with pytest.raises(ValueError, match=r"dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd\.pth .*facebookresearch/dinov3"):
        resolve_pretrained("dinov3_l", required=True)
    assert resolve_pretrained("dinov2_s", "none", required=True) is None  # random init on purpose
    assert resolve_pretrained("toy", required=True) == tmp_path / model.TOY_WEIGHTS  # made on first use
    (tmp_path / "dinov2_vits14_pretrain.pth").write_bytes(b"")
    assert resolve_pretrained("dinov2_s", required=True) == tmp_path / "dinov2_vits14_pretrain.pth"
    assert resolve_pretrained("dinov2_s", False) is None
    assert resolve_pretrained("dinov2_s", "none") is None and resolve_pretrained("dinov2_s", "None") is None
    with pytest.raises(ValueError, match="elsewhere.pth is not a file"):
        resolve_pretrained("dinov2_s", tmp_path / "elsewhere.pth")
    assert BACKBONES["dinov3_l"].weights.startswith("dinov3_vitl16_pretrain")


@pytest.mark.parametrize("dataset, arch, file", [("cityscapes", "dpt", "dinov2_vits14_pretrain.pth"),
                                                 ("ade20k", "mask2former", "dinov3_vitl16_pretrain")])
def test_real_dataset_run_without_official_weights_stops_before_any_work(tmp_path, monkeypatch, dataset, arch, file):
    import data
    import train
    monkeypatch.setattr(model, "PRETRAINED_DIR", tmp_path / "pretrained")
    flags = ["--dataset", dataset, "--arch", arch, "--data-root", str(tmp_path / "nowhere"),
             "--out", str(tmp_path / "run"), "--device", "cpu"]
    with pytest.raises(ValueError) as error:  # before the dataset is even looked at (it does not exist)
        train.main(flags)
    assert "\n" not in str(error.value) and file in str(error.value) and "--pretrained none" in str(error.value)
    with pytest.raises(data.DataError):  # random init on purpose: past the weights, stopped by the missing data
        train.main(flags + ["--pretrained", "none"])
    assert not (tmp_path / "run").exists()


def test_toy_backbone_is_pretrained_on_first_use_and_loaded_like_meta_files(tmp_path, monkeypatch):
    monkeypatch.setattr(model, "PRETRAINED_DIR", tmp_path)
    made = []
    real = model.pretrain_toy_backbone

    def tiny(path, **_):  # the real entry point, on a two-step budget
        made.append(path)
        return real(path, steps=2, batch=2, size=32, progress=False)

    monkeypatch.setattr(model, "pretrain_toy_backbone", tiny)
    path = tmp_path / model.TOY_WEIGHTS
    assert resolve_pretrained("toy") == path and made == [] and not path.exists()  # resolving makes nothing
    net = build_model("dpt", "toy", 7)
    assert made == [path] and path.is_file() and net.pretrained_file == str(path)
    assert build_model("dpt", "toy", 7).pretrained_file == str(path) and len(made) == 1  # made once, then found
    weights = torch.load(path, map_location="cpu", weights_only=True)
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


def test_shipped_toy_weights_match_their_record_and_the_documented_recipe():
    path = REPO / "pretrained" / model.TOY_WEIGHTS
    record = json.loads(path.with_suffix(".json").read_text())
    assert path.stat().st_size <= 5 * 2**20 and record["bytes"] == path.stat().st_size
    assert record["sha256"] == model.sha256_file(path)
    assert record["recipe"] == model.TOY_PRETRAIN  # made by the recipe model.py documents, all of it
    model.check_toy_weights(path)
    vit = load_pretrained("toy", path)  # loads strictly into the toy backbone
    assert torch.equal(vit.state_dict()["blocks.3.mlp.fc2.weight"],
                       torch.load(path, map_location="cpu", weights_only=True)["blocks.3.mlp.fc2.weight"])


def test_remake_command_writes_weights_and_record_that_load(tmp_path, monkeypatch, capsys):
    # `python model.py --remake-toy`, in process, on a two-step recipe: the pair it writes passes the check and loads
    monkeypatch.setattr(model, "PRETRAINED_DIR", tmp_path)
    monkeypatch.setattr(model, "TOY_PRETRAIN", {**model.TOY_PRETRAIN, "steps": 2, "batch": 2, "size": 32})
    model.main(["--remake-toy"])
    path = tmp_path / model.TOY_WEIGHTS
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["recipe"] == model.TOY_PRETRAIN and record["sha256"] == model.sha256_file(path)
    assert f"SHA-256 {record['sha256']}" in capsys.readouterr().out
    assert build_model("dpt", "toy", 7).pretrained_file == str(path)
    assert not list(tmp_path.glob("*.tmp"))  # both written atomically


def test_toy_weights_unlike_their_record_are_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(model, "PRETRAINED_DIR", tmp_path)
    path = model.pretrain_toy_backbone(tmp_path / model.TOY_WEIGHTS, steps=2, batch=2, size=32, progress=False)
    build_model("dpt", "toy", 7)  # as written: fine
    path.write_bytes(path.read_bytes()[:-10])  # a truncated copy
    with pytest.raises(ValueError, match=r"SHA-256 .* is not the .* of its record") as error:
        build_model("dpt", "toy", 7)
    assert "\n" not in str(error.value) and "--remake-toy" in str(error.value)
    path.with_suffix(".json").unlink()
    with pytest.raises(ValueError, match="no readable record"):
        build_model("dpt", "toy", 7)
    mine = tmp_path / "mine" / "toy.pth"
    mine.parent.mkdir()
    mine.write_bytes(model.pretrain_toy_backbone(tmp_path / "fresh.pth", steps=2, batch=2, size=32,
                                                 progress=False).read_bytes())
    build_model("dpt", "toy", 7, pretrained=mine)  # a user's own file elsewhere: not checked against a record


def test_toy_dpt_logits_at_half_the_crop_and_real_dpt_as_the_paper(toy):
    # The toy head's last fusion stage does not upsample (stride p/4 = 2, near DINOv2's 8/14 of the crop); every real
    # backbone keeps the DPT paper's ×2 (stride p/8).
    with torch.no_grad():
        tokens = toy.backbone.forward_intermediates(torch.randn(1, 3, 64, 64), indices=toy.taps, norm=True,
                                                    output_fmt="NCHW", intermediates_only=True)
        assert toy.head(tokens).shape[-2:] == (32, 32)
    assert all(spec.final_upsample == 2 for name, spec in BACKBONES.items() if name != "toy")
    real = model.DPTHead(embed_dim=32, features=8, out_channels=(8, 8, 8, 8), num_classes=3)
    assert real(4 * [torch.randn(1, 32, 4, 4)]).shape == (1, 3, 32, 32)  # 8h × 8w


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
