"""Segmentation models: ViT backbones (timm DINOv2 / DINOv3, a tiny toy ViT), the DPT head, official weights.

Paper: SENSE, "unified support for pixel-based and query-based segmenters" (DINOv2 + DPT, Mask2Former);
DPT head from Ranftl et al., "Vision Transformers for Dense Prediction" (ICCV 2021), Fig. 1;
docs/models.md. Everything asks for a backbone by its name in `BACKBONES`; eval.py and quality.py rebuild
a model from the name stored in a checkpoint.

    python model.py                                   # toy ViT + DPT on CPU: parameters, one forward
    python model.py --backbone dinov2_s --size 518    # DINOv2-S DPT, K = 19: 24.80 M parameters
    python model.py --backbone dinov2_l --pretrained pretrained/dinov2_vitl14_pretrain.pth
    python model.py --remake-toy                      # pretrain the toy ViT anew (its shipped file; CPU minutes)

Official weights are Meta's own files, read from a local path (nothing is ever downloaded):
`pretrained/dinov2_vit{s,b,l,g}14_pretrain.pth`, `pretrained/dinov3_vit{s,b,l}16_pretrain_lvd1689m-*.pth`.
Every tensor of a file must have exactly the backbone's shape (nothing is resampled; otherwise a one-line error
says which key and what the file probably is). Without the official file this script builds a random-init model
and says so; train.py refuses a real-dataset run without it (`--pretrained none`: random init on purpose).
DINOv3 runs as Meta's code does: the RoPE periods stored in the file, and in train mode a RoPE coordinate rescale
drawn for every block (ROPE_RESCALE).

Shapes: B batch, K classes, H×W image pixels, h×w patch grid (H/p × W/p, p = patch size),
D backbone width, F fusion width, O_i reassemble width of level i, Q queries.
"""
import argparse
import hashlib
import json
import math
import os
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import timm
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

import data

# Where the official weight files are looked for when no path is given (next to this file).
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
# Meta's DINOv2 position-embedding resize: scale factor (h + 0.1) / M with the stored M×M grid, bicubic,
# no antialias (dinov2/models/vision_transformer.py, interpolate_offset=0.1, interpolate_antialias=False).
META_INTERPOLATE_OFFSET = 0.1
ARCHS = ("dpt", "mask2former")


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone size: the timm model, where the DPT taps it, and the DPT head widths.

    Attributes:
        timm_name: timm model name (its default configuration is Meta's architecture).
        patch_size: ViT patch size p; every input side must be a multiple of it.
        taps: indices of the blocks whose outputs feed the head (4 levels, shallow to deep).
        features: F, the fusion width of the DPT head.
        out_channels: (O_1, O_2, O_3, O_4), reassemble widths of the 4 levels.
        weights: file name of Meta's official pretrained weights (None: no official weights).
        meta_pos_embed: absolute position embeddings resized with Meta's rule (DINOv2 family; DINOv3 uses RoPE).
        timm_kwargs: architecture overrides passed to timm (the toy backbone).
        final_upsample: how much the head's last fusion stage upsamples (2 in the DPT paper: logits at stride p/8;
            1: logits at stride p/4).
    """
    timm_name: str
    patch_size: int
    taps: tuple[int, int, int, int]
    features: int
    out_channels: tuple[int, int, int, int]
    weights: str | None
    meta_pos_embed: bool
    timm_kwargs: dict = field(default_factory=dict)
    final_upsample: int = 2


# Taps and widths: the Depth Anything / UniMatch V2 DPT settings. DINOv3 sizes reuse the DINOv2 settings of the
# same width and depth. The toy ViT is DINOv2's architecture shrunk for a CPU: patch 8, width 128, 4 blocks, every
# block tapped, no LayerScale; its weights come from pretrain_toy_backbone (the toy world's DINOv2). Its DPT head is
# sized for a CPU step too (bench.py train; docs/benchmarks.md): fusion width F = 16, and logits at stride p/4 = 2,
# half the crop, where DINOv2's patch 14 puts the DPT's logits (8/14 of the crop); the paper's stride p/8 would be
# the full crop at patch 8, and F = 32 doubles the head's convolutions (toy study, docs/toy_study.md).
TOY_WEIGHTS = "toy_vit_pretrain.pth"
BACKBONES: dict[str, BackboneSpec] = {
    "toy": BackboneSpec("vit_small_patch14_dinov2", 8, (0, 1, 2, 3), 16, (16, 32, 64, 128), TOY_WEIGHTS, True,
                        dict(patch_size=8, img_size=64, embed_dim=128, depth=4, num_heads=4, init_values=None),
                        final_upsample=1),
    "dinov2_s": BackboneSpec("vit_small_patch14_dinov2", 14, (2, 5, 8, 11), 64, (48, 96, 192, 384),
                             "dinov2_vits14_pretrain.pth", True),
    "dinov2_b": BackboneSpec("vit_base_patch14_dinov2", 14, (2, 5, 8, 11), 128, (96, 192, 384, 768),
                             "dinov2_vitb14_pretrain.pth", True),
    "dinov2_l": BackboneSpec("vit_large_patch14_dinov2", 14, (4, 11, 17, 23), 256, (256, 512, 1024, 1024),
                             "dinov2_vitl14_pretrain.pth", True),
    "dinov2_g": BackboneSpec("vit_giant_patch14_dinov2", 14, (9, 19, 29, 39), 384, (1536, 1536, 1536, 1536),
                             "dinov2_vitg14_pretrain.pth", True),
    "dinov3_s": BackboneSpec("vit_small_patch16_dinov3_qkvb", 16, (2, 5, 8, 11), 64, (48, 96, 192, 384),
                             "dinov3_vits16_pretrain_lvd1689m-08c60483.pth", False),
    "dinov3_b": BackboneSpec("vit_base_patch16_dinov3_qkvb", 16, (2, 5, 8, 11), 128, (96, 192, 384, 768),
                             "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", False),
    "dinov3_l": BackboneSpec("vit_large_patch16_dinov3_qkvb", 16, (4, 11, 17, 23), 256, (256, 512, 1024, 1024),
                             "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", False),
}


# ----------------------------------------------------------------------------------------------------
# Backbones and official weights

# Meta's DINOv3 training (and the reference SENSE code, github.com/zhang0jhon/SENSE) builds the backbone with
# pos_embed_rope_rescale_coords=2: in train mode the RoPE coordinates are multiplied by one factor drawn log-uniformly
# in [1/2, 2], anew for every block on every forward; eval mode never rescales (github.com/facebookresearch/dinov3,
# RopePositionEmbedding). build_model(..., rope_rescale=None) turns it off.
ROPE_RESCALE = 2.0
# Where Meta publishes the official files, by family (the first word of the file name).
META_WEIGHTS_PAGES = {"dinov2": "https://github.com/facebookresearch/dinov2",
                      "dinov3": "https://github.com/facebookresearch/dinov3"}
# Meta's key names -> timm's, the conversions timm 1.0.31's checkpoint filters apply (vision_transformer.py
# _convert_dinov2, eva.py checkpoint_filter_fn); all other keys are named alike. Meta's DINOv2-g has a SwiGLU MLP
# (w12, w3). DINOv3's RoPE periods, which timm drops, keep their role under timm's module name.
DINOV2_KEY_RENAMES = (("mlp.w12.", "mlp.fc1."), ("mlp.w3.", "mlp.fc2."))
DINOV3_KEY_RENAMES = (("storage_tokens", "reg_token"), ("ls1.gamma", "gamma_1"), ("ls2.gamma", "gamma_2"),
                      ("rope_embed.periods", "rope.periods"))
# Model size by ViT width, to say what a file that does not fit probably is.
VIT_SIZES = {192: "ViT-T", 384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H", 1536: "ViT-g", 4096: "ViT-7B"}


def _meta_pos_embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Add class token and position embeddings to patch tokens (B, h, w, D) -> (B, 1 + h*w, D), Meta's resize.

    Replaces timm's VisionTransformer._pos_embed for the DINOv2 family (class token, no register tokens).
    """
    B, h, w, D = x.shape
    pos = self.pos_embed  # (1, 1 + M*M, D): class-token position first, then the M×M grid
    M = math.isqrt(pos.shape[1] - 1)
    pos_cls, pos_grid = pos[:, :1], pos[:, 1:]
    if (h, w) != (M, M):
        # Meta passes a scale factor, not a size: PyTorch then maps coordinates with that factor, which
        # differs slightly from a size-based resize (timm's rule, with antialias). Float32 as in Meta's code.
        grid = pos_grid.float().reshape(1, M, M, D).permute(0, 3, 1, 2)  # (1, D, M, M)
        scale = ((h + META_INTERPOLATE_OFFSET) / M, (w + META_INTERPOLATE_OFFSET) / M)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)  # (1, D, h, w)
        pos_grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, D).to(pos.dtype)
    x = x.reshape(B, h * w, D)
    x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + h*w, D)
    return self.pos_drop(x + torch.cat([pos_cls, pos_grid], dim=1))


