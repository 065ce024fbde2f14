"""SENSE training: real labelled images + synthetic images with OT pseudo-labels from an EMA teacher.

Paper: SENSE (ICML 2026), method: "OT assignment", "pixel- and query-based segmenters", "loss & training";
README "Training and evaluation" (one iteration, step by step) and "Mask2Former" (its branch).

    python train.py                                          # toy world, DPT on the toy ViT, CPU, minutes
    python train.py --method supervised                      # real images only (B per step; --real-batch 16: 2B)
    python train.py --method pseudo                          # hard argmax pseudo-labels (no OT)
    python train.py --method soft                            # the teacher's probabilities as targets (no OT)
    python train.py --pretrained none                        # the toy ViT from random init instead of pretrained
    python train.py --arch mask2former                       # compact Mask2Former on the toy world
    python train.py --dataset cityscapes --arch dpt --synthetic data/synthetic/cityscapes/synthetic.txt
    torchrun --nproc_per_node 8 train.py --dataset ade20k --arch mask2former --synthetic S.txt
    python train.py --out runs/my_run --resume auto          # continue a killed run

One step (B real + B synthetic images):
  1. batches  2. teacher (EMA, TTA) on the weak synthetic views  3. CutMix of strong views and teacher outputs
  4. student on [x; u_s]  5. L_x (CE / OHEM / set loss), L_u (OT soft CE / query loss on OT labels)
  6. L = (L_x + L_u) / 2, AdamW step, poly lr  7. EMA update  8. log, panels, eval, checkpoint

Shapes: B images per stream, K classes, H×W crop (c×c), Q queries.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from copy import deepcopy
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
    "cityscapes": dict(crop={"dpt": 798, "mask2former": 768}, epochs=180, batch_size=8, ohem=True, tta="flip"),
    "ade20k": dict(crop={"dpt": 518, "mask2former": 640}, epochs=60, batch_size=8, ohem=False, tta="scales"),
    "coco": dict(crop={"dpt": 518, "mask2former": 640}, epochs=20, batch_size=16, ohem=False, tta="scales"),
}
ARCH_PRESETS = {
    # backbone lr, head lr multiplier, AdamW weight decay, OT class marginal, backbone for real datasets
    "dpt": dict(lr=5e-6, head_lr_mult=40.0, weight_decay=0.01, ot_marginal="present", backbone="dinov2_s"),
    "mask2former": dict(lr=5e-6, head_lr_mult=10.0, weight_decay=0.05, ot_marginal="uniform", backbone="dinov3_l"),
}
# Toy-only choices, each with its reason:
#   iters 300: a fixed number of steps whatever the synthetic set's size, so every study compares equal compute
#     (an epoch over the real set is 7.5 steps: the 60 labelled images are seen 40 times, the baseline saturates);
#   lr 5e-4, head ×4: the pretrained toy ViT is 4 blocks of width 128, far from DINOv2's 5e-6 regime (1e-3 with
#     head ×10 diverged); from random init (--pretrained none) the backbone takes 5e-4 and head ×2;
#   EMA λ_max 0.98: 0.996 averages over ~250 steps, most of a 300-step run; 0.98 (~50 steps) keeps the teacher as
#     near the student as 0.996 is in the paper's runs of tens of thousands of steps;
#   evaluation every 100 steps: 3 evaluations keep a run at minutes.
TOY_OPTIM = dict(lr=5e-4, head_lr_mult=4.0)
TOY_OPTIM_RANDOM_INIT = dict(lr=5e-4, head_lr_mult=2.0)
TOY_SCHEDULE = dict(iters=300, eval_every=100, ema_decay=0.98)
EMA_DECAY = 0.996  # λ_max of the EMA teacher (paper)
# Mask2Former synthetic branch (as the reference code runs it): matching costs and loss weights.
M2F_SYNTHETIC = dict(cost_class=1.0, cost_mask=1.0, cost_dice=0.0, class_weight=2.0, mask_weight=5.0,
                     dice_weight=0.0, no_object_weight=0.02, skip_empty_ce=True)
METHODS = ("supervised", "pseudo", "soft", "sense")
OHEM_THRESH, OHEM_MIN_KEPT = 0.7, 200_000  # Cityscapes OHEM (UniMatch / SENSE reference code)
PANEL_SAMPLES = 4  # synthetic samples drawn in each picture panel
PANEL_SCALE = 3  # each crop drawn 3× (nearest), so a class of students can read a 64-pixel toy crop
PANEL_LINE = 14  # pixels of one text line (PIL's default font is 11 px high)
# The "OT changed" column: where the target's label differs from the teacher's argmax
CHANGED_COLOURS = {"unchanged": (60, 60, 60), "changed, trained on": (255, 40, 40),
                   "changed, not trained on": (255, 220, 0)}


def parse_args(argv=None) -> argparse.Namespace:
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
                        "the toy ViT's file is made on first use)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="sense", choices=METHODS,
                   help="supervised: real only; pseudo: hard labels (argmax); soft: the teacher's probabilities; "
                        "sense: OT targets (default: sense)")
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
    g.add_argument("--ot-gate", default="teacher", choices=("teacher", "plan"),
                   help="γ gate on the teacher's softmax (the paper) or on the OT plan's rows (default: teacher)")
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
    g.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: total/4)")
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


def resolve_presets(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every flag the user left unset from the dataset and arch presets."""
    ds, arch = DATASET_PRESETS[args.dataset], ARCH_PRESETS[args.arch]
    toy = args.dataset == "toy"
    args.data_root = args.data_root or f"data/{args.dataset}"
    args.synthetic = args.synthetic or str(Path(args.data_root) / "synthetic.txt")
    args.backbone = args.backbone or ("toy" if toy else arch["backbone"])
    args.crop_size = args.crop_size or ds["crop"][args.arch]
    args.batch_size = args.batch_size or ds["batch_size"]
    args.tta = args.tta or ds["tta"]
    args.ohem = args.ohem or ("on" if ds["ohem"] else "off")
    args.ot_marginal = args.ot_marginal or arch["ot_marginal"]
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


