"""Evaluation: mIoU from a confusion matrix, three inference modes, per-class table, prediction on own images,
and the summary table and training curves of finished run folders.

Paper: SENSE §4 "Evaluation" (mIoU; single-scale "s.s." and multi-scale "m.s." results).
IoU_k = TP_k / (TP_k + FP_k + FN_k) over all valid pixels of the set (label 255 ignored), summed over the
dataset and over DDP ranks; mIoU is the mean over the classes that occur in the target or the prediction.

    python eval.py --checkpoint runs/toy_dpt_sense/last.pt                       # CPU, toy world: per-class table
    python eval.py --checkpoint runs/cityscapes_dpt_sense/last.pt --mode slide   # the paper's Cityscapes m.s. number
    python eval.py --checkpoint runs/ade20k_dpt_sense/last.pt --mode ms          # scales {1.0, 1.25} × flip
    python eval.py --checkpoint runs/toy_dpt_sense/last.pt --predict my_photos/ --out predictions/
    python eval.py --summarize runs/study/methods/* --out runs/study/methods.md      # markdown table, seconds
    python eval.py --plot runs/toy_dpt_sense runs/toy_dpt_supervised --out curves.png  # 2×2 curves, seconds

Modes: `single` resizes each image to the nearest multiple of the patch size, predicts, resizes the logits
back; `slide` averages softmax over crop × crop windows at stride ⌊2/3·crop⌋; `ms` averages the logits of
scales {1.0, 1.25}, each with and without a horizontal flip. Resizes are bilinear as in the reference code:
align_corners=True for DPT, False for Mask2Former, whose scores go from stride p/4 to the image in one step.

Run folders (--summarize, --plot) are read from their metrics.jsonl, one JSON object per line. Lines with
"miou" are evaluations of the EMA teacher: "step", "miou" (%), "iou" (list, %, null = class absent from target
and prediction), optionally "classes" (names of the "iou" entries; class0, class1, ... when missing) and
"things" (names of the thing classes). Other lines are training logs: "step" and floats such as "loss_x",
"loss_u", "mask_ratio", "ot_changed", "acc_trained", any of which may be missing. Runs whose folder names
differ only by a seed suffix `_s<digits>` (sense_s0, sense_s1) form one group, one row of the table.

Shapes: B batch, K classes, H×W image pixels.
"""
import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

import data
from model import class_scores, load_checkpoint_model, pick_device, resize

MODES = ("single", "slide", "ms")
MS_SCALES = (1.0, 1.25)  # multi-scale test scales (UniMatch V2 / SENSE evaluation)
SLIDE_STRIDE = 2 / 3  # window stride as a fraction of the crop (UniMatch sliding-window evaluation)
OVERLAY_ALPHA = 0.5  # weight of the colour mask in the overlay pictures
SEED_SUFFIX = re.compile(r"_s\d+$")  # run-folder suffix of a seed: sense_s0, sense_s1 → group sense
SUMMARY_KEYS = ("mask_ratio", "things_gated", "ot_changed", "acc_trained")  # default --keys: training-log means in the table
NO_VALUE = "–"  # table cell of a quantity that no run of the group logged
KEY_DIGITS = 3  # significant digits of the --keys columns
PLOT_PANELS = (("miou", "EMA mIoU (%)"), ("loss_x", "loss_x (labelled)"), ("loss_u", "loss_u (synthetic)"),
               ("mask_ratio", "mask_ratio"))  # (metrics.jsonl key, panel title); "miou" from evaluation lines
PLOT_INCHES, PLOT_DPI = (10, 7), 100  # 1000 × 700 px PNG
PLOT_LINE_STYLES = ("-", "--", ":", "-.")  # seeds of one group: one colour, one style each


# ----------------------------------------------------------------------------------------------------
# Metrics