def _rope_per_block_intermediates(self: nn.Module, x: torch.Tensor, indices: list[int], norm: bool = False,
                                  output_fmt: str = "NCHW", intermediates_only: bool = False):
    """timm's Eva.forward_intermediates with Meta's RoPE schedule: the embedding is made for every block.

    Replaces forward_intermediates of the DINOv3 backbones (what DPT and Mask2Former call). Meta's ViT calls its RoPE
    module once per block, so in train mode every block sees its own coordinate rescale; timm makes one embedding per
    forward. In eval mode all blocks share one embedding and this is timm's forward exactly.
    R below is the number of register tokens (4 for DINOv3), d the head width.
    """
    B = x.shape[0]
    x = self.patch_embed(x)  # (B, h, w, D)
    h, w = x.shape[1:3]
    x, rope = self._pos_embed(x)  # (B, 1 + R + h*w, D): class, registers, patches; rope (h*w, 2d), block 0's
    x = self.norm_pre(x)
    taps = []
    for i, block in enumerate(self.blocks):
        if i > 0 and self.rope.training:
            rope = self.rope.get_embed(shape=(h, w))  # (h*w, 2d), coordinates rescaled by a fresh factor
        x = block(x, rope=rope)
        if i in indices:
            taps.append(self.norm(x) if norm else x)
    taps = [t[:, self.num_prefix_tokens:] for t in taps]  # (B, h*w, D): class and register tokens dropped
    if output_fmt == "NCHW":
        taps = [t.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for t in taps]  # (B, D, h, w)
    return taps if intermediates_only else (self.norm(x), taps)


def _create_vit(spec: BackboneSpec, path: Path | None = None, *, rope_rescale: float | None = ROPE_RESCALE,
                **timm_overrides) -> nn.Module:
    """timm ViT for spec (feature extractor, any input size); Meta's weight file at path, strictly, when given."""
    kwargs = dict(spec.timm_kwargs, num_classes=0, dynamic_img_size=True, **timm_overrides)
    rope = not spec.meta_pos_embed  # DINOv3: rotary position embeddings, no absolute ones
    if rope and rope_rescale is not None:
        kwargs["rope_rescale_coords"] = rope_rescale  # timm's draw: log-uniform in [1/R, R], one factor for h and w
    vit = timm.create_model(spec.timm_name, **kwargs)
    if spec.meta_pos_embed:
        # The only difference from timm's forward: position embeddings at sizes other than the stored grid.
        vit._pos_embed = types.MethodType(_meta_pos_embed, vit)
    if rope:
        # Meta's code uses the periods stored in its files (rounded to bf16 by its training); timm recomputes them
        # in float32 and leaves them out of the state dict. Made persistent, they load from Meta's file (strictly,
        # like every tensor) and travel with train.py's checkpoints, so evaluation runs the periods training saw.
        vit.rope.register_buffer("periods", vit.rope.periods, persistent=True)
        if rope_rescale is not None:
            vit.forward_intermediates = types.MethodType(_rope_per_block_intermediates, vit)
    if path is not None:
        _load_weight_file(vit, spec, path)
    return vit


def _rename(key: str, renames: tuple, *, back: bool = False) -> str:
    """A key of Meta's file in timm's naming (back=True: the other way)."""
    for meta_name, timm_name in renames:
        old, new = (timm_name, meta_name) if back else (meta_name, timm_name)
        if old in key:
            return key.replace(old, new)
    return key


def _mask_parts(mask: torch.Tensor) -> str:
    """A qkv bias mask (3D,) as 'q 1 / k 0 / v 1' (values of each third; 'mixed' when not constant)."""
    words = []
    for name, part in zip("qkv", mask.float().chunk(3)):
        values = part.unique().tolist()
        words.append(f"{name} {values[0]:g}" if len(values) == 1 else f"{name} mixed")
    return " / ".join(words)


def _to_timm_state(state: dict, vit: nn.Module) -> tuple[dict, list[str]]:
    """Meta's state dict in timm's naming, every key and shape checked against vit; also the problems, one line each.

    Nothing is resampled: a tensor either has exactly the backbone's shape or is a problem. mask_token (a pretraining
    token) is checked and dropped; DINOv3's qkv bias is split into q and v biases after its mask is checked.
    """
    expected = {key: tuple(value.shape) for key, value in vit.state_dict().items()}
    D = vit.embed_dim
    rope = getattr(vit, "rope", None) is not None
    renames = DINOV3_KEY_RENAMES if rope else DINOV2_KEY_RENAMES
    weights, seen, shapes, masks, unexpected = {}, set(), [], [], []  # seen: backbone keys the file has
    for key, tensor in state.items():
        found = tuple(tensor.shape)
        if key == "mask_token":  # masked-image-modelling token of DINOv2/v3 pretraining, unused here
            if found != (1, D):
                shapes.append(f"key {key} has shape {found}, expected {(1, D)}")
            continue
        if rope and key.endswith(".attn.qkv.bias_mask"):
            # Meta's LinearKMaskedBias multiplies the qkv bias by this mask; timm's qkvb model assumes q 1 / k 0 / v 1
            # (it has no k bias at all), so a file with another mask would run differently here.
            if found != (3 * D,):
                shapes.append(f"key {key} has shape {found}, expected {(3 * D,)}")
            elif _mask_parts(tensor) != "q 1 / k 0 / v 1":
                masks.append(f"key {key} is {_mask_parts(tensor)}, expected Meta's q 1 / k 0 / v 1 "
                             f"(the only bias mask this backbone applies)")
            continue
        if rope and key.endswith(".attn.qkv.bias"):
            q_key, v_key = key.replace("qkv.bias", "q_bias"), key.replace("qkv.bias", "v_bias")
            if q_key not in expected:
                unexpected.append(f"key {key} has shape {found}, expected no such key")
                continue
            seen.update((q_key, v_key))
            if found != (3 * expected[q_key][0],):
                shapes.append(f"key {key} has shape {found}, expected {(3 * expected[q_key][0],)}")
            else:
                # the k third is multiplied by the mask's 0 in Meta's code: unused, as in timm's model
                weights[q_key], _, weights[v_key] = tensor.chunk(3)
            continue
        name = _rename(key, renames)
        if name not in expected:
            unexpected.append(f"key {key} has shape {found}, expected no such key")
            continue
        seen.add(name)
        if found != expected[name]:
            shapes.append(f"key {key} has shape {found}, expected {expected[name]}")
        else:
            weights[name] = tensor
    missing = []
    for name, shape in expected.items():
        if name in seen:
            continue
        if rope and name.endswith((".attn.q_bias", ".attn.v_bias")):  # both come from the file's qkv.bias
            line = f"key {name.rsplit('.', 1)[0]}.qkv.bias is missing, expected shape {(3 * shape[0],)}"
        else:
            line = f"key {_rename(name, renames, back=True)} is missing, expected shape {shape}"
        if line not in missing:
            missing.append(line)
    broken = [f"key {name} has non-finite values (NaN or inf)" for name, tensor in weights.items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    return weights, shapes + masks + unexpected + missing + broken


def _guess_file(state: dict, vit: nn.Module, spec: BackboneSpec, missing: int) -> str:
    """What a weight file that does not fit the backbone probably is, from its keys and widths (missing: the number
    of backbone tensors it lacks)."""
    D, p, depth = vit.embed_dim, spec.patch_size, len(vit.blocks)
    rope = getattr(vit, "rope", None) is not None
    if "register_tokens" in state:
        return "a DINOv2 register-token variant (Meta's *_reg4_pretrain.pth), not the file without registers"
    if rope and "pos_embed" in state:
        return "a DINOv2 file (absolute position embeddings), not DINOv3"
    if not rope and ("storage_tokens" in state or "rope_embed.periods" in state):
        return "a DINOv3 file (RoPE, storage tokens), not DINOv2"
    if rope and any(key.endswith(".attn.qkv.bias_mask") and tuple(value.shape) == (3 * D,)
                    and _mask_parts(value) != "q 1 / k 0 / v 1" for key, value in state.items()):
        return "a DINOv3 variant with other attention biases than Meta's released models"
    kernel = state.get("patch_embed.proj.weight")
    if kernel is not None and kernel.ndim == 4:
        if kernel.shape[0] != D:
            size = VIT_SIZES.get(kernel.shape[0], "ViT")
            return f"a {size} file (width {kernel.shape[0]}; this backbone is {VIT_SIZES.get(D, 'a ViT')} of width {D})"
        if tuple(kernel.shape[-2:]) != (p, p):
            return f"a patch-{kernel.shape[-1]} file (this backbone has patch {p}: {p}×{p} kernels)"
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("blocks.") and key.split(".")[1].isdigit()}
    if blocks and max(blocks) + 1 != depth:
        return f"a {max(blocks) + 1}-block file (this backbone has {depth} blocks)"
    pos = state.get("pos_embed")
    if pos is not None and getattr(vit, "pos_embed", None) is not None and pos.shape != vit.pos_embed.shape:
        grid, ours = math.isqrt(max(pos.shape[1] - 1, 0)), math.isqrt(vit.pos_embed.shape[1] - 1)
        return (f"a file with position embeddings for a {grid}×{grid} grid ({grid * p} px) instead of the "
                f"{ours}×{ours} of the official file: resampled, or trained at another size")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.shape[0] != vit.blocks[0].mlp.fc1.weight.shape[0]:
        return (f"a ViT with MLP width {fc1.shape[0]} instead of {vit.blocks[0].mlp.fc1.weight.shape[0]}: "
                f"another architecture or variant")
    if missing:
        return f"a partial state dict ({missing} of the backbone's {len(vit.state_dict())} tensors absent)"
    return "a file of another model"