# ----------------------------------------------------------------------------------------------------
# Data order: deterministic from (seed, step), so a resumed run sees exactly the data it would have seen


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
    """Runs a dataset's random augmentation under a per-sample seed, leaving the caller's RNG untouched."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def make_loader(dataset, *, batch: int, start: int, steps: int, seed: int, rank: int, world: int, workers: int,
                pin: bool) -> torch.utils.data.DataLoader:
    sampler = StepSampler(len(dataset), batch=batch, start=start, steps=steps, seed=seed, rank=rank, world=world)
    # A generator of its own: a DataLoader draws its workers' base seed from it, which would otherwise shift the
    # global RNG (used by the Mask2Former point sampling) and break resume = uninterrupted run.
    return torch.utils.data.DataLoader(Seeded(dataset), batch_size=batch, sampler=sampler, num_workers=workers,
                                       pin_memory=pin, drop_last=True, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# Small pure helpers of the method (each tested)


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    """Poly schedule: base · (1 − step/total)^power, per iteration, no warm-up."""
    return base * (1 - step / total) ** power


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, decay: float) -> None:
    """EMA over parameters and floating buffers with λ = min(1 − 1/(step+1), decay)."""
    lam = min(1 - 1 / (step + 1), decay)
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values()):
        if t.is_floating_point():
            t.mul_(lam).add_(s.detach(), alpha=1 - lam)
        else:
            t.copy_(s)


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


def teacher_probabilities(scores: torch.Tensor, arch: str) -> torch.Tensor:
    """The teacher's per-pixel class probabilities without OT (--method pseudo), (B, K, H, W) -> (B, K, H, W).

    DPT: softmax of its logits. Mask2Former: its scores Σ_q softmax(class_q)[:K] · sigmoid(mask_q) are class
    probabilities already; a softmax over values in [0, 1] would put every pixel far below the gate δ.
    """
    return scores.softmax(1) if arch == "dpt" else scores


def pseudo_targets(scores: torch.Tensor, valid: torch.Tensor, args: argparse.Namespace,
                   class_marginal: str | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The synthetic branch's targets and γ gate, by method (paper: "OT assignment"; the others are ablations).

    sense: OT plan rows (ot.ot_pseudo_labels), gate on the teacher (paper) or on the plan (--ot-gate plan);
    soft: the teacher's probabilities; pseudo: one-hot of the teacher's argmax (DPT; Mask2Former takes the hard
    label of its scores in any case). soft and pseudo gate on the teacher's maximum probability.

    Args:
        scores: (B, K, H, W) teacher scores (DPT logits / Mask2Former scores) of the CutMixed batch.
        valid: (B, H, W) bool, False on padding.
        class_marginal: "uniform", "present" or a (K,) tensor (the labelled set's frequencies).
    Returns:
        targets (B, K, H, W) float32 (rows sum to 1 on valid pixels), gate (B, H, W) bool, log values.
    """
    if args.method == "sense":
        # Every argument explicit: a fixed iteration count (tol None) from the reference code's start. Mask2Former's
        # scores go in as logits (their log-softmax is the cost), as in the reference code.
        targets, gate, stats = ot_pseudo_labels(scores, valid, beta=args.ot_beta, iters=args.ot_iters,
                                                class_marginal=class_marginal, scope=args.ot_scope,
                                                min_prob=args.ot_min_prob, tol=None, start="reference",
                                                conf_thresh=args.conf_thresh, gate_on=args.ot_gate, group=None)
        return targets, gate, {"ot_err": stats["marginal_error"]}
    targets = teacher_probabilities(scores, args.arch)  # (B, K, H, W)
    gate = (targets.amax(1) >= args.conf_thresh) & valid
    if args.method == "pseudo" and args.arch == "dpt":
        targets = F.one_hot(targets.argmax(1), targets.shape[1]).movedim(-1, 1).to(targets.dtype)
    return targets, gate, {}