def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confusion matrix over valid pixels.

    Args:
        pred: (...) long predicted classes in [0, K).
        label: (...) long target classes, 255 = ignore.
        num_classes: K.
    Returns:
        (K, K) int64, rows = target class, columns = predicted class.
    """
    valid = label != data.IGNORE_INDEX
    label, pred = label[valid], pred[valid]  # (N,) valid pixels only
    if label.numel() and int(label.max()) >= num_classes:
        raise ValueError(f"label value {int(label.max())} is not a class id below K={num_classes} nor 255 (ignore)")
    index = label * num_classes + pred  # (N,) flat cell of the matrix
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou_from_confusion(cm: torch.Tensor) -> dict:
    """mIoU, per-class IoU and pixel accuracy from a confusion matrix.

    Args:
        cm: (K, K) counts, rows = target, columns = prediction.
    Returns:
        dict with miou (float, %, mean over classes present in target or prediction), iou (list of K floats,
        %, NaN for a class absent from both) and acc (float, %, pixel accuracy).
    """
    cm = cm.double()
    inter = cm.diag()  # (K,)
    union = cm.sum(0) + cm.sum(1) - inter  # (K,); 0 only when the class is absent from target and prediction
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan"))) * 100
    present = ~iou.isnan()
    miou = float(iou[present].mean()) if present.any() else float("nan")
    acc = float(inter.sum() / cm.sum() * 100) if cm.sum() > 0 else float("nan")
    return dict(miou=miou, iou=iou.tolist(), acc=acc)


# ----------------------------------------------------------------------------------------------------
# Inference modes

def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (attributes such as patch_size live there)."""
    return getattr(model, "module", model)