def _read_weight_file(path: Path, spec: BackboneSpec) -> dict:
    """torch.load a weight file (CPU, tensors only) into a flat {name: tensor} dict, or a one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, pickle or weights-only errors: a cut-off download or not a torch.save file
        raise ValueError(f"--pretrained: {path} cannot be read by torch.load ({type(error).__name__}): probably a "
                         f"truncated download or not a weight file (expected Meta's {spec.weights})") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise ValueError(f"--pretrained: {path} holds a {type(state).__name__} that is not a flat state dict of "
                         f"tensors (expected Meta's {spec.weights})")
    return state


def _load_weight_file(vit: nn.Module, spec: BackboneSpec, path: Path) -> None:
    """Load Meta's file (or a state dict saved from this code's backbone) into vit: every key and shape must fit."""
    state = _read_weight_file(path, spec)
    weights, problems = _to_timm_state(state, vit)
    if problems:
        more = f" ({len(problems)} problems in all)" if len(problems) > 1 else ""
        raise ValueError(f"--pretrained: {path} does not fit this backbone (expected Meta's {spec.weights}): "
                         f"{problems[0]}{more}; probably "
                         f"{_guess_file(state, vit, spec, sum(' is missing,' in line for line in problems))}")
    vit.load_state_dict(weights, strict=True)  # every key and shape was checked: nothing is resampled or dropped


def load_pretrained(backbone: str, path: str | Path, *, rope_rescale: float | None = ROPE_RESCALE,
                    **timm_overrides) -> nn.Module:
    """Build a backbone and load Meta's official weight file into it (strict, local file only).

    Args:
        backbone: a name in BACKBONES.
        path: Meta's file, e.g. pretrained/dinov2_vits14_pretrain.pth (keys cls_token, pos_embed, mask_token,
            blocks.N.ls1.gamma, ...) or dinov3_vits16_pretrain_lvd1689m-08c60483.pth (storage_tokens,
            rope_embed.periods, blocks.N.attn.qkv.bias_mask, ...), or a state dict saved from this code's backbone (the
            toy's file; DINOv3 ones hold rope.periods, which timm's own state dicts lack). Every tensor
            must have exactly the backbone's shape (DINOv2's position embeddings: the file's own 37×37 grid, resized
            at run time by Meta's rule); anything else is a one-line ValueError naming the key, both shapes and what
            the file probably is. Nothing is resampled. DINOv3's stored RoPE periods are loaded as they are.
        rope_rescale: DINOv3's train-time RoPE coordinate rescale R (see ROPE_RESCALE); None = off.
        **timm_overrides: architecture overrides for timm (e.g. depth=1 for a truncated test file).
    Returns:
        The timm ViT with the weights loaded.
    """
    spec = _spec(backbone)
    if spec.weights is None:
        raise ValueError(f"--pretrained: backbone {backbone!r} has no official weights (random init only)")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--pretrained: {path} is not a file (expected {spec.weights})")
    return _create_vit(spec, path, rope_rescale=rope_rescale, **timm_overrides)


NO_WEIGHTS = "none"  # --pretrained none: random init, on purpose


def is_no_weights(pretrained) -> bool:
    """True for the spelling --pretrained none (any case)."""
    return isinstance(pretrained, str) and pretrained.lower() == NO_WEIGHTS


def missing_weights_message(backbone: str) -> str:
    """One line: the official file of backbone is not under PRETRAINED_DIR, where Meta publishes it, what else to do."""
    spec = _spec(backbone)
    page = META_WEIGHTS_PAGES.get(spec.weights.split("_")[0], "its publisher")
    return (f"{PRETRAINED_DIR / spec.weights} not found: download Meta's {spec.weights} from {page} into "
            f"{PRETRAINED_DIR}, or pass --pretrained none to start from random init on purpose")


def resolve_pretrained(backbone: str, pretrained: str | Path | bool | None = None, *,
                       required: bool = False) -> Path | None:
    """Which weight file to load: an explicit path, the official file under pretrained/, or none (random init).

    Reads nothing and makes nothing, so a run can call it before any work.

    Args:
        backbone: a name in BACKBONES.
        pretrained: a path (must be a file); None = the official file under PRETRAINED_DIR (when it is absent:
            random init, or an error when required); True = that official file, which must exist; False or "none"
            (any case) = random init. The toy backbone's official file is never missing: build_model makes it on
            first use (pretrain_toy_backbone), so its path is returned either way.
        required: the official file must be there when pretrained is None (train.py on a real dataset).
    Returns:
        The file to load, or None for random init.
    """
    spec = _spec(backbone)
    if pretrained is False or is_no_weights(pretrained):
        return None
    if pretrained is None or pretrained is True:
        if spec.weights is None:
            if pretrained is True:
                raise ValueError(f"--pretrained: backbone {backbone!r} has no official weights (random init only)")
            return None
        path = PRETRAINED_DIR / spec.weights
        if path.is_file() or backbone == "toy":
            return path
        if required or pretrained is True:
            raise ValueError(f"--pretrained: {missing_weights_message(backbone)}")
        return None
    path = Path(pretrained)
    if not path.is_file():
        raise ValueError(f"--pretrained: {path} is not a file (expected Meta's {spec.weights}, "
                         f"or '{NO_WEIGHTS}' for random init)")
    return path


def _spec(backbone: str) -> BackboneSpec:
    """Registry entry, with a one-line error for an unknown name."""
    if backbone not in BACKBONES:
        raise ValueError(f"--backbone: unknown backbone {backbone!r}, expected one of {', '.join(BACKBONES)}")
    return BACKBONES[backbone]


def check_patch_multiple(images: torch.Tensor, patch_size: int) -> None:
    """One-line error when the image sides are not multiples of the patch size."""
    H, W = images.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"model: input {H}×{W} is not a multiple of the patch size {patch_size}; "
                         f"use a --crop-size (and image sizes) divisible by {patch_size}")


# ----------------------------------------------------------------------------------------------------
# DPT head (Ranftl et al. 2021, Fig. 1: Reassemble -> Fusion path_4 ... path_1 -> Head)

class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: x + conv(relu(conv(relu(x)))), 3×3 convs with bias, no normalisation."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu is not in place: x is still needed for the residual
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """One DPT fusion stage: refine the reassembled level, add the coarser path, refine, upsample, project."""

    def __init__(self, features: int):
        super().__init__()
        self.refine_level = ResidualConvUnit(features)
        self.refine_path = ResidualConvUnit(features)
        self.project = nn.Conv2d(features, features, 1)

    def forward(self, level: torch.Tensor, path: torch.Tensor | None, size: tuple[int, int] | None) -> torch.Tensor:
        """(B, F, h_i, w_i) level (+ path of the same size) -> (B, F, *size), or ×2 when size is None (not resized
        when size is the level's own)."""
        # The DPT figure applies the first unit at every stage, the deepest included; the reference code skips
        # it at path_4, leaving its weights unused (which DDP rejects). Following the figure trains all of them.
        x = self.refine_level(level)
        if path is not None:
            x = x + path
        x = self.refine_path(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)  # (B, F, 2h_i, 2w_i)
        elif tuple(size) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)  # (B, F, *size)
        return self.project(x)


class DPTHead(nn.Module):
    """Four ViT token maps at stride p -> class logits at stride p/8 (p/4 with final_upsample 1)."""

    def __init__(self, *, embed_dim: int, features: int, out_channels: tuple[int, int, int, int], num_classes: int,
                 final_upsample: int = 2):
        super().__init__()
        if final_upsample not in (1, 2):
            raise ValueError(f"final_upsample {final_upsample}: expected 1 or 2")
        self.final_upsample = final_upsample
        o1, o2, o3, o4 = out_channels
        self.project = nn.ModuleList([nn.Conv2d(embed_dim, o, 1) for o in out_channels])
        # Reassemble to strides p/4, p/2, p, 2p (×4, ×2, ×1, ÷2 of the patch grid).
        self.resample = nn.ModuleList([
            nn.ConvTranspose2d(o1, o1, kernel_size=4, stride=4),
            nn.ConvTranspose2d(o2, o2, kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(o4, o4, kernel_size=3, stride=2, padding=1),
        ])
        self.to_features = nn.ModuleList([nn.Conv2d(o, features, 3, padding=1, bias=False) for o in out_channels])
        self.path_4 = FusionBlock(features)
        self.path_3 = FusionBlock(features)
        self.path_2 = FusionBlock(features)
        self.path_1 = FusionBlock(features)
        self.classifier = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, num_classes, 1),
        )

    def forward(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """4 × (B, D, h, w) -> (B, K, 8h, 8w) logits ((B, K, 4h, 4w) with final_upsample 1)."""
        levels = [to_f(resample(project(t))) for t, project, resample, to_f
                  in zip(tokens, self.project, self.resample, self.to_features)]
        l1, l2, l3, l4 = levels  # (B, F, 4h, 4w), (B, F, 2h, 2w), (B, F, h, w), (B, F, ⌈h/2⌉, ⌈w/2⌉)
        path_4 = self.path_4(l4, None, l3.shape[-2:])  # (B, F, h, w)
        path_3 = self.path_3(l3, path_4, l2.shape[-2:])  # (B, F, 2h, 2w)
        path_2 = self.path_2(l2, path_3, l1.shape[-2:])  # (B, F, 4h, 4w)
        path_1 = self.path_1(l1, path_2, None if self.final_upsample == 2 else l1.shape[-2:])  # (B, F, 8h, 8w) or 4h, 4w
        return self.classifier(path_1)  # (B, K, 8h, 8w)


class DPT(nn.Module):
    """ViT backbone + DPT head: images (B, 3, H, W) -> logits (B, K, H, W)."""

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, num_classes: int):
        super().__init__()
        self.arch = "dpt"
        self.patch_size = spec.patch_size
        self.num_classes = num_classes
        self.taps = list(spec.taps)
        self.backbone = backbone
        self.head = DPTHead(embed_dim=backbone.embed_dim, features=spec.features, out_channels=spec.out_channels,
                            num_classes=num_classes, final_upsample=spec.final_upsample)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_patch_multiple(images, self.patch_size)
        # Final norm applied to every tap, class/register tokens dropped (as Depth Anything's DPT does).
        tokens = self.backbone.forward_intermediates(
            images, indices=self.taps, norm=True, output_fmt="NCHW", intermediates_only=True)  # 4 × (B, D, h, w)
        # The head's convolutions in channels-last memory (the same values, another layout): oneDNN runs these narrow
        # convolutions ~1.3× faster so on a CPU (bench.py train; not measured on a GPU, where cuDNN accepts it too);
        # the logits come back in the default layout.
        tokens = [t.contiguous(memory_format=torch.channels_last) for t in tokens]
        logits = self.head(tokens)  # (B, K, 8h, 8w)
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)
        return logits.contiguous()


