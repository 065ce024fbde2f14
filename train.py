"""SENSE training: real labelled images + synthetic images with OT pseudo-labels from an EMA teacher.

Paper: SENSE (ICML 2026), method: "OT assignment", "pixel- and query-based segmenters", "loss & training";
docs/training.md "One step" (one iteration, stage by stage) and docs/models.md "Mask2Former" (its branch).

    python train.py                                          # toy world, DPT on the toy ViT, CPU, minutes
    python train.py --method supervised                      # real images only (B per step; --real-batch 16: 2B)
    python train.py --method pseudo                          # hard argmax pseudo-labels (no OT)
    python train.py --method soft                            # the teacher's probabilities as targets (no OT)
    python train.py --pretrained none                        # the toy ViT from random init instead of pretrained
    python train.py --arch mask2former                       # compact Mask2Former on the toy world
    python train.py --dataset cityscapes --arch dpt --synthetic data/synthetic/cityscapes/synthetic.txt
    torchrun --nproc_per_node 8 train.py --dataset ade20k --arch mask2former --synthetic S.txt
    python train.py --out runs/my_run --resume auto          # continue a killed run

One step (B real + B synthetic images), numbered as in sense_step and main (the method first, the machinery below it):
  1. batches  2. the EMA teacher (TTA) on the weak synthetic views  3. CutMix of strong views and teacher outputs
  4. OT: soft pseudo-labels and the γ gate (ot.py)  5. the student on [x; u_s]  6. L_x (CE / OHEM / set loss),
  L_u (soft CE on the OT targets / query loss on hard OT labels), L = (L_x + L_u) / 2  7. backward
  8. AdamW step, poly lr  9. EMA update; then log, panels, evaluation, checkpoint (machinery)
Faults: a step whose L_x or L_u is not finite is skipped whole (no parameter, optimizer or EMA change; `skipped` in
the log) and 10 in a row stop the run with last.pt at the last good step; a sample that cannot be decoded stops the
run with one line naming the file, after saving last.pt at the last finished step (--resume auto continues).

Shapes: B images per stream, K classes, H×W crop (c×c), Q queries.
"""
import argparse
import gc
import json
import math
import os
import signal
import sys
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from tqdm import tqdm

import data
import model as models
from eval import confusion_matrix, evaluate, format_table
from ot import ot_pseudo_labels, soft_cross_entropy

# Per-dataset presets (paper, experiments). Flags left unset take these values.
DATASET_PRESETS = {
    #              crop (dpt, m2f), epochs, batch per stream, OHEM, teacher TTA
    "toy": dict(crop={"dpt": 64, "mask2former": 64}, epochs=None, batch_size=8, ohem=False, tta="flip"),
    "toy_lt": dict(crop={"dpt": 64, "mask2former": 64}, epochs=None, batch_size=8, ohem=False, tta="flip"),
    "cityscapes": dict(crop={"dpt": 798, "mask2former": 768}, epochs=180, batch_size=8, ohem=True, tta="flip"),
    "ade20k": dict(crop={"dpt": 518, "mask2former": 640}, epochs=60, batch_size=8, ohem=False, tta="scales"),
    "coco": dict(crop={"dpt": 518, "mask2former": 640}, epochs=20, batch_size=16, ohem=False, tta="scales"),
}
ARCH_PRESETS = {
    # backbone lr, head lr multiplier, AdamW weight decay, OT class marginal, what the γ gate reads (DPT: the
    # teacher, the paper's text; Mask2Former: the OT plan, as the reference code's query branch runs), backbone
    "dpt": dict(lr=5e-6, head_lr_mult=40.0, weight_decay=0.01, ot_marginal="present", ot_gate="teacher",
                backbone="dinov2_s"),
    "mask2former": dict(lr=5e-6, head_lr_mult=10.0, weight_decay=0.05, ot_marginal="uniform", ot_gate="plan",
                        backbone="dinov3_l"),
}
# Toy-only choices, each with its reason:
#   iters 1800: a fixed number of steps whatever the synthetic set's size, so every study compares equal compute
#     (an epoch over the real set is 2.5 steps: the 20 labelled images are seen 720 times), and the longest
#     schedule whose first run stays near 5 minutes on 2 CPU cores (bench.py train: ~135 ms a step). The criterion
#     the schedule is measured against, the smallest step count at which supervised_B gains at most 0.5 mIoU from
#     doubling its steps, gives 3600 (3 seeds gain 2.3 from 900 to 1800, 1.3 from 1800 to 3600, -0.3 from 3600 to
#     7200; docs/toy_study.md, "The schedule"), a first run of about 8 minutes; SENSE leads supervised_B by 2.0 at 1800;
#   lr 5e-4, head ×4: the pretrained toy ViT is 4 blocks of width 128, far from DINOv2's 5e-6 regime (1e-3 with
#     head ×10 diverged); from random init (--pretrained none) the backbone takes 5e-4 and head ×2;
#   EMA λ_max 0.98: 0.996 averages over ~250 steps, a seventh of the run; 0.98 (~50 steps) keeps the teacher as
#     near the student as 0.996 is in the paper's runs of tens of thousands of steps;
#   evaluation every 300 steps: 6 evaluations of 100 images, each with the in-loop gate per class since the last.
TOY_OPTIM = dict(lr=5e-4, head_lr_mult=4.0)
TOY_OPTIM_RANDOM_INIT = dict(lr=5e-4, head_lr_mult=2.0)
TOY_SCHEDULE = dict(iters=1800, eval_every=300, ema_decay=0.98)
EMA_DECAY = 0.996  # λ_max of the EMA teacher (paper)
# Mask2Former synthetic branch (as the reference code runs it): matching costs and loss weights. The paper and the
# reference's weight dict give dice 0, but the reference sums its loss terms by key name and "loss_dice" contains
# "ce", so every dice term is added to the CE sum with the CE weight 2 (sense_mask2former.py): dice 2 is what ran.
# dice_weight=0.0 here gives the paper's text.
M2F_SYNTHETIC = dict(cost_class=1.0, cost_mask=1.0, cost_dice=0.0, class_weight=2.0, mask_weight=5.0,
                     dice_weight=2.0, no_object_weight=0.02, skip_empty_ce=True)
# Mask2Former parameters trained without AdamW weight decay, matched by name: the learned queries and the level
# embeddings of both transformers (reference code, sense_mask2former.py's optimizer groups)
NO_WEIGHT_DECAY = ("query_feat", "query_embed", "level_embed")
METHODS = ("supervised", "pseudo", "soft", "sense", "truth", "truth_gated")
# Controls of the toy world, which stores the true layout of every synthetic image: `truth` trains L_u on the true
# layout of every valid pixel (the upper bound of any pseudo-labeller), `truth_gated` on the true layout of the pixels
# the teacher's γ gate passes (what the gate's choice of pixels does, with no label noise).
TRUTH_METHODS = ("truth", "truth_gated")
OHEM_THRESH, OHEM_MIN_KEPT = 0.7, 200_000  # Cityscapes OHEM (UniMatch / SENSE reference code)
# Flag ranges checked before the presets fill in unset values (a 0 would be taken for unset)
AT_LEAST_1 = ("iters", "batch_size", "real_batch", "crop_size", "eval_every", "save_every", "log_every", "grad_accum",
              "ot_iters")
AT_LEAST_0 = ("workers", "panel_every", "lr", "head_lr_mult", "weight_decay", "poly_power", "clip_grad")
IN_0_1 = ("conf_thresh", "ema_decay", "ot_min_prob")
RESUME_MACHINERY = ("out", "resume", "workers", "device", "log_every", "panel_every", "save_every", "eval_every",
                    "pretrained")  # flags whose change on resume is no news (the weights come from the checkpoint)