def _scores_at(model: nn.Module, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class scores of images (B, 3, H, W) resized to size (multiples of the patch), resized back: (B, K, H, W).

    Both resizes as the reference code's evaluation (model.resize: align_corners True for DPT, False for
    Mask2Former); Mask2Former's stride-p/4 scores go to (H, W) in one resize.
    """
    H, W = images.shape[-2:]
    if size != (H, W):
        images = resize(images, size, _unwrap(model).arch)
    return class_scores(model, images, (H, W)).float()  # (B, K, H, W); float32 for averaging under autocast


def _nearest_multiple(size: float, patch: int) -> int:
    """Nearest positive multiple of the patch size, halves rounded up (the reference code's int(x + 0.5))."""
    return max(patch, math.floor(size / patch + 0.5) * patch)


def pad_to_patch(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero-pad (B, 3, H, W) right and bottom to multiples of the patch size; zero = the mean colour."""
    H, W = images.shape[-2:]
    return F.pad(images, (0, -W % patch_size, 0, -H % patch_size))


def _scores_padded(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class scores of images (B, 3, H, W) padded to the patch multiple, cropped back: (B, K, H, W)."""
    H, W = images.shape[-2:]
    return class_scores(model, pad_to_patch(images, _unwrap(model).patch_size)).float()[..., :H, :W]


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, size); the last one is moved back to end at the border."""
    if size <= crop:
        return [0]
    count = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(count)]


def _probabilities(model: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    """Per-pixel class confidences: the softmax of DPT logits; Mask2Former's scores as they are (in [0, Q], not
    normalised over the classes: model.mask2former_scores)."""
    return scores.softmax(1) if _unwrap(model).arch == "dpt" else scores


def infer(model: nn.Module, images: torch.Tensor, *, mode: str = "single",
          crop_size: int | None = None) -> torch.Tensor:
    """Per-pixel class scores of images of any size with one of the evaluation modes.

    Args:
        model: a model from model.build_model (or a DDP wrapper), in eval mode.
        images: (B, 3, H, W) normalised images, any H and W.
        mode: "single", "slide" (needs crop_size) or "ms".
        crop_size: window side for "slide", a multiple of the patch size.
    Returns:
        (B, K, H, W) float32: logits ("single"), averaged softmax ("slide") or averaged logits ("ms");
        Mask2Former scores in place of logits. Take the argmax over K for the prediction.
    """
    patch = _unwrap(model).patch_size
    H, W = images.shape[-2:]
    if mode == "single":
        return _scores_at(model, images, (_nearest_multiple(H, patch), _nearest_multiple(W, patch)))
    if mode == "ms":
        total = 0
        for scale in MS_SCALES:
            size = (_nearest_multiple(H * scale, patch), _nearest_multiple(W * scale, patch))
            total = total + _scores_at(model, images, size)
            total = total + _scores_at(model, images.flip(-1), size).flip(-1)  # flip back to the image frame
        return total / (2 * len(MS_SCALES))
    if mode == "slide":
        if crop_size is None or crop_size % patch:
            raise ValueError(f"--crop-size: mode 'slide' needs a window size that is a multiple of {patch}, "
                             f"got {crop_size}")
        stride = int(crop_size * SLIDE_STRIDE)  # ⌊2/3·crop⌋
        total = torch.zeros(images.shape[0], _unwrap(model).num_classes, H, W, device=images.device)
        count = torch.zeros(1, 1, H, W, device=images.device)  # windows covering each pixel
        for top in _window_starts(H, crop_size, stride):
            for left in _window_starts(W, crop_size, stride):
                window = images[..., top:top + crop_size, left:left + crop_size]  # (B, 3, ≤crop, ≤crop)
                # a window is smaller than the crop only where the image is: pad that one to the patch multiple
                probs = _probabilities(model, _scores_padded(model, window))
                total[..., top:top + crop_size, left:left + crop_size] += probs
                count[..., top:top + crop_size, left:left + crop_size] += 1
        return total / count
    raise ValueError(f"--mode: unknown mode {mode!r}, expected one of {', '.join(MODES)}")


@torch.no_grad()  # evaluation only: no graph is kept
def evaluate(model: nn.Module, loader, *, num_classes: int, mode: str = "single", crop_size: int | None = None,
             device: torch.device | str | None = None, amp_dtype: torch.dtype | None = None,
             progress: bool = True) -> dict:
    """mIoU of a model over a loader of labelled images, summed over DDP ranks when a process group exists.

    Args:
        model: a model from model.build_model (or a DDP wrapper); put in eval mode here, its mode restored after.
        loader: iterable of (images (B, 3, H, W) float, labels (B, H, W) long, 255 = ignore).
        num_classes: K.
        mode: "single", "slide" or "ms" (see infer).
        crop_size: window size for "slide".
        device: where to run (default: the model's device).
        amp_dtype: autocast dtype (e.g. torch.bfloat16 on CUDA); None = full precision.
        progress: show a progress bar (rank 0 only).
    Returns:
        dict with miou (%), iou (K floats, %, NaN = class absent from target and prediction), acc (%).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    distributed = dist.is_available() and dist.is_initialized()
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    show = progress and (not distributed or dist.get_rank() == 0)
    for images, labels in tqdm(loader, desc=f"eval ({mode})", leave=False, disable=None if show else True):
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            scores = infer(model, images, mode=mode, crop_size=crop_size)  # (B, K, H, W)
        cm += confusion_matrix(scores.max(1).indices, labels, num_classes)  # argmax(1), ~8× faster on a CPU
    if distributed:
        dist.all_reduce(cm)  # every rank saw a different shard of the set
    model.train(was_training)
    return miou_from_confusion(cm)


# ----------------------------------------------------------------------------------------------------
# Command line: evaluate a checkpoint, or predict on a folder of images

def format_table(result: dict, class_names: tuple[str, ...]) -> str:
    """Per-class IoU table, then mIoU and pixel accuracy ("-" = class absent from target and prediction)."""
    width = max(len(name) for name in (*class_names, "pixel acc"))
    lines = [f"{'class':<{width}}  IoU (%)"]
    for name, iou in zip(class_names, result["iou"]):
        lines.append(f"{name:<{width}}  {'-' if math.isnan(iou) else f'{iou:6.2f}'}")
    lines.append(f"{'mIoU':<{width}}  {result['miou']:6.2f}")
    lines.append(f"{'pixel acc':<{width}}  {result['acc']:6.2f}")
    return "\n".join(lines)


def _list_images(folder: Path) -> list[Path]:
    """Image files under folder, recursively, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in data.IMAGE_SUFFIXES)


@torch.no_grad()  # inference only
def predict_folder(model: nn.Module, folder: Path, out: Path, palette, *, mode: str, crop_size: int | None,
                   device: torch.device, amp_dtype: torch.dtype | None) -> int:
    """Write <name>_mask.png (colour mask) and <name>_overlay.png for every image under folder.

    Images of any size: infer works on padded copies (single pass) or windows, and returns the image size.
    Returns the number of images written.
    """
    paths = _list_images(folder)
    if not paths:
        raise ValueError(f"--predict: no images ({', '.join(data.IMAGE_SUFFIXES)}) under {folder}")
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    for path in tqdm(paths, desc="predict", disable=None):
        rgb = data.load_image(path)  # (H, W, 3) uint8
        image = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean) / std  # (3, H, W)
        image = image[None].to(device)  # (1, 3, H, W)
        H, W = rgb.shape[:2]
        # padded first, so that "single" predicts at the image's own resolution instead of resizing it
        padded = pad_to_patch(image, model.patch_size)  # (1, 3, H', W')
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            scores = infer(model, padded, mode=mode, crop_size=crop_size)  # (1, K, H', W')
        pred = scores[0, :, :H, :W].argmax(0).to(torch.uint8).cpu().numpy()  # (H, W) class ids, padding cut off
        colour = data.colorize(pred, palette)  # (H, W, 3) uint8
        overlay = (OVERLAY_ALPHA * colour + (1 - OVERLAY_ALPHA) * rgb).round().astype(np.uint8)
        target = out / path.relative_to(folder).parent
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(colour).save(target / f"{path.stem}_mask.png")
        Image.fromarray(overlay).save(target / f"{path.stem}_overlay.png")
    return len(paths)


# ----------------------------------------------------------------------------------------------------
# Run folders: summary table and training curves (machinery; reads what train.py wrote)

def run_group(run_dir: Path) -> str:
    """Group of a run folder: its name without a trailing seed suffix (sense_s2 → sense)."""
    return SEED_SUFFIX.sub("", Path(run_dir).name)


def read_metrics(run_dir: Path, *, need_eval: bool = True) -> tuple[list[dict], list[dict]]:
    """Training and evaluation lines of a run folder's metrics.jsonl, each sorted by step.

    A resumed run logs the steps between its last checkpoint and the interruption twice; the later line wins.

    Args:
        run_dir: a train.py run folder.
        need_eval: raise when the file holds no evaluation line (the table needs one, the curves do not).
    Returns:
        (training lines, evaluation lines), lists of dicts; evaluation lines are the ones with "miou".
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (not a train.py run folder)")
    train_by_step, eval_by_step = {}, {}
    with open(path) as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                line = None
            if not isinstance(line, dict) or "step" not in line:
                raise ValueError(f"{path} line {number}: not a JSON object with a \"step\"")
            (eval_by_step if "miou" in line else train_by_step)[line["step"]] = line
    if need_eval and not eval_by_step:
        raise ValueError(f"{run_dir}: metrics.jsonl has no evaluation line (a line with \"miou\")")
    train_lines = [train_by_step[step] for step in sorted(train_by_step)]
    eval_lines = [eval_by_step[step] for step in sorted(eval_by_step)]
    return train_lines, eval_lines


def _class_iou(line: dict, run_dir: Path) -> dict:
    """Class name → IoU (%, None = absent) of an evaluation line; class0, class1, ... without "classes"."""
    names = line.get("classes") or [f"class{k}" for k in range(len(line["iou"]))]
    if len(names) != len(line["iou"]):
        raise ValueError(f"{run_dir}: evaluation at step {line['step']} has {len(names)} classes "
                         f"but {len(line['iou'])} IoU values")
    return dict(zip(names, line["iou"]))


def _thing_iou(line: dict, run_dir: Path) -> float | None:
    """Mean IoU (%) of the thing classes of an evaluation line, nulls left out; None without things."""
    iou = _class_iou(line, run_dir)
    values = []
    for name in line.get("things") or []:
        if name not in iou:
            raise ValueError(f"{run_dir}: thing class {name!r} is not among the evaluation's classes")
        if iou[name] is not None:
            values.append(iou[name])
    return sum(values) / len(values) if values else None


def mean_std(values: list[float], decimals: int | None = 2) -> str:
    """'mean ± std' (sample std, ddof=1) with decimals, None = KEY_DIGITS significant digits of the mean.

    The mean alone for one value, NO_VALUE for none.
    """
    if not values:
        return NO_VALUE
    mean = float(np.mean(values))
    if decimals is None:  # key columns differ in scale (lr 1e-4, mask_ratio 0.5): the mean's digits decide
        magnitude = math.floor(math.log10(abs(mean))) if math.isfinite(mean) and mean != 0 else 0
        decimals = max(0, KEY_DIGITS - 1 - magnitude)
    if len(values) == 1:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {float(np.std(values, ddof=1)):.{decimals}f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """Markdown table padded to column width; the first column left-aligned, the numbers right-aligned."""
    widths = [max(3, *(len(cell) for cell in column)) for column in zip(header, *rows)]
    lines = []
    for cells in [header, None, *rows]:
        if cells is None:  # the separator row sets the alignment
            cells = [":" + "-" * (w - 1) if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
        padded = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths))]
        lines.append("| " + " | ".join(padded) + " |")
    return "\n".join(lines)