# ----------------------------------------------------------------------------------------------------
# Building and inference, any arch

def build_model(arch: str, backbone: str, num_classes: int, pretrained: str | Path | bool | None = None, *,
                rope_rescale: float | None = ROPE_RESCALE) -> nn.Module:
    """Build a segmentation model by registry name.

    Args:
        arch: "dpt" or "mask2former".
        backbone: a name in BACKBONES.
        num_classes: K.
        pretrained: backbone weights, see resolve_pretrained (None: official file under pretrained/ if present;
            "none": random init). The toy backbone's official file is made here on first use.
        rope_rescale: DINOv3 backbones only: in train mode, RoPE coordinates are rescaled by a log-uniform factor in
            [1/R, R] drawn for every block on every forward, as in Meta's training (default R = 2); None = off.
    Returns:
        The model, with attributes arch, patch_size, num_classes, backbone (the ViT; all other parameters are
        the head) and pretrained_file (the loaded weight file as a string, or None for random init).
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch: unknown arch {arch!r}, expected one of {', '.join(ARCHS)}")
    spec = _spec(backbone)
    path = resolve_pretrained(backbone, pretrained)
    if path is not None and not path.is_file():  # only the toy's official file can be absent here
        pretrain_toy_backbone(path)
    if backbone == "toy" and path == PRETRAINED_DIR / TOY_WEIGHTS:
        check_toy_weights(path)  # the file the repository ships (or its remake), against its record
    if path is None:
        vit = _create_vit(spec, rope_rescale=rope_rescale)
    else:
        vit = load_pretrained(backbone, path, rope_rescale=rope_rescale)
    if arch == "dpt":
        model = DPT(vit, spec, num_classes)
    else:
        model = build_mask2former(vit, spec, num_classes)  # the Mask2Former section below
    model.pretrained_file = None if path is None else str(path)
    return model


# ----------------------------------------------------------------------------------------------------
# The toy backbone's pretraining: the toy world's DINOv2. The real backbones come to SENSE pretrained on other
# images than the segmentation data; so does the toy ViT: a linear classifier on its last tokens learns the
# pretraining world's own 13 classes (data.render_pretrain_scene: textures and shapes, no toy-world image), then only
# the ViT is kept. As DINOv2's images hold cars, the pretraining world holds discs, boxes, triangles and diamonds,
# the outlines of the toy world's things, filled with other textures and colours than theirs. A linear head, as in
# DINOv2's linear probes, puts the semantics in
# the backbone (a DPT head would learn half of them itself) and costs a quarter of a DPT step. The repository ships
# the result, pretrained/toy_vit_pretrain.pth (3.3 MB), beside its record pretrained/toy_vit_pretrain.json (its SHA-256
# and this recipe), so a fresh clone trains at once; `python model.py --remake-toy` makes both anew (a few CPU
# minutes; another machine's arithmetic gives other bytes, and the record follows them), and a missing file is made on
# first use the same way.

TOY_PRETRAIN = dict(steps=2000, batch=16, size=64, lr=1e-3, weight_decay=0.01, seed=0)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_toy_weights(path: Path) -> None:
    """The toy backbone's weight file against the SHA-256 in its record (path with .json): a one-line ValueError
    when the record is missing or unreadable, or the bytes differ (a truncated copy, a Git LFS pointer, an edit)."""
    record_file = path.with_suffix(".json")
    remedy = (f"restore both with `git checkout -- {record_file.parent.name}/`, or remake them with "
              f"`python model.py --remake-toy` (a few CPU minutes)")
    try:
        stored = json.loads(record_file.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--pretrained: {path}: no readable record {record_file} with its SHA-256; {remedy}") from None
    actual = sha256_file(path)
    if actual != stored:
        raise ValueError(f"--pretrained: {path}: SHA-256 {actual[:16]}... is not the {stored[:16]}... of its record "
                         f"{record_file}; {remedy}")


def pretrain_toy_backbone(path: str | Path, *, steps: int | None = None, batch: int | None = None,
                          size: int | None = None, lr: float | None = None, seed: int | None = None,
                          progress: bool = True) -> Path:
    """Pretrain the toy ViT on the pretraining world and write its weights (timm format, atomically) to path.

    Args:
        path: weight file to write (its folder is created).
        steps, batch, size: AdamW steps, images per step, image side (fresh images every step).
        lr: peak learning rate (poly decay, power 0.9), weight decay TOY_PRETRAIN["weight_decay"].
        seed: images and initial weights are deterministic from it.
        progress: show a progress bar.
        Any of steps, batch, size, lr, seed left None is read from TOY_PRETRAIN when the function runs.
    Returns:
        path as a Path.
    """
    from tqdm import tqdm
    path = Path(path)
    steps, batch, size, lr, seed = (TOY_PRETRAIN[name] if value is None else value for name, value in
                                    (("steps", steps), ("batch", batch), ("size", size), ("lr", lr), ("seed", seed)))
    spec = BACKBONES["toy"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = _create_vit(spec)
        probe = nn.Linear(vit.embed_dim, len(data.PRETRAIN_CLASSES))
    net = nn.ModuleDict(dict(vit=vit, probe=probe)).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=TOY_PRETRAIN["weight_decay"])
    bar = tqdm(range(steps), desc=f"pretraining the toy backbone -> {path}", disable=None if progress else True,
               leave=False)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - step / steps) ** 0.9
        scenes = [data.render_pretrain_scene(np.random.default_rng([seed, step, i]), size) for i in range(batch)]
        images = data.normalize(np.stack([image for image, _ in scenes]))  # (b, 3, size, size)
        labels = torch.from_numpy(np.stack([label for _, label in scenes])).long()  # (b, size, size)
        grid = size // spec.patch_size
        tokens = vit.forward_features(images)[:, vit.num_prefix_tokens:]  # (b, grid², D) after the final norm
        logits = probe(tokens).transpose(1, 2).reshape(batch, -1, grid, grid)  # (b, classes, grid, grid)
        logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(vit.state_dict(), temporary)
    os.replace(temporary, path)
    # the record check_toy_weights reads: the file's SHA-256 and the recipe that made it, written after the file
    record = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "torch": torch.__version__,
              "recipe": {"steps": steps, "batch": batch, "size": size, "lr": lr,
                         "weight_decay": TOY_PRETRAIN["weight_decay"], "seed": seed}}
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(temporary, path.with_suffix(".json"))
    return path


# Bilinear resizes outside the networks (teacher TTA views, evaluation), per arch, as the reference code runs
# them (github.com/zhang0jhon/SENSE): sense_dpt.py writes align_corners=True, sense_mask2former.py passes its
# configs' align_corners, False for every dataset.
RESIZE_ALIGN_CORNERS = {"dpt": True, "mask2former": False}


def resize(x: torch.Tensor, size: tuple[int, int], arch: str) -> torch.Tensor:
    """Bilinear resize of images or class scores (B, C, H, W) -> (B, C, *size) with the arch's RESIZE_ALIGN_CORNERS."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=RESIZE_ALIGN_CORNERS[arch])