def label_stats(teacher_label: torch.Tensor, target_label: torch.Tensor, gate: torch.Tensor,
                truth: torch.Tensor | None) -> dict:
    """What OT did to the labels, and how right the pseudo-labels are (toy world: against the true layout).

    Args:
        teacher_label, target_label: (B, H, W) argmax of the teacher and of the targets.
        gate: (B, H, W) bool, the pixels trained on.
        truth: (B, H, W) true layout (255 = unknown), or None.
    Returns:
        ot_changed: share of the trained pixels whose label differs from the teacher's argmax (0 without OT);
        acc_trained / acc_all: pseudo-label accuracy on the trained pixels / on all pixels with a true class;
        acc_teacher: the teacher's argmax accuracy on all pixels with a true class.
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
    return stats


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
    DDP's gradient averaging gives the gradient of the global mean (equal to one process with the whole batch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return mean
    total = torch.tensor(float(count), device=device)
    dist.all_reduce(total)
    return mean * count * dist.get_world_size() / total.clamp_min(1)


def split_outputs(out, n: int):
    """Split a student output (tensor or Mask2Former dict) along the batch into the first n and the rest."""
    if torch.is_tensor(out):
        return out[:n], out[n:]
    first = {k: v[:n] for k, v in out.items() if k != "aux_outputs"}
    rest = {k: v[n:] for k, v in out.items() if k != "aux_outputs"}
    first["aux_outputs"] = [split_outputs(aux, n)[0] for aux in out.get("aux_outputs", [])]
    rest["aux_outputs"] = [split_outputs(aux, n)[1] for aux in out.get("aux_outputs", [])]
    return first, rest


@torch.no_grad()
def teacher_predict(teacher: nn.Module, images: torch.Tensor, tta: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher class scores on the weak views; TTA on the first half of the batch (step 2 of the loop).

    Returns:
        scores (B, K, H, W) (DPT logits / Mask2Former scores), and for Mask2Former the per-image mean over queries
        of the max class probability (no-object included) (B,) of the plain pass, else None.
    """
    patch = teacher.patch_size
    if teacher.arch == "dpt":
        scores, query_conf = teacher(images), None
    else:
        out = teacher(images)
        scores = models.mask2former_scores(out, images.shape[-2:])
        query_conf = out["pred_logits"].softmax(-1).amax(-1).mean(1)  # (B,)
    half = images.shape[0] // 2 if tta != "none" else 0
    if half:
        x, size = images[:half], images.shape[-2:]
        views = [scores[:half], models.class_scores(teacher, x.flip(-1)).flip(-1)]
        if tta == "scales":
            big = [s + round(0.25 * s / patch) * patch for s in size]  # crop + round(0.25 crop / p) p
            x_big = F.interpolate(x, size=big, mode="bilinear", align_corners=False)
            for flip in (False, True):
                s = models.class_scores(teacher, x_big.flip(-1) if flip else x_big)
                s = s.flip(-1) if flip else s
                views.append(F.interpolate(s, size=size, mode="bilinear", align_corners=False))
        scores = torch.cat([torch.stack(views).mean(0), scores[half:]])
    return scores.float(), query_conf