def summarize(run_dirs: list[Path], keys: tuple[str, ...] | list[str] = SUMMARY_KEYS,
              per_class: bool = False) -> str:
    """One markdown table of run folders: a row per group of seeds, final EMA mIoU and training-log means.

    Args:
        run_dirs: train.py run folders; groups (seed suffix removed) in order of first appearance.
        keys: training-log keys to average over each run's log lines; only keys some run logged get a column.
        per_class: add one column per class with the final IoU.
    Returns:
        The table, a blank line and one line saying how many runs were read and what the cells mean.
        mIoU, things and class cells are mean ± sample std over the group's runs (the mean alone for one run).
    Raises:
        ValueError: a folder without metrics.jsonl or without an evaluation line, or a group whose runs end
        at different steps (a half-finished run).
    """
    keys = list(dict.fromkeys(keys))  # a key given twice is one column
    # 1. read each run: its last evaluation, and the mean of every key over its training lines
    groups: dict[str, list[dict]] = {}
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        train_lines, eval_lines = read_metrics(run_dir)
        final = eval_lines[-1]
        key_means = {}
        for key in keys:
            values = [line[key] for line in train_lines if line.get(key) is not None]
            if values:
                key_means[key] = sum(values) / len(values)
        groups.setdefault(run_group(run_dir), []).append(dict(
            step=final["step"], miou=final["miou"], iou=_class_iou(final, run_dir),
            things=_thing_iou(final, run_dir), names_things="things" in final, keys=key_means))
    # 2. every run of a group must have reached the same final evaluation
    for group, runs in groups.items():
        steps = list(dict.fromkeys(run["step"] for run in runs))  # distinct, in command-line order
        if len(steps) > 1:
            raise ValueError(f"group {group}: runs end at different steps ({', '.join(str(s) for s in steps)})")
    # 3. columns: things only when evaluations name them; classes in order of first appearance
    all_runs = [run for runs in groups.values() for run in runs]
    show_things = any(run["names_things"] for run in all_runs)
    class_names = []
    if per_class:
        for run in all_runs:
            for name in run["iou"]:
                if name not in class_names:
                    class_names.append(name)
    key_columns = [key for key in keys if any(key in run["keys"] for run in all_runs)]
    header = ["run", "seeds", "mIoU"] + (["things"] if show_things else []) + class_names + key_columns
    # 4. one row per group
    rows = []
    for group, runs in groups.items():
        row = [group, str(len(runs)), mean_std([run["miou"] for run in runs])]
        if show_things:
            row.append(mean_std([run["things"] for run in runs if run["things"] is not None]))
        for name in class_names:
            row.append(mean_std([run["iou"][name] for run in runs if run["iou"].get(name) is not None]))
        for key in key_columns:
            row.append(mean_std([run["keys"][key] for run in runs if key in run["keys"]], decimals=None))
        rows.append(row)
    count = len(all_runs)
    footer = (f"{count} run{'s' if count != 1 else ''} read in {len(groups)} group{'s' if len(groups) != 1 else ''}. "
              f"mIoU, things (mean IoU of the thing classes) and class columns: final EMA evaluation in %; "
              f"{', '.join(key_columns) or 'key columns'}: mean over each run's training log lines. "
              f"Cells are mean ± sample std (ddof=1) over the group's runs, the mean alone for one run; "
              f"{NO_VALUE} = not logged.")
    return _markdown_table(header, rows) + "\n\n" + footer