def class_scores(model: nn.Module, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-pixel class scores, for any arch (used by evaluation, the teacher and the OT step).

    Args:
        model: a model from build_model (or a DDP wrapper around one).
        images: (B, 3, H, W), sides multiples of the patch size.
        size: (H', W') of the scores (default: the image size); reached by one bilinear `resize`.
    Returns:
        (B, K, H', W'): DPT logits, or Mask2Former scores Σ_q softmax(class_q)[:K] · sigmoid(mask_q).
    """
    arch = getattr(model, "module", model).arch
    size = tuple(images.shape[-2:]) if size is None else tuple(size)
    if arch == "dpt":
        logits = model(images)  # (B, K, H, W)
        return logits if tuple(logits.shape[-2:]) == size else resize(logits, size, arch)
    return mask2former_scores(model(images), size)


def mask2former_scores(out: dict, size: tuple[int, int]) -> torch.Tensor:
    """Mask2Former's semantic inference: Σ_q softmax(class_q)[:K] · sigmoid(mask_q), upsampled to `size`.

    The sum runs at the masks' resolution (stride p/4) on their sigmoids, and only the K class maps are upsampled,
    in the reference code's order (github.com/zhang0jhon/SENSE, sense_mask2former.py: teacher and evaluation).
    Mask2Former's own semantic inference upsamples the mask logits before the sigmoid instead.

    Args:
        out: the model's dict with pred_logits (B, Q, K+1) and pred_masks (B, Q, h, w).
        size: (H, W) output size.
    Returns:
        (B, K, H, W) scores in [0, Q].
    """
    probs = out["pred_logits"].softmax(-1)[..., :-1]  # (B, Q, K): the last class is "no object"
    scores = torch.einsum("bqk,bqhw->bkhw", probs, out["pred_masks"].sigmoid())  # (B, K, h, w)
    return resize(scores, size, "mask2former")  # (B, K, H, W)


def load_checkpoint_model(path: str | Path, weights: str = "ema") -> tuple[nn.Module, dict]:
    """Rebuild the model stored in a train.py checkpoint.

    Args:
        path: checkpoint file (torch.save dict with model, ema, args).
        weights: "ema" (the teacher, the evaluated model) or "model" (the student).
    Returns:
        (model in eval mode on the CPU, the checkpoint's args dict).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--checkpoint: {path} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip or weights-only errors all mean: not a train.py checkpoint
        raise ValueError(f"--checkpoint: {path} is not a readable train.py checkpoint "
                         f"({type(error).__name__})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"--checkpoint: {path} holds a {type(checkpoint).__name__}, not a train.py checkpoint dict")
    args = checkpoint.get("args", {})
    missing = [key for key in (weights, "args") if key not in checkpoint]
    missing += [f"args.{key}" for key in ("arch", "backbone", "num_classes") if key not in args]
    if missing:
        raise ValueError(f"--checkpoint: {path} has no {', '.join(missing)} (expected a train.py checkpoint)")
    # pretrained=False: the checkpoint holds every weight, official files are neither needed nor read
    model = build_model(args["arch"], args["backbone"], args["num_classes"], pretrained=False)
    try:
        model.load_state_dict(checkpoint[weights])
    except RuntimeError as error:  # torch's message: a header, then one line per kind of mismatch
        detail = [line.strip() for line in str(error).splitlines() if line.strip()][1:2] or [""]
        raise ValueError(f"--checkpoint: {path} '{weights}' does not fit {args['arch']}/{args['backbone']}: "
                         f"{detail[0][:200]}") from None
    return model.eval(), args


def pick_device(name: str) -> torch.device:
    """--device auto: cuda (this rank's LOCAL_RANK under torchrun), then mps, then cpu; else the named device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a model, print its parameters, time one forward.")
    parser.add_argument("--arch", default="dpt", choices=ARCHS, help="model (default: dpt)")
    parser.add_argument("--backbone", default="toy", choices=list(BACKBONES), help="backbone size (default: toy)")
    parser.add_argument("--num-classes", type=int, default=19, help="K (default: 19, Cityscapes)")
    parser.add_argument("--pretrained", default=None,
                        help="Meta's weight file, or 'none' for random init (default: pretrained/<official name>; "
                             "random init, said so, when it is not there)")
    parser.add_argument("--size", type=int, default=None,
                        help="forward size, a multiple of the patch (default: 96 toy, 518 else)")
    parser.add_argument("--remake-toy", action="store_true",
                        help="pretrain the toy backbone by TOY_PRETRAIN and write pretrained/toy_vit_pretrain.pth and its "
                             "record .json, replacing the shipped pair, then exit (default: off)")
    args = parser.parse_args(argv)
    if args.remake_toy:
        path = pretrain_toy_backbone(PRETRAINED_DIR / TOY_WEIGHTS)
        print(f"{path}: SHA-256 {sha256_file(path)} (record: {path.with_suffix('.json')})")
        return
    try:
        weights = resolve_pretrained(args.backbone, args.pretrained)  # checks the flag, makes nothing
        model = build_model(args.arch, args.backbone, args.num_classes, args.pretrained).eval()  # may make the toy's
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if weights is not None:
        source = str(weights)
    elif is_no_weights(args.pretrained):
        source = "none, random init (--pretrained none)"
    else:  # this script only looks at a model; train.py refuses a real-dataset run without the file
        source = f"random init ({missing_weights_message(args.backbone)})"
    n_backbone, n_total = count_parameters(model.backbone), count_parameters(model)
    print(f"{args.arch} / {args.backbone}, K={args.num_classes}: {n_total / 1e6:.2f} M parameters "
          f"({n_backbone / 1e6:.2f} M backbone + {(n_total - n_backbone) / 1e6:.2f} M head), weights: {source}")
    size = args.size or (96 if args.backbone == "toy" else 518)
    images = torch.randn(1, 3, size, size)
    with torch.no_grad():
        start = time.perf_counter()
        try:
            scores = class_scores(model, images)
        except ValueError as error:
            raise SystemExit(f"--size: {error}") from None
    print(f"forward {tuple(images.shape)} -> {tuple(scores.shape)} in {time.perf_counter() - start:.2f} s")


# ---- Mask2Former (paper: "pixel- and query-based segmenters"; docs/models.md "Mask2Former") ----
# Legend: B images, C ViT width, D decoder width, h×w patch grid, Q queries, K classes (index K =
# no-object), L feature levels the transformers attend to, N tokens of all levels, n targets of one
# image, M matched (query, target) pairs of a batch, P sampled points, H×W image or label size.
# Strides are named for patch 16 (DINOv3): the pyramid is ×4, ×2, ×1, ÷2 of the patch grid.


@dataclass(frozen=True)
class Mask2FormerSize:
    """Widths and depths of one Mask2Former head."""

    width: int  # D: every feature of the pixel decoder and the transformer decoder
    heads: int  # attention heads, deformable and masked alike
    queries: int  # Q
    encoder_layers: int  # deformable-attention layers of the pixel decoder (0 = conv-only)
    encoder_ffn: int
    decoder_layers: int  # masked-attention layers; there are decoder_layers + 1 predictions
    decoder_ffn: int
    points: int = 4  # sampling points per head and level (Deformable DETR)
    # P, points per mask at which the set loss compares masks: Mask2Former's 12544 (112²) is ~2-3 % of a 640-768
    # crop's pixels; a 64-pixel toy crop has 4096 pixels, and sampling 12544 points was most of the toy set loss's time
    loss_points: int = 12544


M2F_SIZES = {  # L = SENSE's head (Mask2Former's standard numbers); S = a lighter one; toy = CPU tests
    "L": Mask2FormerSize(width=256, heads=8, queries=100, encoder_layers=6, encoder_ffn=1024,
                         decoder_layers=9, decoder_ffn=2048),
    "S": Mask2FormerSize(width=256, heads=8, queries=100, encoder_layers=3, encoder_ffn=1024,
                         decoder_layers=6, decoder_ffn=1024),
    "toy": Mask2FormerSize(width=64, heads=4, queries=16, encoder_layers=1, encoder_ffn=128,
                           decoder_layers=3, decoder_ffn=128, loss_points=1024),
}
M2F_LEVELS = 3  # levels at strides 32, 16, 8 seen by both transformers (Mask2Former)
M2F_GROUPS = 32  # GroupNorm groups of the pixel decoder's convolutions (Mask2Former)
# head size per backbone: SENSE pairs DINOv3-L with L; smaller ViTs get the lighter S
M2F_HEAD_SIZES = {"toy": "toy", "dinov2_s": "S", "dinov2_b": "S", "dinov2_l": "L", "dinov2_g": "L",
                  "dinov3_s": "S", "dinov3_b": "S", "dinov3_l": "L"}


def sine_position_encoding(height: int, width: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """DETR's normalised sine position encoding of a height × width grid.

    Args:
        height, width: grid size.
        dim: channels; the first half encodes y, the second half x, each as interleaved sin/cos pairs.
        device: where to build it.

    Returns:
        (height * width, dim) float32, row-major over the grid.
    """
    half = dim // 2
    # positions 1..n scaled to (0, 2π]; the 1e-6 is DETR's guard against division by zero
    y = torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + 1e-6) * 2 * math.pi
    x = torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * torch.div(torch.arange(half, device=device), 2, rounding_mode="floor") / half)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, half)
        angle = pos[:, None] / dim_t  # (n, half)
        return torch.stack((angle[:, 0::2].sin(), angle[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None].expand(height, width, half)  # (height, width, half)
    pos_x = encode(x)[None].expand(height, width, half)  # (height, width, half)
    return torch.cat((pos_y, pos_x), dim=2).flatten(0, 1)  # (height * width, dim)


class SimpleFeaturePyramid(nn.Module):
    """Four ViT taps (shallow to deep) → strides 4, 8, 16, 32, each projected to width D (ViTDet's pyramid)."""

    def __init__(self, embed_dim: int, width: int):
        super().__init__()
        c = embed_dim
        self.resample = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(c, c, 2, stride=2), nn.GELU(), nn.ConvTranspose2d(c, c, 2, stride=2)),
            nn.ConvTranspose2d(c, c, 2, stride=2),
            nn.Identity(),
            # ceil_mode keeps a 1-patch-wide grid alive at stride 32 (tiny CPU crops, odd sizes)
            nn.MaxPool2d(2, ceil_mode=True),
        ])
        self.project = nn.ModuleList([nn.Conv2d(c, width, 1) for _ in range(4)])

    def forward(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        """taps: 4 × (B, C, h, w) -> [(B, D, 4h, 4w), (B, D, 2h, 2w), (B, D, h, w), (B, D, ⌈h/2⌉, ⌈w/2⌉)]."""
        return [project(resample(x)) for x, resample, project in zip(taps, self.resample, self.project)]


class MultiScaleDeformableAttention(nn.Module):
    """Deformable DETR's multi-scale deformable attention in plain PyTorch (grid_sample, no compiled op).

    Each query looks at `points` bilinearly sampled locations per head and level around its reference
    point; the offsets and the attention weights are linear functions of the query.
    """

    def __init__(self, width: int, heads: int, levels: int, points: int):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(width, heads * levels * points * 2)
        self.attention_weights = nn.Linear(width, heads * levels * points)
        self.value_proj = nn.Linear(width, width)
        self.output_proj = nn.Linear(width, width)
        # Deformable DETR's start: head j samples along direction 2πj/heads, point i at distance i+1 pixels
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(heads, dtype=torch.float32) * (2 * math.pi / heads)
        grid = torch.stack([angle.cos(), angle.sin()], -1)  # (heads, 2)
        grid = grid / grid.abs().max(-1, keepdim=True).values  # on the square of side 2
        grid = grid[:, None, None, :] * torch.arange(1, points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(heads, levels, points, 2).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """Attend from every query to all levels.

        Args:
            query: (B, Nq, D) queries, position encoding included.
            reference: (Nq, 2) float32 reference points (x, y) in [0, 1], shared by all levels and images.
            value: (B, N, D) tokens of all levels, concatenated in the order of `shapes`.
            shapes: (h_l, w_l) of each level; Σ h_l·w_l = N.

        Returns:
            (B, Nq, D).
        """
        b, nq, d = query.shape
        heads, levels, points = self.heads, self.levels, self.points
        value = self.value_proj(value).view(b, -1, heads, d // heads)  # (B, N, heads, D/heads)
        offsets = self.sampling_offsets(query).view(b, nq, heads, levels, points, 2)
        weights = self.attention_weights(query).view(b, nq, heads, levels * points).softmax(-1)
        weights = weights.view(b, nq, heads, levels, points).transpose(1, 2).flatten(0, 1)[:, None]
        # weights: (B*heads, 1, Nq, L, points)
        # offsets are in pixels of each level: divide by (w_l, h_l) to move in [0, 1] coordinates
        size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=query.device)  # (L, 2)
        # float32 locations (bf16 would be off by ~0.4 px on a 96-wide level); grid_sample then runs in
        # float32 too, since autocast promotes it to its widest input
        locations = reference[None, :, None, None, None, :] + offsets.float() / size[:, None, :]
        # locations: (B, Nq, heads, L, points, 2)
        grids = (2 * locations - 1).transpose(1, 2).flatten(0, 1)  # (B*heads, Nq, L, points, 2) in [-1, 1]
        out = 0
        for level, (value_l, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
            value_l = value_l.permute(0, 2, 3, 1).reshape(b * heads, d // heads, h, w)  # (B*heads, D/heads, h, w)
            # zeros outside the map, align_corners=False: the convention of the compiled op
            sampled = F.grid_sample(value_l, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                    align_corners=False)  # (B*heads, D/heads, Nq, points)
            out = out + (sampled * weights[..., level, :]).sum(-1)  # (B*heads, D/heads, Nq)
        out = out.view(b, d, nq).transpose(1, 2)  # (B, Nq, D)
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    """Pixel-decoder layer: deformable self-attention over all levels, then an FFN; post-norm."""

    def __init__(self, size: Mask2FormerSize):
        super().__init__()
        d = size.width
        self.attn = MultiScaleDeformableAttention(d, size.heads, M2F_LEVELS, size.points)
        self.norm1 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, size.encoder_ffn), nn.ReLU(), nn.Linear(size.encoder_ffn, d))
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """x: (B, N, D), pos: (N, D), reference: (N, 2) -> (B, N, D)."""
        x = self.norm1(x + self.attn(x + pos, reference, x, shapes))
        return self.norm2(x + self.ffn(x))


def _conv_norm(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    """Conv without bias (GroupNorm follows) + GroupNorm, Mask2Former's c2_xavier_fill init."""
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    return [conv, nn.GroupNorm(M2F_GROUPS, c_out)]


class PixelDecoder(nn.Module):
    """Deformable-attention encoder over strides 32, 16, 8 + one FPN step to the stride-4 mask features."""

    def __init__(self, size: Mask2FormerSize):
        super().__init__()
        d = size.width
        self.input_proj = nn.ModuleList([nn.Sequential(nn.Conv2d(d, d, 1), nn.GroupNorm(M2F_GROUPS, d))
                                         for _ in range(M2F_LEVELS)])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.layers = nn.ModuleList([DeformableEncoderLayer(size) for _ in range(size.encoder_layers)])
        # tells the levels apart inside the encoder; absent when there is none (an unused parameter breaks DDP)
        self.level_embed = nn.Parameter(torch.randn(M2F_LEVELS, d)) if self.layers else None
        self.lateral = nn.Sequential(*_conv_norm(d, d, 1))
        self.output = nn.Sequential(*_conv_norm(d, d, 3), nn.ReLU())
        self.mask_proj = nn.Conv2d(d, d, 1)
        nn.init.kaiming_uniform_(self.mask_proj.weight, a=1)
        nn.init.zeros_(self.mask_proj.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode the pyramid.

        Args:
            features: [(B, D, 4h, 4w), (B, D, 2h, 2w), (B, D, h, w), (B, D, ⌈h/2⌉, ⌈w/2⌉)] (strides 4 … 32).

        Returns:
            mask_features (B, D, 4h, 4w) and the encoded levels [stride 32, stride 16, stride 8], each (B, D, h_l, w_l).
        """
        levels = [proj(x) for proj, x in zip(self.input_proj, features[:0:-1])]  # low to high resolution
        shapes = [tuple(x.shape[-2:]) for x in levels]
        b, d = levels[0].shape[:2]
        tokens = torch.cat([x.flatten(2).transpose(1, 2) for x in levels], dim=1)  # (B, N, D)
        if self.layers:
            device = tokens.device
            pos = torch.cat([sine_position_encoding(h, w, d, device) + embed
                             for (h, w), embed in zip(shapes, self.level_embed)]).to(tokens.dtype)  # (N, D)
            # reference point of a token = its own pixel centre, used on every level
            reference = torch.cat([torch.stack(torch.meshgrid(
                (torch.arange(w, device=device) + 0.5) / w, (torch.arange(h, device=device) + 0.5) / h,
                indexing="xy"), dim=-1).flatten(0, 1) for h, w in shapes])  # (N, 2) float32 as (x, y)
            for layer in self.layers:
                tokens = layer(tokens, pos, reference, shapes)
        encoded = [t.transpose(1, 2).reshape(b, d, h, w)
                   for t, (h, w) in zip(tokens.split([h * w for h, w in shapes], dim=1), shapes)]
        finest = features[0]
        y = self.lateral(finest) + F.interpolate(encoded[-1], size=finest.shape[-2:], mode="bilinear",
                                                 align_corners=False)  # (B, D, 4h, 4w)
        return self.mask_proj(self.output(y)), encoded


class MaskedAttentionLayer(nn.Module):
    """Transformer-decoder layer: masked cross-attention to one level, self-attention, FFN; post-norm."""

    def __init__(self, size: Mask2FormerSize):
        super().__init__()
        d = size.width
        self.cross_attn = nn.MultiheadAttention(d, size.heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, size.heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, size.decoder_ffn), nn.ReLU(), nn.Linear(size.decoder_ffn, d))
        self.norm3 = nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                attn_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, Q, D), query_pos: (Q, D), memory: (B, S, D), memory_pos: (S, D),
        attn_mask: (B*heads, Q, S) bool, True = not attended -> (B, Q, D)."""
        attended = self.cross_attn(x + query_pos, memory + memory_pos, memory, attn_mask=attn_mask,
                                   need_weights=False)[0]
        x = self.norm1(x + attended)
        q = x + query_pos
        x = self.norm2(x + self.self_attn(q, q, x, need_weights=False)[0])
        return self.norm3(x + self.ffn(x))


class MaskedAttentionDecoder(nn.Module):
    """Learned queries refined level by level (round-robin, lowest resolution first); a prediction after
    every layer (and one before the first), each masking the next layer's cross-attention."""

    def __init__(self, size: Mask2FormerSize, num_classes: int):
        super().__init__()
        d, self.heads = size.width, size.heads
        self.query_feat = nn.Embedding(size.queries, d)  # the queries' starting content
        self.query_embed = nn.Embedding(size.queries, d)  # their position encoding, added in every attention
        self.level_embed = nn.Embedding(M2F_LEVELS, d)
        self.layers = nn.ModuleList([MaskedAttentionLayer(size) for _ in range(size.decoder_layers)])
        self.norm = nn.LayerNorm(d)
        self.class_embed = nn.Linear(d, num_classes + 1)  # + no-object
        self.mask_embed = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))

    def predict(self, x: torch.Tensor, mask_features: torch.Tensor, attn_size: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, Q, D), mask_features: (B, D, 4h, 4w) -> class logits (B, Q, K+1), mask logits (B, Q, 4h, 4w),
        and the next layer's attention mask (B, Q, h_l·w_l) bool (True = background, not attended)."""
        x = self.norm(x)
        pred_logits = self.class_embed(x)  # (B, Q, K+1)
        pred_masks = torch.einsum("bqd,bdhw->bqhw", self.mask_embed(x), mask_features)  # (B, Q, 4h, 4w)
        # the mask only steers attention, it gets no gradient from it; sigmoid < 0.5 ⇔ logit < 0
        attn = F.interpolate(pred_masks.detach(), size=attn_size, mode="bilinear", align_corners=False)
        return pred_logits, pred_masks, attn.flatten(2) < 0

    def forward(self, levels: list[torch.Tensor], mask_features: torch.Tensor) -> dict:
        """levels: [stride 32, 16, 8] each (B, D, h_l, w_l); mask_features: (B, D, 4h, 4w) -> outputs dict."""
        b, d = mask_features.shape[:2]
        shapes = [tuple(x.shape[-2:]) for x in levels]
        memory = [x.flatten(2).transpose(1, 2) + embed for x, embed in zip(levels, self.level_embed.weight)]
        memory_pos = [sine_position_encoding(h, w, d, x.device).to(x.dtype) for (h, w), x in zip(shapes, memory)]
        x = self.query_feat.weight[None].expand(b, -1, -1)  # (B, Q, D)
        query_pos = self.query_embed.weight  # (Q, D)
        pred_logits, pred_masks, attn_mask = self.predict(x, mask_features, shapes[0])
        predictions = [(pred_logits, pred_masks)]
        for i, layer in enumerate(self.layers):
            level = i % M2F_LEVELS
            # a query whose mask is empty at this level would attend to nothing (NaN): let it attend everywhere
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            attn_mask = attn_mask.repeat_interleave(self.heads, dim=0)  # (B*heads, Q, S), image-major like MHA
            x = layer(x, query_pos, memory[level], memory_pos[level], attn_mask)
            pred_logits, pred_masks, attn_mask = self.predict(x, mask_features, shapes[(i + 1) % M2F_LEVELS])
            predictions.append((pred_logits, pred_masks))
        return {"pred_logits": pred_logits, "pred_masks": pred_masks,
                "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in predictions[:-1]]}


class Mask2FormerHead(nn.Module):
    """Everything after the ViT: simple feature pyramid → pixel decoder → masked-attention decoder."""

    def __init__(self, embed_dim: int, num_classes: int, size: Mask2FormerSize):
        """
        Args:
            embed_dim: C, channels of the ViT taps.
            num_classes: K (a no-object class is added).
            size: widths and depths, e.g. M2F_SIZES["L"].
        """
        super().__init__()
        self.pyramid = SimpleFeaturePyramid(embed_dim, size.width)
        self.pixel_decoder = PixelDecoder(size)
        self.decoder = MaskedAttentionDecoder(size, num_classes)

    def forward(self, taps: list[torch.Tensor]) -> dict:
        """Predict masks and classes.

        Args:
            taps: four ViT features, shallow to deep, each (B, C, h, w).

        Returns:
            dict with pred_logits (B, Q, K+1), pred_masks (B, Q, 4h, 4w) mask logits, and aux_outputs: a list
            of decoder_layers dicts with the same two keys, from the earlier predictions (deep supervision).
        """
        mask_features, levels = self.pixel_decoder(self.pyramid(taps))
        return self.decoder(levels, mask_features)


class Mask2Former(nn.Module):
    """ViT backbone + Mask2Former head: images (B, 3, H, W) -> dict of class logits and mask logits (stride p/4)."""

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, num_classes: int, size: Mask2FormerSize):
        super().__init__()
        self.arch = "mask2former"
        self.patch_size = spec.patch_size
        self.num_classes = num_classes
        self.taps = list(spec.taps)
        self.backbone = backbone
        self.head = Mask2FormerHead(backbone.embed_dim, num_classes, size)

    def forward(self, images: torch.Tensor) -> dict:
        """images (B, 3, H, W) -> pred_logits (B, Q, K+1), pred_masks (B, Q, 4h, 4w), aux_outputs (see the head)."""
        check_patch_multiple(images, self.patch_size)
        taps = self.backbone.forward_intermediates(
            images, indices=self.taps, norm=True, output_fmt="NCHW", intermediates_only=True)  # 4 × (B, C, h, w)
        return self.head(taps)


def build_mask2former(backbone: nn.Module, spec: BackboneSpec, num_classes: int) -> Mask2Former:
    """Mask2Former on a built ViT, head size from M2F_HEAD_SIZES (called by build_model).

    Args:
        backbone: the timm ViT.
        spec: its BACKBONES entry (patch size, taps).
        num_classes: K.

    Returns:
        The model; model.head holds every non-backbone parameter.
    """
    name = next(name for name, other in BACKBONES.items() if other == spec)
    return Mask2Former(backbone, spec, num_classes, M2F_SIZES[M2F_HEAD_SIZES[name]])


# -- set loss: Hungarian matching on sampled points, CE + BCE + dice on every prediction --

def semantic_to_targets(label: torch.Tensor, num_classes: int, ignore_index: int = data.IGNORE_INDEX) -> list[dict]:
    """Turn label maps into Mask2Former targets: one binary mask per class present in an image.

    Args:
        label: (B, H, W) int64 class ids, ignore_index = no label.
        num_classes: K; other values raise ValueError.
        ignore_index: value of unlabelled pixels (covered by no mask).

    Returns:
        B dicts with labels (n,) int64 (sorted) and masks (n, H, W) float32 in {0, 1}.
    """
    targets = []
    for image_label in label:
        classes = torch.unique(image_label)
        classes = classes[classes != ignore_index]
        if classes.numel() and (classes.min() < 0 or classes.max() >= num_classes):
            raise ValueError(f"semantic_to_targets: label values must be in [0, {num_classes}) or "
                             f"{ignore_index}, got {classes.tolist()}")
        masks = (image_label[None] == classes[:, None, None]).float()  # (n, H, W)
        targets.append({"labels": classes, "masks": masks})
    return targets


def _point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """maps (N, C, H, W), coords (N, P, 2) as (x, y) in [0, 1] -> (N, C, P), bilinear, align_corners=False."""
    return F.grid_sample(maps, 2 * coords[:, :, None] - 1, mode="bilinear", align_corners=False).squeeze(3)


def _importance_points(logits: torch.Tensor, num_points: int, oversample_ratio: float,
                       importance_sample_ratio: float) -> torch.Tensor:
    """PointRend sampling: the most uncertain of oversampled random points, plus fresh random ones.

    logits (M, 1, h, w) -> coords (M, P, 2). Random draws in the reference's order and shapes.
    """
    m = logits.shape[0]
    coords = torch.rand(m, int(num_points * oversample_ratio), 2, device=logits.device)  # (M, 3P, 2)
    uncertainty = -_point_sample(logits, coords)[:, 0].abs()  # (M, 3P), highest where the logit is near 0
    num_uncertain = int(importance_sample_ratio * num_points)
    top = uncertainty.topk(num_uncertain, dim=1).indices  # (M, 0.75P)
    coords = coords.gather(1, top[..., None].expand(-1, -1, 2))  # (M, 0.75P, 2)
    return torch.cat([coords, torch.rand(m, num_points - num_uncertain, 2, device=logits.device)], dim=1)


def _pairwise_costs(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (Q, P), labels (n, P), weight (P,) in [0, 1] (0 = ignored point) -> BCE and dice costs, each (Q, n)."""
    # BCE against 1 and against 0 at every point, mixed by the labels through a matmul; mean over valid points
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none") * weight
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * weight
    cost_bce = (pos @ labels.T + neg @ (1 - labels).T) / weight.sum().clamp_min(1e-6)  # 1e-6: no valid point
    probs = logits.sigmoid() * weight  # (Q, P)
    cost_dice = 1 - (2 * probs @ labels.T + 1) / (probs.sum(-1)[:, None] + (labels * weight).sum(-1)[None] + 1)
    return cost_bce, cost_dice


@torch.no_grad()
def hungarian_match(pred_logits: torch.Tensor, pred_masks: torch.Tensor, targets: list[dict], *,
                    cost_class: float, cost_mask: float, cost_dice: float, num_points: int,
                    valid_masks: list[torch.Tensor] | None = None, point_coords: torch.Tensor | None = None
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One-to-one assignment of queries to targets minimising class + BCE + dice costs (scipy).

    Args:
        pred_logits: (B, Q, K+1) class logits.
        pred_masks: (B, Q, h, w) mask logits.
        targets: B dicts, labels (n,) int64 and masks (n, H, W).
        cost_class, cost_mask, cost_dice: weights of -p(class), the mean BCE and the dice loss.
        num_points: P uniform random points per image at which masks are compared.
        valid_masks: B × (H, W) bool, False = ignored pixel (left out of the mask costs), or None.
        point_coords: (P, 2) fixed (x, y) points in [0, 1] instead of random ones, or None.

    Returns:
        B pairs (query indices (m,), target indices (m,)) int64, m = min(Q, n), sorted by query.
    """
    indices = []
    for b, target in enumerate(targets):
        # drawn even for an image without targets, so the random stream stays in step with the reference
        coords = torch.rand(1, num_points, 2, device=pred_masks.device) if point_coords is None \
            else point_coords[None].to(pred_masks)  # (1, P, 2)
        n = len(target["labels"])
        if n == 0:
            indices.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))
            continue
        logits = _point_sample(pred_masks[b][None], coords)[0]  # (Q, P)
        labels = _point_sample(target["masks"][None].to(logits), coords)[0]  # (n, P)
        weight = torch.ones_like(logits[0]) if valid_masks is None else \
            _point_sample(valid_masks[b][None, None].to(logits), coords)[0, 0]  # (P,)
        cost_bce, cost_dc = _pairwise_costs(logits, labels, weight)
        cost_cls = -pred_logits[b].softmax(-1)[:, target["labels"]]  # (Q, n), 1 - p up to a constant
        cost = cost_mask * cost_bce + cost_class * cost_cls + cost_dice * cost_dc
        # a non-finite cost (diverged model) is matched last instead of crashing scipy
        big = torch.finfo(cost.dtype).max
        rows, cols = linear_sum_assignment(torch.nan_to_num(cost, nan=big, posinf=big, neginf=big).cpu().numpy())
        indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return indices


def _class_loss(pred_logits: torch.Tensor, targets: list[dict], indices: list, no_object_weight: float,
                skip_empty_ce: bool) -> torch.Tensor:
    """Weighted CE over all queries: matched ones to their target class, the others to no-object."""
    b, q, k1 = pred_logits.shape
    target_classes = torch.full((b, q), k1 - 1, dtype=torch.int64, device=pred_logits.device)  # (B, Q)
    for i, (target, (src, tgt)) in enumerate(zip(targets, indices)):
        target_classes[i, src.to(pred_logits.device)] = target["labels"][tgt].to(pred_logits.device)
    keep = torch.tensor([not skip_empty_ce or len(t["labels"]) > 0 for t in targets], device=pred_logits.device)
    if not keep.any():
        return pred_logits.sum() * 0  # nothing to learn from, but keep the graph for backward
    weight = torch.ones(k1, device=pred_logits.device)
    weight[-1] = no_object_weight
    return F.cross_entropy(pred_logits[keep].transpose(1, 2), target_classes[keep], weight)


def _mask_losses(pred_masks: torch.Tensor, targets: list[dict], indices: list, num_masks: torch.Tensor, *,
                 num_points: int, oversample_ratio: float, importance_sample_ratio: float,
                 valid_masks: list[torch.Tensor] | None, point_coords: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean point BCE and dice of the matched masks, each summed over pairs and divided by num_masks."""
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])  # (M,)
    query = torch.cat([src for src, _ in indices])  # (M,)
    if len(batch) == 0:
        zero = pred_masks.sum() * 0  # no target in the batch: zero, still in the graph
        return zero, zero
    pred = pred_masks[batch, query][:, None]  # (M, 1, h, w)
    with torch.no_grad():  # where to look and what the answer is carry no gradient
        truth = torch.cat([t["masks"][tgt] for t, (_, tgt) in zip(targets, indices)])[:, None].to(pred)
        # truth: (M, 1, H, W)
        if point_coords is None:
            coords = _importance_points(pred, num_points, oversample_ratio, importance_sample_ratio)  # (M, P, 2)
        else:
            coords = point_coords[None].to(pred).expand(len(batch), -1, -1)  # (M, P, 2)
        labels = _point_sample(truth, coords)[:, 0]  # (M, P)
        if valid_masks is None:
            weight = torch.ones_like(labels)
        else:
            valid = torch.stack(valid_masks)[batch.to(pred.device)][:, None].to(pred)  # (M, 1, H, W)
            weight = _point_sample(valid, coords)[:, 0]  # (M, P) in [0, 1], 0 = ignored
    logits = _point_sample(pred, coords)[:, 0]  # (M, P)
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weight
    loss_mask = (bce.sum(1) / weight.sum(1).clamp_min(1e-6)).sum() / num_masks  # 1e-6: a mask with no valid point
    probs = logits.sigmoid() * weight
    dice = 1 - (2 * (probs * labels).sum(1) + 1) / (probs.sum(1) + (labels * weight).sum(1) + 1)
    return loss_mask, dice.sum() / num_masks


def mask2former_loss(outputs: dict, targets: list[dict], *, class_weight: float = 2.0, mask_weight: float = 5.0,
                     dice_weight: float = 5.0, no_object_weight: float = 0.1, cost_class: float = 1.0,
                     cost_mask: float = 1.0, cost_dice: float = 1.0, num_points: int = 12544,
                     oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                     valid_masks: list[torch.Tensor] | None = None, point_coords: torch.Tensor | None = None,
                     skip_empty_ce: bool = False) -> dict[str, torch.Tensor]:
    """Mask2Former's set loss on the final prediction and every auxiliary one (deep supervision).

    Each prediction is matched to the targets on its own (`hungarian_match`), then: CE over all queries
    (unmatched = no-object, weighted no_object_weight), and on matched pairs the mean BCE and the dice loss
    at num_points points, mostly where the predicted mask is uncertain. Random points are drawn in the
    reference's order (final prediction first, per image for matching, then per pair for the loss), so with
    the same seed the terms equal transformers' Mask2FormerLoss.

    Args:
        outputs: the model's dict: pred_logits (B, Q, K+1), pred_masks (B, Q, h, w), aux_outputs.
        targets: B dicts with labels (n,) int64 and masks (n, H, W) float, e.g. from semantic_to_targets.
        class_weight, mask_weight, dice_weight: loss weights (labelled: 2 / 5 / 5; synthetic as the reference
            code runs it: 2 / 5 / 2, train.py M2F_SYNTHETIC).
        no_object_weight: CE weight of the no-object class (labelled 0.1, synthetic 0.02).
        cost_class, cost_mask, cost_dice: matching weights (labelled: 1 / 1 / 1, the reference code's
            HungarianMatcher defaults; Mask2Former's own configs use 2 / 5 / 5; synthetic: 1 / 1 / 0).
        num_points, oversample_ratio, importance_sample_ratio: point sampling (12544, 3, 0.75).
        valid_masks: B × (H, W) bool, False = ignored pixel, left out of the mask costs and losses. None
            counts every pixel, ignored ones as negatives — what the reference's synthetic branch does
            (train.py --m2f-ignore-as-negative).
        point_coords: (P, 2) fixed (x, y) points in [0, 1] for every mask and prediction instead of random
            and importance-sampled ones, or None.
        skip_empty_ce: leave images without targets out of the CE (the reference's synthetic branch).

    Returns:
        loss_ce, loss_mask, loss_dice (final prediction), the same with suffix _i for aux_outputs[i],
        and loss: the weighted sum of all of them.
    """
    # the average number of targets per rank normalises the mask terms; all-reduced on every rank alike
    num_masks = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=outputs["pred_logits"].device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(num_masks)
        num_masks = num_masks / torch.distributed.get_world_size()
    num_masks = num_masks.clamp_min(1)
    predictions = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
    losses, total = {}, 0
    # float32 whatever the caller's autocast (as Mask2Former's matcher): bf16 cost matmuls could flip matches
    with torch.autocast(outputs["pred_logits"].device.type, enabled=False):
        for suffix, prediction in predictions:
            pred_logits, pred_masks = prediction["pred_logits"].float(), prediction["pred_masks"].float()
            indices = hungarian_match(pred_logits, pred_masks, targets, cost_class=cost_class, cost_mask=cost_mask,
                                      cost_dice=cost_dice, num_points=num_points, valid_masks=valid_masks,
                                      point_coords=point_coords)
            loss_mask, loss_dice = _mask_losses(pred_masks, targets, indices, num_masks, num_points=num_points,
                                                oversample_ratio=oversample_ratio,
                                                importance_sample_ratio=importance_sample_ratio,
                                                valid_masks=valid_masks, point_coords=point_coords)
            loss_ce = _class_loss(pred_logits, targets, indices, no_object_weight, skip_empty_ce)
            losses.update({f"loss_ce{suffix}": loss_ce, f"loss_mask{suffix}": loss_mask,
                           f"loss_dice{suffix}": loss_dice})
            total = total + class_weight * loss_ce + mask_weight * loss_mask + dice_weight * loss_dice
    losses["loss"] = total
    return losses


if __name__ == "__main__":
    main()