# ----------------------------------------------------------------------------------------------------
# Output: checkpoints, panels, logs


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic torch.save: a killed run never leaves a truncated checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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


def main(argv=None) -> None:
    args = resolve_presets(parse_args(argv))
    spec = data.get_spec(args.dataset)
    K = args.num_classes = spec.num_classes  # stored in checkpoints: eval.py and quality.py rebuild from it

    # ---- setup: seeds -> device -> autocast -> derived numbers -> run folder -> print
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
    is_main = rank == 0
    amp = {"auto": "bf16" if device.type == "cuda" else "off"}.get(args.amp, args.amp)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # a scaler only for fp16

    patch = models.BACKBONES[args.backbone].patch_size
    reduce_zero = False if args.ade_reduced else None
    use_synthetic = args.method != "supervised"
    for split in (args.train_split, args.val_split):  # a broken dataset fails in seconds, not hours
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
                                    with_truth=args.dataset == "toy") if use_synthetic else None
    resume = Path(args.out) / "last.pt" if args.resume == "auto" else (Path(args.resume) if args.resume else None)
    if resume is not None and args.resume != "auto" and not resume.is_file():
        raise ValueError(f"--resume {resume}: checkpoint not found")
    student = models.build_model(args.arch, args.backbone, K, args.pretrained).to(device)  # after the data checks
    B = args.batch_size
    B_x = args.real_batch or B  # real images per step: B in the paper (its supervised baseline too)
    # An epoch = one pass over the synthetic set, for every method: --method supervised runs as many steps as
    # sense would (the same budget); only without a synthetic set does it count passes over the real set.
    if use_synthetic:
        epoch_len = len(syn_set)
    elif Path(args.synthetic).exists():
        epoch_len = len(data.synthetic_images(args.synthetic))
    else:
        epoch_len = len(real_set)
    steps_per_epoch = max(1, epoch_len // (B * world * args.grad_accum))
    total = args.iters or args.epochs * steps_per_epoch
    args.eval_every = args.eval_every or max(1, total // 4)
    args.save_every = args.save_every or args.eval_every
    args.panel_every = args.eval_every if args.panel_every is None else args.panel_every
    out = Path(args.out)
    if is_main:
        (out / "panels").mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1) + "\n")
        print(f"train.py: {args.method} | {args.dataset} (K={K}) | {args.arch}/{args.backbone} "
              f"({student.pretrained_file or 'random init'}) | {total} steps of {B_x} real"
              f"{f' + {B} synthetic' if use_synthetic else ''} x {world} rank(s) x {args.grad_accum} | crop "
              f"{args.crop_size} | {device} {amp} | run folder {out}")
        print("config: " + json.dumps(vars(args)))

    # ---- model, teacher, optimizer
    teacher = deepcopy(student).eval()  # EMA teacher: never trained by gradients
    for p in teacher.parameters():
        p.requires_grad_(False)
    if args.lock_backbone:
        for p in student.backbone.parameters():
            p.requires_grad_(False)
    backbone_ids = {id(p) for p in student.backbone.parameters()}
    groups = [{"params": [p for p in student.backbone.parameters() if p.requires_grad], "lr": args.lr, "base": args.lr},
              {"params": [p for p in student.parameters() if id(p) not in backbone_ids],
               "lr": args.lr * args.head_lr_mult, "base": args.lr * args.head_lr_mult}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, weight_decay=args.weight_decay)
    start, best = 0, None
    pseudo_confusion = torch.zeros(K, K, dtype=torch.int64)  # toy world; rows: true class, columns: trained label
    if resume is not None and resume.is_file():
        state = torch.load(resume, map_location="cpu", weights_only=True)
        for key in ("dataset", "arch", "backbone", "method"):
            if state["args"][key] != getattr(args, key):
                raise ValueError(f"--resume {resume}: checkpoint has {key}={state['args'][key]!r}, this run "
                                 f"{getattr(args, key)!r}")
        student.load_state_dict(state["model"])
        teacher.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, best = state["step"], state["best_miou"]
        pseudo_confusion = state.get("pseudo_confusion", pseudo_confusion)
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        if is_main:
            print(f"resumed from {resume} at step {start}")
    device_ids = [device.index] if device.type == "cuda" else None
    net = nn.parallel.DistributedDataParallel(student, device_ids=device_ids) if distributed else student

    def checkpoint(step: int) -> None:
        if is_main:
            state = {"model": student.state_dict(), "ema": teacher.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "best_miou": best, "args": vars(args),
                     "rng_cpu": torch.get_rng_state(), "pseudo_confusion": pseudo_confusion}
            if device.type == "cuda":
                state["rng_cuda"] = torch.cuda.get_rng_state(device)
            save_checkpoint(out / "last.pt", state)

    stop = {"requested": False}  # SIGTERM (a scheduler's pre-emption): finish the step, save, exit cleanly
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

    # ---- loaders: one micro-batch per (step, accumulation index), from the resume point on
    common = dict(start=start * args.grad_accum, steps=total * args.grad_accum, seed=args.seed, rank=rank,
                  world=world, workers=args.workers, pin=device.type == "cuda")
    real_iter = iter(make_loader(real_set, batch=B_x, **common))
    syn_iter = iter(make_loader(syn_set, batch=B, **{**common, "seed": args.seed + 1})) if use_synthetic else None
    val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, range(rank, len(val_set), world)),
                                             batch_size=1, num_workers=args.workers, generator=torch.Generator())
    log_file = out / "metrics.jsonl"
    ohem = args.ohem == "on"
    class_marginal = args.ot_marginal
    if args.ot_marginal == "prior":  # the labelled split's class pixel frequencies, a (K,) tensor
        class_marginal = torch.tensor(data.class_frequencies(args.dataset, args.data_root, args.train_split, K,
                                                             reduce_zero_label=reduce_zero))
        if is_main:
            print("class marginal (prior): " + " ".join(f"{n} {f:.3f}" for n, f in zip(spec.classes, class_marginal)))
    t_last, meter = time.perf_counter(), {}
    progress = tqdm(range(start, total), initial=start, total=total, disable=not is_main, desc="train", leave=False)
    for step in progress:
        student.train()
        for group in optimizer.param_groups:  # poly lr, per iteration
            group["lr"] = poly_lr(group["base"], step, total, args.poly_power)
        logs = {}
        for micro in range(args.grad_accum):
            # 1. batches
            image_x, label_x = (t.to(device, non_blocking=True) for t in next(real_iter))  # (B_x, 3, c, c), (B_x, c, c)
            if use_synthetic:
                batch_u = [t.to(device, non_blocking=True) for t in next(syn_iter)]
                image_w, image_s, ignore_u, box = batch_u[:4]  # (B, 3, c, c) ×2, (B, c, c) bool ×2
                truth = batch_u[4] if len(batch_u) > 4 else None  # (B, c, c) toy world only: never trained on
                if args.no_cutmix:
                    box = torch.zeros_like(box)
                # 2. teacher (EMA) on the weak views, TTA on the first half
                with autocast():
                    scores_u, query_conf = teacher_predict(teacher, image_w, args.tta)  # (B, K, c, c) float32
                # 3. CutMix: strong images and everything the teacher says about them are mixed by the same rule
                image_s, scores_u, ignore_u = cutmix(image_s, box), cutmix(scores_u, box), cutmix(ignore_u, box)
                truth = cutmix(truth, box) if truth is not None else None
                keep = torch.ones_like(box)  # (B, c, c) bool
                if query_conf is not None:  # Mask2Former: drop unsure images
                    sure = query_conf >= args.conf_thresh  # (B,)
                    keep = cutmix(sure[:, None, None].expand_as(box), box)
                    logs["image_ratio"] = float(sure.float().mean())  # share of images the gate keeps
                # pseudo-labels and the γ gate: OT targets (sense) or the teacher's own labels (pseudo, soft)
                targets, gate, target_logs = pseudo_targets(scores_u, ~ignore_u, args, class_marginal)  # (B, K, c, c)
                logs.update(target_logs)
            # 4. student, one forward on [x; u_s]
            with autocast():
                pred = net(torch.cat([image_x, image_s]) if use_synthetic else image_x)
            pred_x, pred_u = split_outputs(pred, B_x)
            # 5. losses
            if args.arch == "dpt":
                if ohem:
                    loss_x, n_x = ohem_cross_entropy(pred_x, label_x, OHEM_THRESH, OHEM_MIN_KEPT)
                else:
                    n_x = int((label_x != data.IGNORE_INDEX).sum())  # sum / count: a crop of padding only gives 0
                    loss_x = F.cross_entropy(pred_x.float(), label_x, ignore_index=data.IGNORE_INDEX,
                                             reduction="sum") / max(n_x, 1)
                loss_x = ddp_mean(loss_x, n_x, device)
            else:
                loss_x = models.mask2former_loss(pred_x, models.semantic_to_targets(label_x, K))["loss"]
            loss_u = torch.zeros((), device=device)
            if use_synthetic:
                if args.arch == "dpt":
                    loss_u = ddp_mean(soft_cross_entropy(pred_u, targets, gate), int(gate.sum()), device)
                    label_u = torch.where(gate, targets.argmax(1), data.IGNORE_INDEX)  # for panels and accuracy
                else:
                    # Mask2Former: hard labels where the OT (or teacher) confidence >= δ, one target per class
                    conf_u, label_u = targets.max(1)
                    label_u[(conf_u < args.conf_thresh) | ignore_u | ~keep] = data.IGNORE_INDEX
                    valid = None if args.m2f_ignore_as_negative else list(label_u != data.IGNORE_INDEX)
                    loss_u = models.mask2former_loss(pred_u, models.semantic_to_targets(label_u, K), valid_masks=valid,
                                                     **M2F_SYNTHETIC)["loss"]
                    gate = label_u != data.IGNORE_INDEX
                logs["mask_ratio"] = float(gate.float().mean())
                logs.update(label_stats(scores_u.argmax(1), targets.argmax(1), gate, truth))
                if truth is not None:  # toy world: which true class each trained pseudo-label had
                    trained = gate & (truth != data.IGNORE_INDEX)
                    pseudo_confusion += confusion_matrix(label_u[trained], truth[trained], K)
            loss = (loss_x + loss_u) / 2 if use_synthetic else loss_x
            # 6. backward (accumulated), optimizer step
            scaler.scale(loss / args.grad_accum).backward()
            logs["loss_x"], logs["loss_u"] = loss_x.item(), loss_u.item()
        if args.clip_grad > 0:  # clipping runs before the step (on unscaled gradients)
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(student.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        # 7. EMA teacher
        ema_update(teacher, student, step, args.ema_decay)
        done = step + 1
        # 8. log, panels, evaluation, checkpoint
        for key, value in logs.items():
            meter.setdefault(key, []).append(value)
        if is_main and (done % args.log_every == 0 or done == total):
            now = time.perf_counter()
            line = {"step": done, **{k: sum(v) / len(v) for k, v in meter.items()},
                    "lr": optimizer.param_groups[0]["lr"], "s_per_step": (now - t_last) / max(1, len(meter.get("loss_x", [1])))}
            t_last, meter = now, {}
            progress.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items()))
            with open(log_file, "a") as f:
                f.write(json.dumps(line) + "\n")
        if is_main and use_synthetic and args.panel_every and (done % args.panel_every == 0 or done == total):
            n = min(PANEL_SAMPLES, B)
            student_u = pred_u if args.arch == "dpt" else models.mask2former_scores(pred_u, image_s.shape[-2:])
            palette = lambda label: data.colorize(label[:n].cpu(), spec.palette)  # noqa: E731
            columns = [("weak view (CutMix)", data.denormalize(cutmix(image_w, box)[:n])),  # what the teacher saw
                       ("teacher argmax", palette(scores_u.argmax(1))),
                       ("OT changed", changed_map(scores_u[:n].argmax(1).cpu(), targets[:n].argmax(1).cpu(),
                                                  gate[:n].cpu(), ~ignore_u[:n].cpu())),
                       ("trained-on label", palette(label_u)),
                       ("student (strong)", palette(student_u.argmax(1).detach()))]
            caption = f"step {done}: {args.method}, trained pixels {logs['mask_ratio']:.1%}"
            if truth is not None:
                columns.insert(1, ("true layout", palette(truth)))
                accuracy = {key: f"{logs[key]:.3f}" if key in logs else "-" for key in ("acc_trained", "acc_all", "acc_teacher")}
                caption += (f"; pseudo-label accuracy: trained pixels {accuracy['acc_trained']}, all pixels "
                            f"{accuracy['acc_all']} (teacher argmax, all pixels {accuracy['acc_teacher']})")
            legend = [*zip(spec.classes, spec.palette), ("not trained on", (0, 0, 0))] if K <= 40 else []
            legend += [(f"OT: {name}", colour) for name, colour in CHANGED_COLOURS.items()]
            save_panel(out / "panels" / f"step{done:07d}.png", columns, legend=legend, caption=caption)
        if done % args.eval_every == 0 or done == total:
            result = evaluate(teacher, val_loader, num_classes=K, mode=args.eval_mode, crop_size=args.crop_size,
                              device=device, amp_dtype=amp_dtype, progress=False)
            best = result["miou"] if best is None else max(best, result["miou"])
            if is_main:
                progress.write(f"step {done}: EMA mIoU {result['miou']:.2f} (best {best:.2f})")
                with open(log_file, "a") as f:
                    iou = [None if math.isnan(v) else v for v in result["iou"]]  # JSON has no NaN
                    line = {"step": done, "miou": result["miou"], "iou": iou, "classes": list(spec.classes),
                            "things": list(data.thing_classes(args.dataset))}
                    if pseudo_confusion.any():  # rows: true class, columns: trained pseudo-label (pixels)
                        line["pseudo_confusion"] = pseudo_confusion.tolist()
                    f.write(json.dumps(line) + "\n")
        stop_now = stop["requested"]
        if distributed:  # every rank stops at the same step, or the next collective would hang
            flag = torch.tensor(float(stop_now), device=device)
            dist.all_reduce(flag)
            stop_now = bool(flag > 0)
        if done % args.save_every == 0 or done == total or stop_now:
            checkpoint(done)
        if stop_now:
            if is_main:
                progress.write(f"SIGTERM: saved {out / 'last.pt'} at step {done}; continue with --resume auto")
            break
    progress.close()
    if is_main and not stop["requested"] and start < total:
        print(format_table(result, spec.classes))
        if pseudo_confusion.any():
            table = save_confusion(out / "confusion.png", pseudo_confusion, spec.classes)
            print(f"trained pseudo-labels against the true layouts, % of each true class ({out / 'confusion.png'}):")
            print(table)
        print(f"EMA teacher mIoU {result['miou']:.2f} after {total} steps; run folder {out}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, ValueError) as error:
        sys.exit(f"train.py: {error}")