def _write_atomic(path: Path, write) -> Path:
    """Call write(temporary path) next to path, then os.replace: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # only left behind when write failed
    return path


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Write a 2×2 PNG of training curves: EMA mIoU, loss_x, loss_u and mask_ratio against step.

    One line per run, labelled by its folder name; the runs of a group share a colour and differ by line
    style. A panel whose key no run logged says "no data".

    Args:
        run_dirs: train.py run folders (a run without evaluations yet still plots its losses).
        out: the PNG to write (1000 × 700 px).
    Returns:
        out, as a Path.
    """
    try:  # the Agg canvas directly: no pyplot state, no display; imported here so eval.py starts without it
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("--plot: needs matplotlib (pip install matplotlib)") from None
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    runs = [(run_dir, *read_metrics(run_dir, need_eval=False)) for run_dir in run_dirs]
    groups = list(dict.fromkeys(run_group(run_dir) for run_dir in run_dirs))
    figure = Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2).flatten()  # (4,) panels, row by row
    seeds_drawn = {group: 0 for group in groups}
    handles = {}  # run name → its first line, for one legend that names every run
    for run_dir, train_lines, eval_lines in runs:
        group = run_group(run_dir)
        colour = f"C{groups.index(group) % 10}"  # matplotlib's 10-colour cycle
        style = PLOT_LINE_STYLES[seeds_drawn[group] % len(PLOT_LINE_STYLES)]
        seeds_drawn[group] += 1
        for axis, (key, _) in zip(axes, PLOT_PANELS):
            lines = eval_lines if key == "miou" else train_lines
            steps = [line["step"] for line in lines if line.get(key) is not None]
            values = [line[key] for line in lines if line.get(key) is not None]
            if steps:  # evaluations are sparse: markers keep a single one visible
                (line,) = axis.plot(steps, values, color=colour, linestyle=style, linewidth=1.2,
                                    marker="o" if key == "miou" else None, markersize=3, label=run_dir.name)
                handles.setdefault(run_dir.name, line)
    legend_drawn = False
    for axis, (key, title) in zip(axes, PLOT_PANELS):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if not axis.lines:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes, color="gray")
        elif not legend_drawn:  # in the first panel with data, naming also runs drawn only in later panels
            axis.legend(handles=list(handles.values()), fontsize="small")
            legend_drawn = True
    return _write_atomic(Path(out), lambda path: figure.savefig(path, format="png"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to do: exactly one
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--checkpoint", help="train.py checkpoint to evaluate, e.g. runs/toy_dpt_sense/last.pt")
    task.add_argument("--summarize", nargs="+", metavar="RUN",
                      help="run folders to summarise in one markdown table, e.g. runs/study/methods/*")
    task.add_argument("--plot", nargs="+", metavar="RUN", help="run folders whose curves to draw (needs --out)")
    parser.add_argument("--weights", default="ema", choices=("ema", "model"),
                        help="which weights: the EMA teacher or the student (default: ema)")
    parser.add_argument("--mode", default="single", choices=MODES, help="inference mode (default: single)")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="window of --mode slide (default: the checkpoint's crop size)")
    # evaluation on a labelled split
    parser.add_argument("--data-root", default=None, help="dataset root (default: the checkpoint's)")
    parser.add_argument("--split", default="val", help="split file name without .txt (default: val)")
    parser.add_argument("--workers", type=int, default=2, help="data loader workers (default: 2)")
    # prediction on own images
    parser.add_argument("--predict", default=None, help="folder of images to segment instead of evaluating")
    # run summaries
    parser.add_argument("--keys", nargs="+", default=list(SUMMARY_KEYS),
                        help="--summarize: training-log keys averaged per run, a column each when some run "
                             f"logged them (default: {' '.join(SUMMARY_KEYS)})")
    parser.add_argument("--per-class", action="store_true", help="--summarize: one IoU column per class")
    parser.add_argument("--out", default=None,
                        help="output: folder for --predict, markdown file for --summarize (optional), PNG for --plot")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    args = parser.parse_args(argv)
    if args.predict is not None and args.out is None:
        raise SystemExit("--out: needed with --predict (folder for the masks and overlays)")
    if args.plot is not None and args.out is None:
        raise SystemExit("--out: needed with --plot (the PNG to write, e.g. curves.png)")

    # run folders: no model, no device
    if args.summarize is not None or args.plot is not None:
        try:
            if args.summarize is not None:
                table = summarize([Path(p) for p in args.summarize], keys=args.keys, per_class=args.per_class)
                print(table)
                if args.out is not None:
                    _write_atomic(Path(args.out), lambda path: path.write_text(table + "\n"))
                    print(f"wrote {args.out}")
            else:
                print(f"wrote {plot_runs([Path(p) for p in args.plot], Path(args.out))}")
        except ValueError as error:
            sys.exit(f"eval.py: {error}")
        return

    # a checkpoint: evaluate it on a labelled split, or predict on own images
    device = pick_device(args.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None  # bf16 autocast on CUDA, float32 elsewhere
    try:
        model, train_args = load_checkpoint_model(args.checkpoint, args.weights)
        spec = data.DATASETS[train_args["dataset"]]
        crop_size = args.crop_size or train_args.get("crop_size")
        model.to(device)
        if args.predict is not None:
            folder = Path(args.predict)
            if not folder.is_dir():
                raise ValueError(f"--predict: {folder} is not a folder")
            count = predict_folder(model, folder, Path(args.out), spec.palette, mode=args.mode,
                                   crop_size=crop_size, device=device, amp_dtype=amp_dtype)
            print(f"wrote masks and overlays of {count} images to {args.out}")
            return
        # the toy world is generated at its root on first use; real roots get their split files written
        dataset = data.LabelledDataset(train_args["dataset"], args.data_root or train_args["data_root"], args.split,
                                       train=False, patch_size=model.patch_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=args.workers)
        result = evaluate(model, loader, num_classes=train_args["num_classes"], mode=args.mode,
                          crop_size=crop_size, device=device, amp_dtype=amp_dtype)
    except (ValueError, data.DataError) as error:
        raise SystemExit(str(error)) from None
    print(f"{args.checkpoint} ({args.weights}), {train_args['dataset']} {args.split}, {len(dataset)} images, "
          f"mode {args.mode}")
    print(format_table(result, spec.classes))


if __name__ == "__main__":
    main()
