"""Evaluation: mIoU from a confusion matrix, three inference modes, per-class table, prediction on own images.

Paper: SENSE §4 "Evaluation" (mIoU; single-scale "s.s." and multi-scale "m.s." results); DESIGN.md §2.5.
IoU_k = TP_k / (TP_k + FP_k + FN_k) over all valid pixels of the set (label 255 ignored), summed over the
dataset and over DDP ranks; mIoU is the mean over the classes that occur in the target or the prediction.

    python eval.py --checkpoint runs/toy/last.pt                       # CPU, toy world: per-class table
    python eval.py --checkpoint runs/cityscapes/last.pt --mode slide   # the paper's Cityscapes m.s. number
    python eval.py --checkpoint runs/ade20k/last.pt --mode ms          # scales {1.0, 1.25} × flip
    python eval.py --checkpoint runs/toy/last.pt --predict my_photos/ --out predictions/

Modes: `single` resizes each image to the nearest multiple of the patch size, predicts, resizes the logits
back; `slide` averages softmax over crop × crop windows at stride ⌊2/3·crop⌋; `ms` averages the logits of
scales {1.0, 1.25}, each with and without a horizontal flip.

Shapes: B batch, K classes, H×W image pixels.
"""
import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

import data
from model import class_scores, load_checkpoint_model, pick_device

MODES = ("single", "slide", "ms")
MS_SCALES = (1.0, 1.25)  # multi-scale test scales (UniMatch V2 / SENSE evaluation)
SLIDE_STRIDE = 2 / 3  # window stride as a fraction of the crop (UniMatch sliding-window evaluation)
OVERLAY_ALPHA = 0.5  # weight of the colour mask in the overlay pictures


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
    """Class scores of images (B, 3, H, W) resized to size (multiples of the patch), resized back: (B, K, H, W)."""
    H, W = images.shape[-2:]
    if size != (H, W):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    scores = class_scores(model, images).float()  # (B, K, *size); float32 for averaging under autocast
    if size != (H, W):
        scores = F.interpolate(scores, size=(H, W), mode="bilinear", align_corners=False)
    return scores


def _nearest_multiple(size: float, patch: int) -> int:
    """Nearest positive multiple of the patch size."""
    return max(patch, round(size / patch) * patch)


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
    """Per-pixel class probabilities: softmax of DPT logits; Mask2Former scores are already in [0, 1]."""
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
    for images, labels in tqdm(loader, desc=f"eval ({mode})", leave=False, disable=not show):
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            scores = infer(model, images, mode=mode, crop_size=crop_size)  # (B, K, H, W)
        cm += confusion_matrix(scores.argmax(1), labels, num_classes)
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
    for path in tqdm(paths, desc="predict"):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="train.py checkpoint, e.g. runs/toy/last.pt")
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
    parser.add_argument("--out", default=None, help="output folder for --predict")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    args = parser.parse_args()
    if args.predict is not None and args.out is None:
        raise SystemExit("--out: needed with --predict (folder for the masks and overlays)")

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