NONFINITE_LIMIT = 10  # steps in a row with a non-finite loss that stop a run (each one alone is skipped)
PANEL_SAMPLES = 4  # synthetic samples drawn in each picture panel
PANEL_SCALE = 3  # each crop drawn 3× (nearest), so a class of students can read a 64-pixel toy crop
PANEL_LINE = 14  # pixels of one text line (PIL's default font is 11 px high)
# The "OT changed" column: where the target's label differs from the teacher's argmax
CHANGED_COLOURS = {"unchanged": (60, 60, 60), "changed, trained on": (255, 40, 40),
                   "changed, not trained on": (255, 220, 0)}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, in seven groups: data, model, method, optimisation, evaluation, system, output.

    A flag left unset stays None here and takes its value from the dataset and arch presets in resolve_presets, so
    that one set of defaults serves the toy world and the paper's datasets; the defaults written in each help text
    are the paper's (or the reference code's, where it is what ran). given_flags keeps what the user typed.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="toy", choices=sorted(DATASET_PRESETS), help="dataset (default: toy)")
    g.add_argument("--data-root", default=None, help="dataset root (default: data/<dataset>)")
    g.add_argument("--synthetic", default=None,
                   help="synthetic images: folder, split file or generate.py manifest (default: <data-root>/synthetic.txt)")
    g.add_argument("--train-split", default="train", help="labelled split (default: train)")
    g.add_argument("--val-split", default="val", help="evaluation split (default: val)")
    g.add_argument("--crop-size", type=int, default=None, help="c, square crop (default: preset, e.g. 798 Cityscapes DPT)")
    g.add_argument("--ade-reduced", action="store_true", help="ADE20K masks are already 0..149 (default: raw 0..150)")
    g.add_argument("--workers", type=int, default=None,
                   help="data loader workers per stream (default: 4 on CUDA, 0 on CPU, where they compete with the model)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="dpt", choices=models.ARCHS, help="segmenter (default: dpt)")
    g.add_argument("--backbone", default=None, choices=sorted(models.BACKBONES),
                   help="backbone (default: toy on the toy world, dinov2_s for dpt, dinov3_l for mask2former)")
    g.add_argument("--pretrained", default=None,
                   help="backbone weight file, or 'none' for random init (default: pretrained/<official name>; "
                        "the toy ViT's file ships in pretrained/, made anew if missing)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="sense", choices=METHODS,
                   help="supervised: real only; pseudo: hard labels (argmax); soft: the teacher's probabilities; "
                        "sense: OT targets; truth / truth_gated (toy world): the true layouts on every pixel / on "
                        "the pixels the teacher's gate passes (default: sense)")
    g.add_argument("--real-batch", type=int, default=None,
                   help="real images per step (default: B, the paper's baseline too; 2B gives supervised SENSE's compute)")
    g.add_argument("--conf-thresh", type=float, default=0.95, help="γ (and δ for Mask2Former), confidence gate (default: 0.95)")
    g.add_argument("--ot-beta", type=float, default=0.05, help="β, entropic regularisation (default: 0.05)")
    g.add_argument("--ot-iters", type=int, default=3, help="Sinkhorn iterations (default: 3, the reference code)")
    g.add_argument("--ot-scope", default="batch", choices=("image", "batch"),
                   help="one OT problem per image or per batch (all ranks) (default: batch, the reference code)")
    g.add_argument("--ot-marginal", default=None, choices=("uniform", "present", "prior"),
                   help="class marginal: uniform, present (classes the teacher sees), prior (the labelled split's "
                        "class pixel frequencies) (default: present for dpt, uniform for mask2former)")
    g.add_argument("--ot-gate", default=None, choices=("teacher", "plan"),
                   help="γ gate on the teacher's probabilities or on the OT plan's rows (default: teacher for dpt, "
                        "the paper; plan for mask2former, the reference code)")
    g.add_argument("--ot-min-prob", type=float, default=0.01, help="threshold of 'present' classes (default: 0.01)")
    g.add_argument("--tta", default=None, choices=("none", "flip", "scales"),
                   help="teacher TTA on half the synthetic batch (default: flip Cityscapes/toy, scales×flip ADE20K/COCO)")
    g.add_argument("--no-cutmix", action="store_true", help="disable CutMix of the strong views (default: on)")
    g.add_argument("--ema-decay", type=float, default=None, help="λ_max of the EMA teacher (default: 0.996; toy 0.98)")
    g.add_argument("--ohem", default=None, choices=("on", "off"), help="OHEM for L_x (default: on for Cityscapes)")
    g.add_argument("--m2f-ignore-as-negative", action="store_true",
                   help="count ignored synthetic pixels as mask negatives, as the reference code (default: excluded)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=None, help="total steps (default: preset epochs over the synthetic set)")
    g.add_argument("--batch-size", type=int, default=None, help="B, images per stream per rank (default: preset, 8)")
    g.add_argument("--lr", type=float, default=None, help="backbone learning rate (default: 5e-6; toy 5e-4)")
    g.add_argument("--head-lr-mult", type=float, default=None, help="head lr / backbone lr (default: 40 dpt, 10 mask2former)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: 0.01 dpt, 0.05 mask2former)")
    g.add_argument("--poly-power", type=float, default=0.9, help="poly schedule power (default: 0.9)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--clip-grad", type=float, default=0.0, help="gradient-norm clipping before the step, 0 = off (default: 0)")
    g.add_argument("--lock-backbone", action="store_true", help="freeze the backbone (default: trained)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=None, help="steps between evaluations of the EMA teacher (default: every epoch, best kept in best.pt; toy: 300)")
    g.add_argument("--eval-mode", default="single", choices=("single", "slide", "ms"), help="inference mode (default: single)")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1 ... (default: auto)")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="autocast (default: bf16 on CUDA, off on CPU)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run folder (default: runs/<dataset>_<arch>_<method>)")
    g.add_argument("--resume", default=None, help="'auto' (<out>/last.pt if present) or a checkpoint path (default: none)")
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines (default: 10)")
    g.add_argument("--panel-every", type=int, default=None, help="steps between picture panels, 0 = off (default: eval-every)")
    g.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: eval-every)")
    return p.parse_args(argv)


def given_flags(args: argparse.Namespace) -> dict:
    """The flags set on the command line (values other than the parser's defaults), as given: resolve_presets
    replaces an unset value, and would replace a 0 too."""
    defaults = vars(parse_args([]))
    return {key: value for key, value in vars(args).items() if value != defaults[key]}


def check_flags(args: argparse.Namespace, given: dict) -> list[str]:
    """Refuse values that would be replaced or ignored without a word (ValueError, one line); return a warning for
    each given flag that has no effect on this run (refusing it would break sweeps that pass common flags).

    Args:
        args: resolved flags (resolve_presets).
        given: given_flags before the presets.
    Returns:
        Warning lines, to print once.
    """
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        if (key in AT_LEAST_1 and value < 1) or (key in AT_LEAST_0 and value < 0):
            raise ValueError(f"{flag} {value}: must be at least {1 if key in AT_LEAST_1 else 0}")
        if (key in IN_0_1 and not 0 <= value <= 1) or (key == "ot_beta" and not value > 0):
            raise ValueError(f"{flag} {value}: must be {'in [0, 1]' if key in IN_0_1 else 'positive'}")
    if args.method in TRUTH_METHODS and args.dataset not in data.TOY_WORLDS:
        raise ValueError(f"--method {args.method}: a control of the toy world (only the toy world stores the true "
                         f"layouts of its synthetic images), got --dataset {args.dataset}")
    unused = {}  # flag -> why it does nothing here
    ot_flags = ("ot_beta", "ot_iters", "ot_scope", "ot_marginal", "ot_gate", "ot_min_prob")
    if args.method == "supervised":
        for key in ("conf_thresh", "tta", "no_cutmix", "m2f_ignore_as_negative", "panel_every", *ot_flags):
            unused[key] = "--method supervised trains on no synthetic image"
        if "iters" in given:
            unused["synthetic"] = "with --method supervised it only sets the steps of an epoch, and --iters sets them"
    elif args.method != "sense":
        for key in ot_flags:
            unused[key] = f"--method {args.method} uses no OT"
        if args.method == "truth":
            unused["conf_thresh"] = "--method truth trains on every valid pixel"
    elif args.ot_marginal != "present":
        unused["ot_min_prob"] = (f"it sets which classes are present, and --ot-marginal {args.ot_marginal} does "
                                 f"not read them")
    if args.arch == "dpt":
        unused["m2f_ignore_as_negative"] = "--arch dpt has no mask loss"
    else:
        unused["ohem"] = "with --arch mask2former L_x is the set loss"
    if args.dataset != "ade20k":
        unused["ade_reduced"] = f"only ADE20K masks have a zero label to reduce, and this is --dataset {args.dataset}"
    # one sentence per flag: "--flag has no effect: <why>."
    warnings = [f"--{key.replace('_', '-')} has no effect: {why}." for key, why in unused.items() if key in given]
    if args.arch == "mask2former" and args.method == "soft":
        warnings.append("--method soft with --arch mask2former trains as --method pseudo: the query loss takes the "
                        "hard labels of the teacher's scores.")
    return warnings


def resolve_presets(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every flag the user left unset from the dataset and arch presets.

    Order of precedence: the command line, then the toy-only choices (TOY_OPTIM, TOY_SCHEDULE) on the toy world,
    then the arch preset (lr, head multiplier, weight decay, OT marginal), then the dataset preset (crop, batch,
    TTA, OHEM). The resolved values are printed and saved in args.json, so a run folder says what it ran.
    """
    ds, arch = DATASET_PRESETS[args.dataset], ARCH_PRESETS[args.arch]
    toy = args.dataset in data.TOY_WORLDS
    args.data_root = args.data_root or f"data/{args.dataset}"
    args.synthetic = args.synthetic or str(Path(args.data_root) / "synthetic.txt")
    args.backbone = args.backbone or ("toy" if toy else arch["backbone"])
    args.crop_size = args.crop_size or ds["crop"][args.arch]
    args.batch_size = args.batch_size or ds["batch_size"]
    args.tta = args.tta or ds["tta"]
    args.ohem = args.ohem or ("on" if ds["ohem"] and args.arch == "dpt" else "off")  # Mask2Former's L_x has none
    args.ot_marginal = args.ot_marginal or arch["ot_marginal"]
    args.ot_gate = args.ot_gate or arch["ot_gate"]
    random_init = models.is_no_weights(args.pretrained)
    optim = {**arch, **((TOY_OPTIM_RANDOM_INIT if random_init else TOY_OPTIM) if args.backbone == "toy" else {}),
             **(TOY_SCHEDULE if toy else {})}
    args.lr = args.lr if args.lr is not None else optim["lr"]
    args.head_lr_mult = args.head_lr_mult if args.head_lr_mult is not None else optim["head_lr_mult"]
    args.weight_decay = args.weight_decay if args.weight_decay is not None else optim["weight_decay"]
    args.epochs = ds["epochs"]
    args.iters = args.iters or optim.get("iters")
    args.eval_every = args.eval_every or optim.get("eval_every")
    args.ema_decay = args.ema_decay if args.ema_decay is not None else optim.get("ema_decay", EMA_DECAY)
    args.out = args.out or f"runs/{args.dataset}_{args.arch}_{args.method}"
    return args


# ====================================================================================================================
# ALGO LOGIC: the method, in the order of one step (paper: "Method"; docs/training.md "One step"). The stages are numbered in
# sense_step and main as in the step list of the module docstring.
# ====================================================================================================================


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    """Poly schedule: base · (1 − step/total)^power, per iteration, no warm-up (paper: "loss & training").

    Applied to every parameter group's own base rate, so the head keeps its multiple of the backbone's rate.
    """
    return base * (1 - step / total) ** power


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, decay: float) -> None:
    """EMA over parameters and floating buffers with λ = min(1 − 1/(step+1), decay).

    The warm-up term 1 − 1/(step+1) makes the teacher the plain mean of the students so far early on (λ = 0 at the
    first step: the teacher becomes the student), until it reaches decay (λ_max, 0.996 in the paper). Integer buffers
    (counters) are copied.
    """
    lam = min(1 - 1 / (step + 1), decay)
    floats_t, floats_s = [], []
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values()):
        if t.is_floating_point():
            floats_t.append(t)
            floats_s.append(s.detach())
        else:
            t.copy_(s)
    # t = λ t + (1 − λ) s on every floating tensor at once (one foreach call each: 4× faster than a loop of
    # ~120 small tensors on a CPU, the same arithmetic)
    torch._foreach_mul_(floats_t, lam)
    torch._foreach_add_(floats_t, floats_s, alpha=1 - lam)


def cutmix(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Inside sample b's box, take sample B−1−b (step 3 of the loop).

    Args:
        x: (B, ...) with the last two dims H, W (images, scores, masks, labels).
        box: (B, H, W) bool.
    Returns:
        Tensor like x.
    """
    mask = box.view(box.shape[0], *([1] * (x.dim() - 3)), *box.shape[1:])  # broadcast over channel dims
    return torch.where(mask, x.flip(0), x)


def _teacher_view(teacher: nn.Module, images: torch.Tensor, size: tuple[int, int], flip: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One teacher pass: class scores (B, K, *size) in the frame of `images`, and Mask2Former's class logits
    (B, Q, K+1) (None for DPT). flip: the pass sees the mirrored images, its scores are mirrored back."""
    out = teacher(images.flip(-1) if flip else images)
    if teacher.arch == "dpt":
        scores, logits = (out if tuple(out.shape[-2:]) == tuple(size) else models.resize(out, size, "dpt")), None
    else:
        # summed over the queries at stride p/4, then upsampled straight to `size` (one resize per view)
        scores, logits = models.mask2former_scores(out, size), out["pred_logits"]
    return (scores.flip(-1) if flip else scores), logits


@torch.no_grad()
def teacher_predict(teacher: nn.Module, images: torch.Tensor, tta: str, tta_images: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher class scores on the weak views; TTA on the first half of the batch (step 2 of the loop), or on the
    first `tta_images` images (quality.py label: all of them).

    TTA views (reference code): flip, and for "scales" also the image resized to crop + round(0.25 crop / p) p
    (halves up), with and without flip; every view's scores are resized straight to the crop (models.resize:
    align_corners True for DPT, False for Mask2Former) and averaged. For Mask2Former the class logits
    (B, Q, K+1) are averaged over the same views, query by query, and the image gate reads them.

    Returns:
        scores (B, K, H, W) float32 (DPT logits / Mask2Former scores), and for Mask2Former the per-image mean over
        queries of the max class probability (no-object included) (B,) of the (view-averaged) class logits,
        else None.
    """
    patch, arch, size = teacher.patch_size, teacher.arch, tuple(images.shape[-2:])
    scores, logits = _teacher_view(teacher, images, size, flip=False)  # plain pass on the whole batch
    half = (images.shape[0] // 2 if tta_images is None else tta_images) if tta != "none" else 0
    if half:
        x = images[:half]
        views = [(scores[:half], None if logits is None else logits[:half]),  # the plain pass, reused
                 _teacher_view(teacher, x, size, flip=True)]
        if tta == "scales":
            big = [s + math.floor(0.25 * s / patch + 0.5) * patch for s in size]  # crop + round(0.25 crop / p) p
            x_big = models.resize(x, big, arch)  # (B/2, 3, *big)
            views += [_teacher_view(teacher, x_big, size, flip) for flip in (False, True)]
        scores = torch.cat([torch.stack([s.float() for s, _ in views]).mean(0), scores[half:].float()])
        if logits is not None:
            logits = torch.cat([torch.stack([c.float() for _, c in views]).mean(0), logits[half:].float()])
    query_conf = None if logits is None else logits.float().softmax(-1).amax(-1).mean(1)  # (B,)
    return scores.float(), query_conf


def teacher_probabilities(scores: torch.Tensor, arch: str) -> torch.Tensor:
    """The teacher's per-pixel class confidences without OT (--method pseudo / soft and the truth controls' gate),
    (B, K, H, W) -> (B, K, H, W), compared with γ (δ) as they are.

    DPT: the softmax of its logits, probabilities. Mask2Former: its scores Σ_q softmax(class_q)[:K] · sigmoid(mask_q)
    as they are: each query adds at most 1, so they lie in [0, Q] and need not sum to 1 over the classes (a sure
    teacher's scores lie near [0, 1]); they are not probabilities, and δ gates them directly. A softmax over them
    would put every pixel far below δ. (With OT, pseudo_targets gives them to ot.py as logits instead.)
    """
    return scores.softmax(1) if arch == "dpt" else scores


def pseudo_targets(scores: torch.Tensor, valid: torch.Tensor, args: argparse.Namespace,
                   class_marginal: str | torch.Tensor, truth: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The synthetic branch's targets and γ gate, by method (paper: "OT assignment"; the others are ablations).

    sense: OT plan rows (ot.ot_pseudo_labels), gate on the teacher (paper) or on the plan (--ot-gate plan);
    soft: the teacher's probabilities; pseudo: one-hot of the teacher's argmax (DPT; Mask2Former takes the hard
    label of its scores in any case). soft and pseudo gate on the teacher's maximum probability. The toy world's
    controls: truth, one-hot true layouts on every pixel with a true class; truth_gated, the same on the pixels that
    the teacher's gate passes (the gate of pseudo).

    Args:
        scores: (B, K, H, W) teacher scores (DPT logits / Mask2Former scores) of the CutMixed batch.
        valid: (B, H, W) bool, False on padding.
        class_marginal: "uniform", "present" or a (K,) tensor (the labelled set's frequencies).
        truth: (B, H, W) int64 true layouts (255 = none; CutMixed), for the truth controls only.
    Returns:
        targets (B, K, H, W) float32 (rows sum to 1 on valid pixels), gate (B, H, W) bool, log values.
    """
    if args.method == "sense":
        # Every argument explicit: a fixed iteration count (tol None) from the reference code's start. Mask2Former's
        # scores go in as logits (their log-softmax is the cost), as in the reference code, shifted by 1: log-softmax
        # ignores a constant, and ot.py refuses what looks like probabilities (entries in [0, 1] summing to 1 at every
        # pixel), which a sure Mask2Former teacher's scores can
        logits = scores if args.arch == "dpt" else scores + 1
        targets, gate, stats = ot_pseudo_labels(logits, valid, beta=args.ot_beta, iters=args.ot_iters,
                                                class_marginal=class_marginal, scope=args.ot_scope,
                                                min_prob=args.ot_min_prob, tol=None, start="reference",
                                                conf_thresh=args.conf_thresh, gate_on=args.ot_gate,
                                                group=dist.group.WORLD)  # under DDP: one problem over all ranks
        if args.arch == "mask2former" and args.ot_gate == "teacher":  # ot.py's teacher gate reads a softmax; a
            # Mask2Former teacher's confidence is its score itself (teacher_probabilities)
            gate = (scores.amax(1) >= args.conf_thresh) & valid & (targets.sum(1) > 0)
        return targets, gate, {"ot_err": stats["marginal_error"]}
    targets = teacher_probabilities(scores, args.arch)  # (B, K, H, W)
    gate = (targets.amax(1) >= args.conf_thresh) & valid
    if args.method in TRUTH_METHODS:
        known = valid & (truth != data.IGNORE_INDEX)  # (B, H, W)
        gate = known if args.method == "truth" else gate & known
        targets = F.one_hot(torch.where(known, truth, 0), targets.shape[1]).movedim(-1, 1).to(targets.dtype)
        return targets, gate, {}
    if args.method == "pseudo" and args.arch == "dpt":
        targets = F.one_hot(targets.max(1).indices, targets.shape[1]).movedim(-1, 1).to(targets.dtype)
    return targets, gate, {}


def synthetic_labels(targets: torch.Tensor, gate: torch.Tensor, query_conf: torch.Tensor | None,
                     args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The label each synthetic pixel is trained on (paper: "pixel- and query-based segmenters").

    Both architectures: the targets' argmax on the pixels the γ gate passes (pseudo_targets: on the teacher's
    confidence or, --ot-gate plan, on the plan's). DPT's loss then uses the soft targets there; Mask2Former's takes
    these hard labels, one target mask per class. Mask2Former also drops every image whose teacher is unsure of its
    queries (query_conf < δ, teacher_predict), except under --method truth, which trains on every true pixel. As in
    the reference code, image b's image gate covers the whole CutMixed image b, the box pasted from image B−1−b
    included.

    Args:
        targets: (B, K, H, W) from pseudo_targets. gate: (B, H, W) bool, its γ gate (False on padding).
        query_conf: (B,) Mask2Former's per-image confidence (not CutMixed), or None (DPT).
    Returns:
        label (B, H, W) int64 with 255 where nothing is trained on, and the gate of the pixels trained on.
    """
    if query_conf is not None and args.method != "truth":
        gate = gate & (query_conf >= args.conf_thresh)[:, None, None]  # (B, H, W): unsure images dropped whole
    # max(1).indices is argmax(1) (the first maximum), ~8× faster over the class dimension on a CPU
    return torch.where(gate, targets.max(1).indices, data.IGNORE_INDEX), gate


def ohem_cross_entropy(logits: torch.Tensor, label: torch.Tensor, thresh: float, min_kept: int) -> tuple[torch.Tensor, int]:
    """Online hard example mining CE: pixels whose true-class probability is <= max(thresh, the min_kept-th
    smallest such probability) (UniMatch's ProbOhemCrossEntropy2d).

    Args:
        logits: (B, K, H, W). label: (B, H, W) long, 255 = ignore.
    Returns:
        (mean CE over kept pixels, number of kept pixels).
    """
    valid = label != data.IGNORE_INDEX
    ce = F.cross_entropy(logits.float(), label, ignore_index=data.IGNORE_INDEX, reduction="none")  # (B, H, W)
    with torch.no_grad():
        prob = torch.exp(-ce)  # (B, H, W) probability of the true class
        if min_kept <= 0 or min_kept > int(valid.sum()):
            keep = valid  # too few pixels to mine from (or mining off): every valid pixel counts
        else:
            threshold = max(thresh, float(prob[valid].kthvalue(min_kept).values))
            keep = valid & (prob <= threshold)
    n = int(keep.sum())
    return (ce * keep).sum() / max(n, 1), n


def ddp_mean(mean: torch.Tensor, count: int, device: torch.device) -> torch.Tensor:
    """Turn a rank-local mean over `count` pixels into this rank's share of the mean over all ranks' pixels, so that
    DDP's gradient averaging gives the gradient of the global mean (equal to one process with the whole batch).

    Without a process group it returns the mean unchanged; with one, every rank must call it (one all-reduce).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return mean
    total = torch.tensor(float(count), device=device)
    dist.all_reduce(total)
    return mean * count * dist.get_world_size() / total.clamp_min(1)


def split_outputs(out, n: int):
    """Split a student output (tensor or Mask2Former dict) along the batch into the first n and the rest.

    The student runs once on [x; u_s] (stage 5): the first n entries are the real crops (L_x), the rest the strong
    views (L_u). Mask2Former's auxiliary predictions are split the same way, one per decoder layer.
    """
    if torch.is_tensor(out):
        return out[:n], out[n:]
    first = {k: v[:n] for k, v in out.items() if k != "aux_outputs"}
    rest = {k: v[n:] for k, v in out.items() if k != "aux_outputs"}
    first["aux_outputs"] = [split_outputs(aux, n)[0] for aux in out.get("aux_outputs", [])]
    rest["aux_outputs"] = [split_outputs(aux, n)[1] for aux in out.get("aux_outputs", [])]
    return first, rest


def param_groups(model: nn.Module, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: the backbone's trainable parameters at lr; the rest at lr · head_lr_mult, those
    named in NO_WEIGHT_DECAY (Mask2Former) without weight decay. Empty groups are left out; "base" keeps each
    group's lr before the poly schedule."""
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    head, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) not in backbone_ids:
            (no_decay if any(key in name for key in NO_WEIGHT_DECAY) else head).append(p)
    head_lr = lr * head_lr_mult
    groups = [dict(params=[p for p in model.backbone.parameters() if p.requires_grad], lr=lr, base=lr,
                   weight_decay=weight_decay),
              dict(params=head, lr=head_lr, base=head_lr, weight_decay=weight_decay),
              dict(params=no_decay, lr=head_lr, base=head_lr, weight_decay=0.0)]
    return [g for g in groups if g["params"]]


def supervised_loss(pred_x, label_x: torch.Tensor, args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """L_x on the real crops: cross-entropy (OHEM for Cityscapes) for DPT, the Mask2Former set loss.

    Args:
        pred_x: (B_x, K, H, W) DPT logits, or the Mask2Former output of the real crops (split_outputs).
        label_x: (B_x, H, W) int64, 255 = ignore.
    """
    if args.arch == "mask2former":
        return models.mask2former_loss(pred_x, models.semantic_to_targets(label_x, args.num_classes),
                                       num_points=m2f_points(args))["loss"]
    if args.ohem == "on":
        loss_x, n_x = ohem_cross_entropy(pred_x, label_x, OHEM_THRESH, OHEM_MIN_KEPT)
    else:
        n_x = int((label_x != data.IGNORE_INDEX).sum())  # sum / count: a crop of padding only gives 0
        loss_x = F.cross_entropy(pred_x.float(), label_x, ignore_index=data.IGNORE_INDEX, reduction="sum") / max(n_x, 1)
    return ddp_mean(loss_x, n_x, device)


def synthetic_loss(pred_u, targets: torch.Tensor, label: torch.Tensor, gate: torch.Tensor,
                   args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """L_u on the strong views, per architecture: DPT, soft cross-entropy against the targets on the gated pixels;
    Mask2Former, the synthetic set loss (M2F_SYNTHETIC) on one target mask per class of the hard labels.

    Args:
        pred_u: (B, K, H, W) DPT logits, or the Mask2Former output of the strong views.
        targets: (B, K, H, W) soft targets (DPT). label, gate: (B, H, W) from synthetic_labels.
    """
    if args.arch == "dpt":
        return soft_cross_entropy(pred_u, targets, gate, group=dist.group.WORLD)  # the mean over all ranks' pixels
    valid = None if args.m2f_ignore_as_negative else list(gate)  # ignored pixels out of the mask loss
    return models.mask2former_loss(pred_u, models.semantic_to_targets(label, args.num_classes), valid_masks=valid,
                                   num_points=m2f_points(args), **M2F_SYNTHETIC)["loss"]


def m2f_points(args: argparse.Namespace) -> int:
    """P, the points per mask of the Mask2Former set loss: the head size's (12544 for real backbones, 1024 toy)."""
    return models.M2F_SIZES[models.M2F_HEAD_SIZES[args.backbone]].loss_points


def sense_step(run: "Run") -> tuple[dict, bool, list[dict]]:
    """Stages 1–7 of one training step (paper: "Method"), run --grad-accum times: the gradients of the micro-batches
    add up (each loss divided by --grad-accum) for one optimizer step in main.

    Returns:
        The log values of the last micro-batch only (losses, mask_ratio, ot_err, image_ratio: each micro-batch
        overwrites them), whether every micro-batch's losses were finite, and per micro-batch the synthetic tensors
        the machinery measures and draws (record, draw_panel), with the student's output for the last one only.
    """
    args = run.args
    logs, finite, views = {}, True, []
    for _ in range(args.grad_accum):
        # 1. batches: B_x real crops (x, y); B synthetic crops: weak view, strong view, padding mask, CutMix box
        image_x, label_x = fetch(run, run.real_iter)  # (B_x, 3, c, c), (B_x, c, c)
        images = [image_x]  # what the student sees in stage 5
        if run.use_synthetic:
            image_w, image_s, ignore_u, box, *truth = fetch(run, run.syn_iter)  # (B, 3, c, c) ×2, (B, c, c) bool ×2
            box = box & (not args.no_cutmix)  # --no-cutmix: no box; truth: [toy world's true layouts (B, c, c)] or []
            # 2. the EMA teacher on the weak views, TTA on the first half of the batch. With CutMix (stage 3) every
            # image then mixes both kinds: image b's box holds the scores of image B−1−b from the other half (plain
            # pass inside the box of a first-half image, TTA average inside the box of a second-half one), so OT and
            # the γ gate see one pass or the average of the views depending on where the box fell; Mask2Former's
            # image gate (query_conf, not mixed) is image b's own (docs/training.md, "TTA on half the batch and CutMix")
            with run.autocast():
                scores_u, query_conf = teacher_predict(run.teacher, image_w, args.tta)  # (B, K, c, c) float32
            # 3. CutMix: the strong images and everything the teacher says about them, mixed by the same rule
            image_s, scores_u, ignore_u = cutmix(image_s, box), cutmix(scores_u, box), cutmix(ignore_u, box)
            truth = [cutmix(t, box) for t in truth]
            images.append(image_s)
            if query_conf is not None:  # Mask2Former: share of images the image gate keeps
                logs["image_ratio"] = float((query_conf >= args.conf_thresh).float().mean())
            # 4. OT: soft pseudo-labels and the γ gate (sense; pseudo and soft take the teacher's own labels)
            targets, gate, target_logs = pseudo_targets(scores_u, ~ignore_u, args, run.class_marginal,
                                                        (truth or [None])[0])  # (B, K, c, c), (B, c, c)
            label_u, gate = synthetic_labels(targets, gate, query_conf, args)  # (B, c, c) ×2
            logs.update(target_logs, mask_ratio=float(gate.float().mean()))
        # 5. the student, one forward on [x; u_s]
        with run.autocast():
            pred = run.net(torch.cat(images))
        pred_x, pred_u = split_outputs(pred, len(image_x))
        # 6. losses: L = (L_x + L_u) / 2 (L = L_x for --method supervised)
        loss = loss_x = supervised_loss(pred_x, label_x, args, run.device)
        loss_u = torch.zeros((), device=run.device)
        if run.use_synthetic:
            loss_u = synthetic_loss(pred_u, targets, label_u, gate, args, run.device)
            loss = (loss_x + loss_u) / 2
        # 7. backward, accumulated (a non-finite loss too: DDP's gradient hooks must run on every rank)
        run.scaler.scale(loss / args.grad_accum).backward()
        logs["loss_x"], logs["loss_u"] = loss_x.item(), loss_u.item()
        finite = finite and math.isfinite(logs["loss_x"]) and math.isfinite(logs["loss_u"])
        if run.use_synthetic:  # for the machinery: what OT did and what was trained on, per micro-batch
            views.append(dict(teacher_label=scores_u.max(1).indices, target_label=targets.max(1).indices,
                              gate=gate, label=label_u, truth=(truth or [None])[0]))
    if views:  # the last micro-batch is the one drawn: its weak view, padding and the student's output
        views[-1].update(weak=cutmix(image_w, box), valid=~ignore_u, student=pred_u, size=image_s.shape[-2:])
    return logs, finite, views


def main(argv=None) -> None:
    """Train: set-up (prepare), then one SENSE step per iteration — stages 1–7 in sense_step, the AdamW step (8) and
    the EMA teacher (9) here — and after each step the machinery: log, pictures, evaluation, checkpoints, stops."""
    run = prepare(parse_args(argv))  # flags, device, data, models, optimizer, resume, loaders: MACHINERY below
    args = run.args
    # disable=None: the bar turns itself off when stderr is not a terminal, so a redirected log holds the log lines
    # and no carriage-return updates; off on every rank but rank 0
    progress = tqdm(range(run.start, run.total), initial=run.start, total=run.total, desc="train", leave=False,
                    disable=None if run.is_main else True)
    for step in progress:
        run.step, run.rng_step = step, rng_states(run.device)  # a data fault saves the state this step started from
        run.student.train()
        for group in run.optimizer.param_groups:  # poly lr, per iteration
            group["lr"] = poly_lr(group["base"], step, run.total, args.poly_power)
        logs, finite, views = sense_step(run)  # stages 1–7
        # A non-finite loss on any rank (bf16 overflow, a bad batch) skips the step: the gradients are dropped, no
        # parameter, optimizer, scaler or EMA change. The scaler's own check covers fp16 gradients that overflow.
        skipped = any_rank(not finite, run.device)
        if skipped:
            run.optimizer.zero_grad(set_to_none=True)
        else:
            # 8. AdamW step (gradient clipping first, on unscaled gradients, when asked)
            if args.clip_grad > 0:
                run.scaler.unscale_(run.optimizer)
                nn.utils.clip_grad_norm_(run.student.parameters(), args.clip_grad)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            # 9. the EMA teacher
            ema_update(run.teacher, run.student, step, args.ema_decay)
        # ---- MACHINERY (below): log line, pictures, evaluation, checkpoints, stops
        done = step + 1
        record(run, done, logs, views, skipped)
        if run.is_main and views and args.panel_every and (done % args.panel_every == 0 or done == run.total):
            draw_panel(run, done, logs, views[-1])
        if done % args.eval_every == 0 or done == run.total:
            evaluate_teacher(run, done)
        if not keep_going(run, done, logs, skipped):
            break
    progress.close()
    finish(run)


# ====================================================================================================================
# MACHINERY: everything a long run needs around the method — set-up, resume, data order, checkpoints, faults,
# logs, pictures. Nothing below changes what a step computes.
# ====================================================================================================================


@dataclass
class Run:
    """The state of one training run, shared by the step (sense_step) and the machinery. Made by prepare."""

    args: argparse.Namespace
    spec: data.DatasetSpec
    device: torch.device
    is_main: bool  # rank 0: the one that prints and writes
    distributed: bool
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    student: nn.Module
    teacher: nn.Module  # EMA of the student, never trained by gradients
    net: nn.Module  # the student, wrapped in DDP when distributed
    optimizer: torch.optim.Optimizer
    use_synthetic: bool
    total: int  # steps of the whole run
    thing_ids: torch.Tensor  # (T,) class indices of the dataset's thing classes
    out: Path
    class_marginal: str | torch.Tensor = "uniform"  # OT's class marginal (a (K,) tensor for --ot-marginal prior)
    start: int = 0
    best: float | None = None  # best EMA mIoU so far, and its step
    best_step: int | None = None
    result: dict | None = None  # the last evaluation
    pseudo_confusion: torch.Tensor | None = None  # toy world: (K, K) pixels, rows true class, columns trained label
    # toy world, since the last evaluation: per true class, synthetic pixels, those gated, those gated and labelled right
    gate_counts: torch.Tensor | None = None  # (K, 3) int64
    real_iter: object = None
    syn_iter: object = None
    val_loader: object = None
    step: int = 0  # the step running, and the RNG states it started from (what a fault saves)
    rng_step: dict = field(default_factory=dict)
    meter: dict = field(default_factory=dict)  # log values since the last log line
    interval: dict = field(default_factory=lambda: {"steps": 0, "skipped": 0})
    t_last: float = 0.0
    skipped_in_row: int = 0  # non-finite losses: the current run of skipped steps,
    last_good: tuple | None = None  # and (step, RNG states) before it
    stop: dict = field(default_factory=lambda: {"requested": False})  # SIGTERM

    def autocast(self):
        """The run's autocast context: bf16 on CUDA by default, off (float32) on a CPU."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def prepare(args: argparse.Namespace) -> Run:
    """Flags, device, datasets, models, optimizer, resume and loaders, in an order that fails early: flags and the
    weight file first, then the data checks, and only then the model."""
    given = given_flags(args)
    args = resolve_presets(args)
    flag_warnings = check_flags(args, given)
    # weights next: a real-dataset run whose official file is missing stops here, before any work (random init
    # only on purpose, --pretrained none); the toy world may make the toy backbone's file when the model is built
    models.resolve_pretrained(args.backbone, args.pretrained, required=args.dataset not in data.TOY_WORLDS)
    spec = data.get_spec(args.dataset)
    K = args.num_classes = spec.num_classes  # stored in checkpoints: eval.py and quality.py rebuild from it

    # seeds -> device -> autocast
    torch.manual_seed(args.seed)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    device = models.pick_device(args.device)
    args.workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    amp = {"auto": "bf16" if device.type == "cuda" else "off"}.get(args.amp, args.amp)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]

    # data: a broken dataset fails in seconds, not hours
    patch = models.BACKBONES[args.backbone].patch_size
    reduce_zero = False if args.ade_reduced else None
    use_synthetic = args.method != "supervised"
    for split in (args.train_split, args.val_split):
        problems = data.check_dataset(args.dataset, args.data_root, split, quick=True, reduce_zero_label=reduce_zero)
        if problems:
            raise data.DataError(f"{problems[0]} ({len(problems)} problem(s); run: python data.py check "
                                 f"--dataset {args.dataset} --root {args.data_root} --split {split})")
    real_set = data.LabelledDataset(args.dataset, args.data_root, args.train_split, crop_size=args.crop_size,
                                    patch_size=patch, reduce_zero_label=reduce_zero)
    val_set = data.LabelledDataset(args.dataset, args.data_root, args.val_split, train=False, patch_size=patch,
                                   reduce_zero_label=reduce_zero)
    if use_synthetic and not Path(args.synthetic).exists():
        raise data.DataError(f"--synthetic {args.synthetic}: not found (a folder, split file or manifest.jsonl; "
                             f"make one with generate.py, or use --method supervised)")
    syn_set = data.SyntheticDataset(args.synthetic, crop_size=args.crop_size, patch_size=patch,
                                    with_truth=args.dataset in data.TOY_WORLDS) if use_synthetic else None
    resume = Path(args.out) / "last.pt" if args.resume == "auto" else (Path(args.resume) if args.resume else None)
    if resume is not None and args.resume != "auto" and not resume.is_file():
        raise ValueError(f"--resume {resume}: checkpoint not found")
    if resume is None and (Path(args.out) / "last.pt").is_file():  # it would be overwritten, its log mixed in
        raise ValueError(f"--out {args.out}: holds a run (last.pt); continue it with --resume auto, or choose "
                         f"another --out")
    # the model after the data checks, from the flag itself: build_model resolves it as above and makes the toy
    # backbone's official file on first use (the resolved path would read as a user's explicit, absent file)
    student = models.build_model(args.arch, args.backbone, K, args.pretrained).to(device)

    # An epoch = one pass over the synthetic set, for every method: --method supervised runs as many steps as
    # sense would (the same budget); only without a synthetic set does it count passes over the real set.
    B = args.batch_size
    B_x = args.real_batch or B  # real images per step: B in the paper (its supervised baseline too)
    if use_synthetic:
        epoch_len = len(syn_set)
    elif Path(args.synthetic).exists():
        epoch_len = len(data.synthetic_images(args.synthetic))
    else:
        epoch_len = len(real_set)
    steps_per_epoch = max(1, epoch_len // (B * world * args.grad_accum))
    total = args.iters or args.epochs * steps_per_epoch
    # Real datasets: the EMA teacher is evaluated after every epoch and the best kept (best.pt), as the reference
    # code reports its numbers; the toy preset has set eval_every already (TOY_SCHEDULE: 6 times a default run).
    args.eval_every = args.eval_every or steps_per_epoch
    args.save_every = args.save_every or args.eval_every
    args.panel_every = args.eval_every if args.panel_every is None else args.panel_every
    out = Path(args.out)
    if rank == 0:
        (out / "panels").mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1) + "\n")
        print(f"train.py: {args.method} | {args.dataset} (K={K}) | {args.arch}/{args.backbone} "
              f"(weights {student.pretrained_file or 'none: random init'}) | {total} steps of {B_x} real"
              f"{f' + {B} synthetic' if use_synthetic else ''} x {world} rank(s) x {args.grad_accum} | crop "
              f"{args.crop_size} | {device} {amp} | run folder {out}")
        print("config: " + json.dumps(vars(args)))
        for warning in flag_warnings:
            print(f"train.py: warning: {warning}")

    # teacher and optimizer
    teacher = deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if args.lock_backbone:
        for p in student.backbone.parameters():
            p.requires_grad_(False)
    # foreach: one call per operation over all parameters (PyTorch's default on CUDA only; 1.5× faster on a CPU)
    optimizer = torch.optim.AdamW(param_groups(student, args.lr, args.head_lr_mult, args.weight_decay), lr=args.lr,
                                  weight_decay=args.weight_decay, foreach=True)
    run = Run(args=args, spec=spec, device=device, is_main=rank == 0, distributed=distributed, amp_dtype=amp_dtype,
              scaler=torch.amp.GradScaler(device.type, enabled=amp == "fp16"),  # a scaler only for fp16
              student=student, teacher=teacher, net=student, optimizer=optimizer, use_synthetic=use_synthetic,
              thing_ids=torch.tensor([spec.classes.index(name) for name in data.thing_classes(args.dataset)],
                                     dtype=torch.int64, device=device),
              total=total, out=out, pseudo_confusion=torch.zeros(K, K, dtype=torch.int64),
              gate_counts=torch.zeros(K, 3, dtype=torch.int64))
    restore(run, resume)
    if distributed:
        run.net = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    signal.signal(signal.SIGTERM, lambda *_: run.stop.update(requested=True))  # finish the step, save, exit cleanly
    open_loaders(run, real_set, syn_set, val_set, rank, world, B_x, reduce_zero)
    return run


def restore(run: Run, resume: Path | None) -> None:
    """Continue from a checkpoint (--resume): model, EMA teacher, optimizer, scaler, step, best, RNG states."""
    args = run.args
    if resume is None or not resume.is_file():
        if resume is not None and run.is_main:
            print(f"--resume auto: no {resume} yet, starting at step 0")
        return
    state = torch.load(resume, map_location="cpu", weights_only=True)
    for key in ("dataset", "arch", "backbone", "method"):
        if state["args"][key] != getattr(args, key):
            raise ValueError(f"--resume {resume}: checkpoint has {key}={state['args'][key]!r}, this run "
                             f"{getattr(args, key)!r}")
    # other settings may change on purpose (a lower --lr after a divergence, more --iters): said, not refused
    changed = [f"{key} {state['args'][key]!r} -> {value!r}" for key, value in vars(args).items()
               if key not in RESUME_MACHINERY and key in state["args"] and state["args"][key] != value]
    if changed and run.is_main:
        print(f"train.py: warning: --resume {resume}: continuing with settings other than the checkpoint's: "
              + ", ".join(changed))
    run.student.load_state_dict(state["model"])
    run.teacher.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    run.start, run.best, run.best_step = state["step"], state["best_miou"], state.get("best_step")
    run.pseudo_confusion = state.get("pseudo_confusion", run.pseudo_confusion)
    torch.set_rng_state(state["rng_cpu"])
    if run.device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"])
    if run.is_main:
        done_already = f" of {run.total}: nothing left to train" if run.start >= run.total else ""
        print(f"resumed from {resume} at step {run.start}{done_already}")


def open_loaders(run: Run, real_set, syn_set, val_set, rank: int, world: int, B_x: int, reduce_zero) -> None:
    """One micro-batch per (step, accumulation index), from the resume point on; the log file; the OT marginal."""
    args = run.args
    common = dict(start=run.start * args.grad_accum, steps=run.total * args.grad_accum, seed=args.seed, rank=rank,
                  world=world, workers=args.workers, pin=run.device.type == "cuda")
    run.real_iter = iter(make_loader(real_set, batch=B_x, **common))
    if run.use_synthetic:
        run.syn_iter = iter(make_loader(syn_set, batch=args.batch_size, **{**common, "seed": args.seed + 1}))
    run.val_loader = torch.utils.data.DataLoader(
        Caught(torch.utils.data.Subset(val_set, range(rank, len(val_set), world))), batch_size=1,
        num_workers=args.workers, generator=torch.Generator(), collate_fn=collate)
    log_file = run.out / "metrics.jsonl"
    if run.is_main and run.start == 0 and log_file.exists():  # left by an attempt that ended before a checkpoint
        log_file.unlink()
        print(f"{log_file}: replaced (an earlier attempt without a checkpoint)")
    run.class_marginal = args.ot_marginal
    if args.ot_marginal == "prior":  # the labelled split's class pixel frequencies, a (K,) tensor
        run.class_marginal = torch.tensor(data.class_frequencies(args.dataset, args.data_root, args.train_split,
                                                                 args.num_classes, reduce_zero_label=reduce_zero))
        if run.is_main:
            print("class marginal (prior): " + " ".join(f"{n} {f:.3f}" for n, f in zip(run.spec.classes,
                                                                                         run.class_marginal)))
    run.t_last = time.perf_counter()


def checkpoint(run: Run, step: int, rng: dict | None = None, name: str = "last.pt") -> None:
    """Save <out>/name at `step`, with the RNG states `rng` (default: the current ones); rank 0 only."""
    if run.is_main:
        state = {"model": run.student.state_dict(), "ema": run.teacher.state_dict(),
                 "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(), "step": step,
                 "best_miou": run.best, "best_step": run.best_step, "args": vars(run.args),
                 "pretrained_file": run.student.pretrained_file,  # the backbone's weight file at the start, or None
                 "pseudo_confusion": run.pseudo_confusion, **(rng or rng_states(run.device))}
        save_checkpoint(run.out / name, state)


def data_fault(run: Run, error: data.DataError | None, finished: int, rng: dict) -> data.DataError:
    """A sample that cannot be decoded: save the checkpoint of the last finished step, then the one line to stop
    with (error None: another rank's sample)."""
    checkpoint(run, finished, rng)
    return data.DataError(f"{error or 'another rank met a sample it cannot decode'}; saved {run.out / 'last.pt'} at "
                          f"step {finished}: fix or remove the file, then continue with --resume auto")


def fetch(run: Run, batches) -> list[torch.Tensor]:
    """The next batch of a training loader, on the device. A fault is saved as the end of the step before the
    running one (its RNG states at the start, run.rng_step), so --resume auto continues exactly as a run that never
    met it."""
    batch = next(batches)
    failed = isinstance(batch, data.DataError)
    if any_rank(failed, run.device):  # every rank stops at the same step, or the next collective would hang
        raise data_fault(run, batch if failed else None, run.step, run.rng_step)
    return [t.to(run.device, non_blocking=True) for t in batch]


def take(run: Run, loader, done: int):
    """The batches of the validation loader; a sample that cannot be decoded stops the run as in fetch (after step
    `done`). Ranks are not synchronised here: their shards differ in length, and torchrun stops the rest."""
    for batch in loader:
        if isinstance(batch, data.DataError):
            raise data_fault(run, batch, done, rng_states(run.device))
        yield batch


def record(run: Run, done: int, logs: dict, views: list[dict], skipped: bool) -> None:
    """What the pseudo-labels were (label_stats; toy world: against the true layouts, and their confusion), then
    a log line every --log-every steps. A skipped step counts in `skipped` only: its NaN would spoil the means."""
    for view in views:
        logs.update(label_stats(view["teacher_label"], view["target_label"], view["gate"], view["truth"],
                                things=run.thing_ids))
        if view["truth"] is not None and not skipped:  # toy world: which true class each trained pseudo-label had
            trained = view["gate"] & (view["truth"] != data.IGNORE_INDEX)
            run.pseudo_confusion += confusion_matrix(view["label"][trained], view["truth"][trained],
                                                     run.args.num_classes)
            run.gate_counts += gate_counts(view["label"], view["gate"], view["truth"], run.args.num_classes)
    run.interval["steps"] += 1
    run.interval["skipped"] += skipped
    for key, value in ({} if skipped else logs).items():
        run.meter.setdefault(key, []).append(value)
    if run.is_main and (done % run.args.log_every == 0 or done == run.total):
        now = time.perf_counter()
        line = {"step": done, **{k: sum(v) / len(v) for k, v in run.meter.items()}, "skipped": run.interval["skipped"],
                "lr": run.optimizer.param_groups[0]["lr"], "s_per_step": (now - run.t_last) / run.interval["steps"]}
        run.t_last, run.meter, run.interval = now, {}, {"steps": 0, "skipped": 0}
        tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items()))
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def draw_panel(run: Run, done: int, logs: dict, view: dict) -> None:
    """panels/stepNNNNNNN.png: per synthetic sample the weak view (CutMixed, as the teacher's scores are), the true
    layout (toy world), the teacher's argmax, where OT changed it, the label trained on and the student on the strong
    view."""
    args, spec = run.args, run.spec
    n = min(PANEL_SAMPLES, args.batch_size)
    student = view["student"] if args.arch == "dpt" else models.mask2former_scores(view["student"], view["size"])
    palette = lambda label: data.colorize(label[:n].cpu(), spec.palette)  # noqa: E731
    # the weak views with the CutMix boxes pasted: the teacher saw them unmixed, and its scores were mixed by the boxes
    columns = [("weak view (CutMix)", data.denormalize(view["weak"][:n])),
               ("teacher argmax", palette(view["teacher_label"])),
               ("OT changed", changed_map(view["teacher_label"][:n].cpu(), view["target_label"][:n].cpu(),
                                          view["gate"][:n].cpu(), view["valid"][:n].cpu())),
               ("trained-on label", palette(view["label"])),
               ("student (strong)", palette(student.argmax(1).detach()))]
    caption = f"step {done}: {args.method}, trained pixels {logs['mask_ratio']:.1%}"
    if view["truth"] is not None:
        columns.insert(1, ("true layout", palette(view["truth"])))
        accuracy = {key: f"{logs[key]:.3f}" if key in logs else "-" for key in ("acc_trained", "acc_all", "acc_teacher")}
        caption += (f"; pseudo-label accuracy: trained pixels {accuracy['acc_trained']}, all pixels "
                    f"{accuracy['acc_all']} (teacher argmax, all pixels {accuracy['acc_teacher']})")
    legend = [*zip(spec.classes, spec.palette), ("not trained on", (0, 0, 0))] if len(spec.classes) <= 40 else []
    legend += [(f"OT: {name}", colour) for name, colour in CHANGED_COLOURS.items()]
    save_panel(run.out / "panels" / f"step{done:07d}.png", columns, legend=legend, caption=caption)


def evaluate_teacher(run: Run, done: int) -> None:
    """mIoU of the EMA teacher on the validation split; the best one so far is kept in best.pt (as the reference
    code keeps and reports its best evaluation), and an evaluation line goes to metrics.jsonl."""
    args = run.args
    run.result = result = evaluate(run.teacher, take(run, run.val_loader, done), num_classes=args.num_classes,
                                   mode=args.eval_mode, crop_size=args.crop_size, device=run.device,
                                   amp_dtype=run.amp_dtype, progress=False)
    if run.best is None or result["miou"] > run.best:
        run.best, run.best_step = result["miou"], done
        checkpoint(run, done, name="best.pt")
    if run.is_main:
        tqdm.write(f"step {done}: EMA mIoU {result['miou']:.2f} (best {run.best:.2f} at step {run.best_step})")
        iou = [None if math.isnan(v) else v for v in result["iou"]]  # JSON has no NaN
        line = {"step": done, "miou": result["miou"], "iou": iou, "classes": list(run.spec.classes),
                "things": list(data.thing_classes(args.dataset))}
        if run.pseudo_confusion.any():  # rows: true class, columns: trained pseudo-label (pixels)
            line["pseudo_confusion"] = run.pseudo_confusion.tolist()
        if run.gate_counts.any():  # since the last evaluation, per true class: % of its pixels gated, % of those right
            pixels, gated, right = run.gate_counts.double().unbind(1)
            line["gated"] = [round(float(100 * g / p), 2) if p else None for g, p in zip(gated, pixels)]
            line["gated_right"] = [round(float(100 * r / g), 2) if g else None for r, g in zip(right, gated)]
            tqdm.write("synthetic pixels gated since the last evaluation, per true class: " + ", ".join(
                f"{name} {'-' if g is None else f'{g:.1f}%'} ({'-' if r is None else f'{r:.1f}%'} right)"
                for name, g, r in zip(run.spec.classes, line["gated"], line["gated_right"])))
        run.gate_counts.zero_()
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def keep_going(run: Run, done: int, logs: dict, skipped: bool) -> bool:
    """Checkpoint every --save-every steps and at the end; False after a SIGTERM (saved); an error after
    NONFINITE_LIMIT skipped steps in a row, with last.pt at the last good step."""
    if skipped:
        run.skipped_in_row += 1
        if run.skipped_in_row == 1:  # the state stays the one the step before left: where a stop would save
            run.last_good = (run.step, run.rng_step)
    else:
        run.skipped_in_row = 0
    stop_now = any_rank(run.stop["requested"], run.device)  # every rank stops at the same step
    if done % run.args.save_every == 0 or done == run.total or stop_now:
        checkpoint(run, done)
    if run.skipped_in_row == NONFINITE_LIMIT:
        checkpoint(run, *run.last_good)  # the state is still the last good step's: nothing was applied since
        raise FloatingPointError(
            f"loss_x {logs['loss_x']:.4g}, loss_u {logs['loss_u']:.4g}: a non-finite loss in {NONFINITE_LIMIT} "
            f"steps in a row ({run.last_good[0] + 1}..{done}); {run.out / 'last.pt'} holds step {run.last_good[0]}, "
            f"the last good one (a lower --lr, --clip-grad or --amp off, then --resume auto)")
    if stop_now and run.is_main:
        tqdm.write(f"SIGTERM: saved {run.out / 'last.pt'} at step {done}; continue with --resume auto")
    return not stop_now


def finish(run: Run) -> None:
    """The final table, the toy world's pseudo-label confusion, last and best mIoU."""
    if run.is_main and not run.stop["requested"] and run.start < run.total:
        print(format_table(run.result, run.spec.classes))
        if run.pseudo_confusion.any():
            table = save_confusion(run.out / "confusion.png", run.pseudo_confusion, run.spec.classes)
            print(f"trained pseudo-labels against the true layouts, % of each true class ({run.out / 'confusion.png'}):")
            print(table)
        print(f"EMA teacher mIoU {run.result['miou']:.2f} after {run.total} steps (last.pt), best {run.best:.2f} at "
              f"step {run.best_step} (best.pt); run folder {run.out}")
    if run.distributed:
        # every rank leaves together, and nothing holds the group when it goes (the DDP wrapper does), so that its
        # threads end here rather than during the interpreter's exit
        dist.barrier()
        run.net = run.student
        gc.collect()
        dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when flag is true on any rank (flag itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    total = torch.tensor(float(flag), device=device)
    dist.all_reduce(total)
    return bool(total > 0)


def rng_states(device: torch.device) -> dict:
    """The global RNG states a checkpoint carries (the CUDA one on CUDA)."""
    states = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng_cuda"] = torch.cuda.get_rng_state(device)
    return states


class StepSampler(torch.utils.data.Sampler):
    """Yields (index, sample_seed) for steps [start, steps) of one rank.

    The global order is a concatenation of seeded permutations of the dataset (one per epoch); step t of rank r
    takes positions [(t·W + r)·B, (t·W + r + 1)·B). Each sample's augmentation is seeded by its position.
    """

    def __init__(self, n: int, *, batch: int, start: int, steps: int, seed: int, rank: int, world: int):
        self.n, self.batch, self.start, self.steps = n, batch, start, steps
        self.seed, self.rank, self.world = seed, rank, world

    def __len__(self) -> int:
        return (self.steps - self.start) * self.batch

    def __iter__(self):
        epoch, order = -1, None
        for step in range(self.start, self.steps):
            for j in range(self.batch):
                position = (step * self.world + self.rank) * self.batch + j
                if position // self.n != epoch:
                    epoch = position // self.n
                    order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
                yield int(order[position % self.n]), (self.seed * 1_000_003 + position) % 2**62


class Seeded(torch.utils.data.Dataset):
    """Runs a dataset's random augmentation under a per-sample seed, leaving the caller's RNG untouched.

    The seed comes from StepSampler with the index, so a sample's crop, flip and strong view depend only on its
    position in the data order: the same in a worker or the main process, before or after a resume.
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also seed every accelerator (lazily, recording a stack
            # trace each time: ~1 ms a sample), and fork_rng(devices=[]) restores the CPU's state alone
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class Caught(torch.utils.data.Dataset):
    """Gives a sample that cannot be decoded back as its data.DataError instead of raising it: a DataLoader worker
    would wrap a raised one in its traceback, while a returned one reaches the training loop as the dataset's own
    line naming the file (see collate and take)."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        try:
            return self.dataset[item]
        except data.DataError as error:
            return error


def collate(items: list):
    """default_collate of a batch, or the DataError of its first sample that could not be decoded."""
    failed = next((item for item in items if isinstance(item, data.DataError)), None)
    return failed if failed is not None else torch.utils.data.default_collate(items)


def make_loader(dataset, *, batch: int, start: int, steps: int, seed: int, rank: int, world: int, workers: int,
                pin: bool) -> torch.utils.data.DataLoader:
    """A loader of this rank's micro-batches for steps [start, steps): StepSampler's order, each sample augmented
    under its own seed (Seeded), a sample that cannot be decoded handed back as its error (Caught, collate).

    Args:
        dataset: a LabelledDataset or SyntheticDataset.
        batch: samples per micro-batch; start, steps: micro-batch indices (resume point, end of the run).
        seed: the data-order seed (the synthetic stream uses seed + 1, so the two streams are independent).
        rank, world: this process and the number of processes; workers: DataLoader worker processes.
        pin: pinned host memory (CUDA).
    """
    sampler = StepSampler(len(dataset), batch=batch, start=start, steps=steps, seed=seed, rank=rank, world=world)
    # A generator of its own: a DataLoader draws its workers' base seed from it, which would otherwise shift the
    # global RNG (used by the Mask2Former point sampling) and break resume = uninterrupted run.
    return torch.utils.data.DataLoader(Caught(Seeded(dataset)), batch_size=batch, sampler=sampler, num_workers=workers,
                                       pin_memory=pin, drop_last=True, generator=torch.Generator().manual_seed(seed),
                                       collate_fn=collate)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic torch.save: a killed run never leaves a truncated checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def label_stats(teacher_label: torch.Tensor, target_label: torch.Tensor, gate: torch.Tensor,
                truth: torch.Tensor | None, things: torch.Tensor | None = None) -> dict:
    """What OT did to the labels, and how right the pseudo-labels are (toy world: against the true layout).

    Args:
        teacher_label, target_label: (B, H, W) argmax of the teacher and of the targets.
        gate: (B, H, W) bool, the pixels trained on.
        truth: (B, H, W) true layout (255 = unknown), or None.
        things: (T,) int64 class indices of the thing classes, or None.
    Returns:
        ot_changed: share of the trained pixels whose label differs from the teacher's argmax (0 without OT);
        acc_trained / acc_all: pseudo-label accuracy on the trained pixels / on all pixels with a true class;
        acc_teacher: the teacher's argmax accuracy on all pixels with a true class;
        things_gated: share of the synthetic pixels of thing classes (by their true class) that are trained on.
        An accuracy over no pixel is left out (not NaN), so that means over a log interval stay finite.
    """
    changed = target_label != teacher_label
    stats = {"ot_changed": float(changed[gate].float().mean()) if gate.any() else 0.0}
    if truth is not None:
        known = truth != data.IGNORE_INDEX
        right = target_label == truth
        trained = gate & known
        if trained.any():
            stats["acc_trained"] = float(right[trained].float().mean())
        if known.any():
            stats["acc_all"] = float(right[known].float().mean())
            stats["acc_teacher"] = float((teacher_label == truth)[known].float().mean())
        thing = torch.isin(truth, things) if things is not None else torch.zeros_like(known)
        if thing.any():
            stats["things_gated"] = float(gate[thing].float().mean())
    return stats


def gate_counts(label: torch.Tensor, gate: torch.Tensor, truth: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per true class: its synthetic pixels, those the gate passes, and those passed with the right label.

    Args:
        label: (B, H, W) int64 trained-on label. gate: (B, H, W) bool. truth: (B, H, W) true layout, 255 = none.
    Returns:
        (K, 3) int64 counts: pixels, gated, gated and right.
    """
    known = truth != data.IGNORE_INDEX
    cls = truth[known]
    gated = gate[known]
    right = gated & (label[known] == cls)
    return torch.stack([torch.bincount(cls[mask], minlength=num_classes)
                        for mask in (torch.ones_like(gated), gated, right)], 1)


def changed_map(teacher_label: torch.Tensor, target_label: torch.Tensor, gate: torch.Tensor,
                valid: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) uint8 picture of where OT changed the teacher's label: CHANGED_COLOURS, black on padding."""
    colours = torch.tensor(list(CHANGED_COLOURS.values()), dtype=torch.uint8)  # (3, 3)
    changed = target_label != teacher_label
    kind = torch.where(changed, torch.where(gate, 1, 2), 0)  # (B, H, W) index into CHANGED_COLOURS
    picture = colours[kind]
    picture[~valid] = 0
    return picture.numpy()


def save_panel(path: Path, columns: list[tuple[str, np.ndarray]], *, legend: list[tuple[str, tuple[int, int, int]]],
               caption: str | None = None, scale: int = PANEL_SCALE) -> None:
    """Write a picture panel: one column per named picture kind, one row per sample, headers on top, a colour
    legend below, an optional caption line above.

    Args:
        columns: (header, (n, H, W, 3) uint8 pictures) per column.
        legend: (name, RGB colour) entries drawn as swatches under the grid.
        caption: a line of text above everything.
        scale: nearest-neighbour enlargement of every picture.
    """
    n, h, w = columns[0][1].shape[:3]
    cell_h, cell_w = h * scale + 2, w * scale + 2
    width = len(columns) * cell_w
    legend_rows, x = 1, 0
    for name, _ in legend:  # swatches wrap onto more lines when the panel is narrow
        if x + 14 + 7 * len(name) > width:
            legend_rows, x = legend_rows + 1, 0
        x += 24 + 7 * len(name)
    top = PANEL_LINE * (2 if caption else 1)  # caption, then the column headers
    grid = np.zeros((top + n * cell_h + PANEL_LINE * legend_rows + 4, width, 3), np.uint8)
    for j, (_, pictures) in enumerate(columns):
        big = pictures.repeat(scale, 1).repeat(scale, 2)  # (n, scale·H, scale·W, 3)
        for i in range(n):
            grid[top + i * cell_h:top + i * cell_h + h * scale, j * cell_w:j * cell_w + w * scale] = big[i]
    panel = Image.fromarray(grid)
    draw = ImageDraw.Draw(panel)
    if caption:
        draw.text((2, 1), caption, fill=(255, 255, 255))
    for j, (header, _) in enumerate(columns):
        draw.text((j * cell_w + 2, top - PANEL_LINE + 1), header, fill=(255, 255, 255))
    x, y = 2, top + n * cell_h + 2
    for name, colour in legend:
        if x + 14 + 7 * len(name) > width:
            x, y = 2, y + PANEL_LINE
        draw.rectangle((x, y + 1, x + 10, y + 10), fill=tuple(colour))
        draw.text((x + 14, y), name, fill=(255, 255, 255))
        x += 24 + 7 * len(name)
    tmp = path.with_name(path.name + ".tmp.png")
    panel.save(tmp)
    os.replace(tmp, path)


def save_confusion(path: Path, confusion: torch.Tensor, classes: tuple[str, ...]) -> str:
    """Draw the confusion of the trained pseudo-labels against the true layouts (rows: true class, columns:
    pseudo-label, each row in % of its pixels) to a small PNG; returns the same as a text table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    counts = confusion.double()
    share = 100 * counts / counts.sum(1, keepdim=True).clamp_min(1)  # (K, K) row percentages
    K = len(classes)
    figure, axis = plt.subplots(figsize=(1.2 + 0.55 * K, 1.0 + 0.5 * K), dpi=100)
    axis.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=100)
    for i in range(K):
        for j in range(K):
            axis.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center", fontsize=7,
                      color="white" if share[i, j] > 60 else "black")
    axis.set_xticks(range(K), classes, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(K), [f"{c} ({int(t)})" for c, t in zip(classes, counts.sum(1))], fontsize=8)
    axis.set_xlabel("trained pseudo-label")
    axis.set_ylabel("true class (trained pixels)")
    figure.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, path)
    header = "true \\ pseudo".ljust(14) + "".join(f"{c[:7]:>8}" for c in classes) + "   pixels"
    lines = [header] + [f"{classes[i][:14]:<14}" + "".join(f"{share[i, j]:8.1f}" for j in range(K))
                        + f"{int(counts[i].sum()):9d}" for i in range(K)]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, ValueError, FloatingPointError) as error:
        sys.exit(f"train.py: {error}")
