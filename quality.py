"""What makes synthetic images effective, measured: scene density and instance fidelity (the paper's
dual-factor analysis: the "dense vs sparse" and "fine vs coarse" studies and the quality ladder; README "What makes
synthetic data effective"), and the labelled synthetic splits of its Section 3 protocol (a fixed teacher trained on
real images labels each split once; a student trains on it alone).

Density = instances per image: connected components per class of a teacher's argmax prediction (any
checkpoint written by train.py) above a minimum area, plus the number of distinct classes among them; or,
as the paper measures it, the boxes an open-vocabulary detector (GroundingDINO, a local transformers
folder) finds when prompted with the dataset's class names.
Fidelity = GLCM texture statistics (Haralick: contrast, homogeneity, energy, correlation, entropy) of
the grey image and the JPEG compression ratio, both rising with high-frequency detail.

    python data.py toy --root data/toy                                   # the toy world, if not there yet
    python quality.py score --images data/toy/synthetic_dense_fine.txt --out runs/quality/scores.csv  # CPU, seconds
    python quality.py score --images data/toy/synthetic.txt --teacher runs/toy_dpt_sense/last.pt --out runs/quality/scores.csv
    python quality.py select --scores runs/quality/scores.csv --by both --top 0.5 \
        --out runs/quality/top.txt --sheet runs/quality/sheet.png
    python quality.py ladder --scores runs/quality/scores.csv --out-dir runs/quality/ladder
    python quality.py gate --teacher runs/toy_dpt_supervised/last.pt --images data/toy/synthetic.txt  # per class
    python quality.py label --teacher runs/toy_dpt_supervised/last.pt --images data/toy/synthetic/dense_fine \
        --out runs/labels/dense_fine && python train.py --method supervised --train-split runs/labels/dense_fine/labels.txt
    python quality.py score --images /data/flux_seed0 --teacher runs/cityscapes_dpt_sense/last.pt --device cuda --out scores.csv
    python quality.py score --images /data/flux_seed0 --detector pretrained/grounding-dino-base --dataset cityscapes \
        --out scores.csv && python quality.py ladder --scores scores.csv --density boxes --out-dir ladder

Shapes: B images, H×W pixels, L grey levels, D distances, A angles, K classes, N = B*H*W pixels of a
batch, E neighbour pairs.
"""
import argparse
import csv
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy.stats import rankdata
from torchvision.ops import nms
from tqdm import tqdm

import data
import model
import train
from eval import SEED_SUFFIX, confusion_matrix, mean_std, miou_from_confusion

# ITU-R 601-2 luma in 16-bit fixed point with rounding, exactly as PIL's Image.convert("L") computes it
# (Pillow src/libImaging/Convert.c, L24): grey = (19595 R + 38470 G + 7471 B + 2^15) >> 16.
LUMA_WEIGHTS = (19595, 38470, 7471)
# scikit-image's graycoprops treats a marginal standard deviation below this as zero (correlation = 1).
ZERO_STD = 1e-15
# Compression codec: JPEG (PIL/libjpeg) at quality 90 with 4:4:4 chroma. JPEG, not PNG: it is 12-15x faster
# at 1024x2048 (bench.py quality) and, being lossy, its size counts detail above the quantisation step rather
# than sensor noise in the low bits; quality 90 keeps that step fine enough that fine texture still costs
# bytes, and 4:4:4 keeps colour detail from being halved before it is measured.
JPEG_QUALITY = 90
JPEG_SUBSAMPLING = 0
# GLCM work split: pixels per chunk of images (bounds the int32 copies to 64 MiB each), pairs per
# torch.bincount call (= per thread task), and matrices per call (each L*L int64, 512 KiB at 256 levels).
# Few large calls rather than many small ones: each call allocates its output, and many small allocations
# were the slowest part on small images.
CHUNK_PIXELS = 1 << 24
PAIRS_PER_TASK = 1 << 21
MAX_UNITS_PER_TASK = 32
# Below this many pixels per image, JPEG encoding runs without a thread pool: threads would cost more than
# the encoding they share.
PARALLEL_MIN_PIXELS = 1 << 18
# Detector density: boxes overlapping more than this (IoU) are one object, whichever prompt found them
# (the usual NMS threshold of detection pipelines).
DETECTOR_NMS_IOU = 0.5
GLCM_STATS = ("contrast", "homogeneity", "energy", "correlation", "entropy")
# Direction in which each GLCM statistic grows with fine detail (sharp edges, texture): +1 or -1.
FIDELITY_SIGN = {"contrast": 1, "entropy": 1, "homogeneity": -1, "energy": -1, "correlation": -1}
CSV_FIELDS = ("image", "label", "instances", "classes", "boxes", *GLCM_STATS, "compression")
DENSITY_COLUMNS = ("instances", "boxes")  # teacher components, detector boxes
LADDER_SPLITS = ("sparse_coarse", "sparse_fine", "dense_coarse", "dense_fine")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="score a folder or split file of images into a CSV")
    score.add_argument("--images", required=True, help="folder of images (recursive) or split file (.txt)")
    score.add_argument("--out", required=True, help="CSV file to write")
    score.add_argument("--teacher", default=None,
                       help="train.py checkpoint whose EMA teacher predicts the layouts for density "
                            "(default: none, fidelity only)")
    score.add_argument("--min-area", type=float, default=5e-4,
                       help="smallest component counted as an instance, as a fraction of the predicted map's pixels "
                            "(default: 5e-4)")
    score.add_argument("--connectivity", type=int, choices=(4, 8), default=4,
                       help="pixel neighbourhood of a connected component (default: 4)")
    score.add_argument("--detector", default=None,
                       help="local GroundingDINO folder (transformers format): also count its boxes, the paper's "
                            "density measure (default: none)")
    score.add_argument("--box-threshold", type=float, default=0.35,
                       help="detector box score threshold (default: 0.35, GroundingDINO's)")
    score.add_argument("--dataset", default=None, choices=sorted(data.DATASETS),
                       help="class names the detector is prompted with (default: the teacher's dataset, else toy)")
    score.add_argument("--levels", type=int, default=256, help="GLCM grey levels, at most 256 (default: 256)")
    score.add_argument("--distances", type=int, nargs="+", default=[1], help="GLCM pixel distances (default: 1)")
    score.add_argument("--angles", type=float, nargs="+", default=[0.0, 45.0, 90.0, 135.0],
                       help="GLCM angles in degrees (default: 0 45 90 135)")
    score.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device (default: auto)")

    for name, text in (("select", "write the top or bottom fraction by a score as a split file"),
                       ("ladder", "write the sparse/dense x coarse/fine splits at matched sizes")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--scores", required=True, help="CSV written by `quality.py score`")
        p.add_argument("--density", choices=DENSITY_COLUMNS, default="instances",
                       help="density column: teacher components or detector boxes (default: instances)")
        p.add_argument("--fidelity-stat", choices=GLCM_STATS, default="contrast",
                       help="GLCM statistic ranked together with the compression ratio as fidelity (default: contrast)")
        p.add_argument("--sheet", default=None, help="also draw a contact sheet of the extremes to this PNG")
        p.add_argument("--sheet-n", type=int, default=8, help="images per row of the contact sheet (default: 8)")
    select = sub.choices["select"]
    select.add_argument("--by", choices=("density", "fidelity", "both", "random"), required=True,
                        help="score to rank by (random: a seeded draw of the same size, the control of a selection)")
    select.add_argument("--seed", type=int, default=0, help="seed of --by random (default: 0)")
    which = select.add_mutually_exclusive_group(required=True)
    which.add_argument("--top", type=float, help="keep the highest-scoring fraction F in (0, 1]")
    which.add_argument("--bottom", type=float, help="keep the lowest-scoring fraction F in (0, 1]")
    select.add_argument("--out", required=True, help="split file to write")
    sub.choices["ladder"].add_argument("--out-dir", required=True,
                                       help="folder for the four <density>_<fidelity>.txt splits")

    gate = sub.add_parser("gate", help="per class: what a teacher's confidence gate would train on, against the "
                                       "true layouts (labelled splits, or synthetic images with stored layouts)")
    gate.add_argument("--teacher", required=True, nargs="+",
                      help="train.py checkpoint(s) (their EMA teachers); several: one table of mean ± std over them")
    gate.add_argument("--images", required=True, help="split file (.txt) of labelled or toy synthetic images")
    gate.add_argument("--conf-thresh", type=float, default=0.95, help="γ, the confidence gate (default: 0.95)")
    gate.add_argument("--max-images", type=int, default=None, help="the first N images only (default: all)")
    gate.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device (default: auto)")

    label = sub.add_parser("label", help="the paper's Section 3 protocol: a fixed teacher labels every synthetic "
                                         "image; writes PNG labels and a split file for train.py --train-split")
    who = label.add_mutually_exclusive_group(required=True)
    who.add_argument("--teacher", help="train.py checkpoint (its EMA teacher), trained on real images")
    who.add_argument("--truth", action="store_true",
                     help="the toy world's stored true layouts instead (the control: an upper bound per split)")
    label.add_argument("--images", required=True, help="folder of images (recursive) or split file (.txt)")
    label.add_argument("--out", required=True, help=f"folder for the labels and their split file {LABEL_SPLIT}")
    label.add_argument("--tta", default=None, choices=("none", "flip", "scales"),
                       help="the teacher's TTA views (default: the teacher's run's own, train.py --tta)")
    label.add_argument("--conf-thresh", type=float, default=0.0,
                       help="label 255 (ignore) below this confidence (default: 0, every pixel labelled, as the "
                            "paper's protocol)")
    label.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device (default: auto)")

    truth = sub.add_parser("truth", help="per class IoU of labelled splits against the stored true layouts (toy)")
    truth.add_argument("--labels", required=True, nargs="+",
                       help=f"split file(s) of `quality.py label` ({LABEL_SPLIT}); one column per folder name without "
                            f"its seed suffix (dense_fine_s0, dense_fine_s1 -> dense_fine: mean ± std)")
    truth.add_argument("--dataset", default="toy", choices=sorted(data.DATASETS),
                       help="class names of the labels (default: toy)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- fidelity: GLCM and compression

def to_grey(images: torch.Tensor) -> torch.Tensor:
    """Grey levels of uint8 images by ITU-R 601-2 luma, bit-exact with PIL's convert("L").

    Args:
        images: (B, 3, H, W) uint8 RGB, or (B, H, W) uint8 grey (returned unchanged).
    Returns:
        (B, H, W) uint8.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"images: expected uint8, got {images.dtype}")
    if images.dim() == 3:
        return images
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (B, H, W) grey or (B, 3, H, W) RGB, got {tuple(images.shape)}")
    red, green, blue = (images[:, c].to(torch.int32) for c in range(3))  # (B, H, W) int32 each
    luma = red.mul_(LUMA_WEIGHTS[0]).add_(green.mul_(LUMA_WEIGHTS[1])).add_(blue.mul_(LUMA_WEIGHTS[2]))  # < 2^24
    luma.add_(1 << 15)  # round to nearest
    return (luma >> 16).to(torch.uint8)


def _offsets(distances, angles) -> list[tuple[int, int]]:
    """(row, col) step of each (distance, angle) pair, in scikit-image's convention (angle 0 = right, pi/2 = down)."""
    return [(round(math.sin(a) * d), round(math.cos(a) * d)) for d in distances for a in angles]


def _pair_slices(H: int, W: int, dr: int, dc: int) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Where the first and second pixel of each (r, c) -> (r + dr, c + dc) pair lie, or None if no pair fits."""
    r0, r1, c0, c1 = max(0, -dr), min(H, H - dr), max(0, -dc), min(W, W - dc)
    if r1 <= r0 or c1 <= c0:  # the offset leaves the image: no pairs, like scikit-image
        return None
    return (slice(r0, r1), slice(c0, c1)), (slice(r0 + dr, r1 + dr), slice(c0 + dc, c1 + dc))


def _histogram(grey: torch.Tensor, units: list[tuple[int, int, int]], levels: int) -> torch.Tensor:
    """Co-occurrence counts of several (image, dr, dc) units of (b, H, W) int32 grey levels with one
    torch.bincount: unit k's pair codes i * L + j, shifted by k * L * L, fill one int32 buffer.
    Returns (len(units) * L * L,) int64."""
    H, W = grey.shape[-2:]
    bins = levels * levels
    slices = [_pair_slices(H, W, dr, dc) for _, dr, dc in units]
    sizes = [0 if s is None else (s[0][0].stop - s[0][0].start) * (s[0][1].stop - s[0][1].start) for s in slices]
    code = torch.empty(sum(sizes), dtype=torch.int32, device=grey.device)  # (pairs,) one allocation for all units
    position = 0
    for k, ((b, _, _), pair, size) in enumerate(zip(units, slices, sizes)):
        if pair is None:
            continue
        out = code[position:position + size].view(pair[0][0].stop - pair[0][0].start, -1)  # (h, w)
        torch.add(grey[b][pair[1]], grey[b][pair[0]], alpha=levels, out=out)  # j + L * i
        if k:
            out.add_(k * bins)
        position += size
    return torch.bincount(code, minlength=len(units) * bins)


@contextmanager
def _intra_op_threads(threads: int | None):
    """Run the block with torch's intra-op thread count set to threads (None: unchanged), then restore it.

    The GLCM thread pool is the parallelism on CPU: letting its tasks (and the statistics after them) also
    spread their small ops over every core oversubscribes the cores (measured on 2 shared cores: 99-174 ms
    per 1024x2048 image instead of 53-84).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def glcm_counts(images: torch.Tensor, levels: int = 256, distances=(1,),
                angles=(0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4), *, workers: int | None = None) -> torch.Tensor:
    """Grey-level co-occurrence counts, the batched equivalent of scikit-image's `graycomatrix`
    (not symmetric, not normalised; i = level at a pixel, j = level at the pixel one offset away).

    Levels below 256 quantise the uint8 grey value g to floor(g * levels / 256). Each pair becomes one
    code i * L + j, counted by torch.bincount; on CPU the histograms of different (image, offset) units run
    in a thread pool because bincount is a serial loop there.

    Args:
        images: (B, H, W) uint8 grey or (B, 3, H, W) uint8 RGB (made grey by `to_grey`).
        levels: number of grey levels L, 2..256.
        distances: D pixel distances.
        angles: A angles in radians.
        workers: CPU threads for the histograms, each running its ops on one intra-op thread
            (default: torch.get_num_threads()).
    Returns:
        (B, D, A, L, L) int64 counts.
    """
    if not 2 <= levels <= 256:
        raise ValueError(f"levels: expected 2..256, got {levels}")
    grey = to_grey(images)  # (B, H, W) uint8
    if levels < 256:
        grey = ((grey.to(torch.int32) * levels) >> 8).to(torch.uint8)
    offsets = _offsets(distances, angles)
    # Images in chunks of at most CHUNK_PIXELS, so the int32 copies stay bounded; within a chunk, consecutive
    # (image, offset) units are packed into tasks of about PAIRS_PER_TASK pairs: few allocations for small
    # images, one task per offset for large ones so that the thread pool (CPU) has work to share.
    per_image = max(1, grey.shape[-2] * grey.shape[-1])
    chunk = max(1, CHUNK_PIXELS // per_image)
    step = max(1, min(PAIRS_PER_TASK // per_image, MAX_UNITS_PER_TASK))
    threads = (workers or torch.get_num_threads()) if grey.device.type == "cpu" else 1
    counts = []
    with ThreadPoolExecutor(threads) as pool, _intra_op_threads(1 if threads > 1 else None):
        for start in range(0, grey.shape[0], chunk):
            levels_int = grey[start:start + chunk].to(torch.int32)  # (b, H, W): codes need more than 8 bits
            units = [(b, dr, dc) for b in range(levels_int.shape[0]) for dr, dc in offsets]
            tasks = [units[k:k + step] for k in range(0, len(units), step)]
            mapper = pool.map if threads > 1 and len(tasks) > 1 else map
            counts += mapper(lambda task: _histogram(levels_int, task, levels), tasks)
    counts = counts[0] if len(counts) == 1 else torch.cat(counts)  # (B * D * A * L * L,)
    return counts.view(grey.shape[0], len(distances), len(angles), levels, levels)


def glcm_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Haralick statistics of the symmetric, normalised co-occurrence matrices, as scikit-image's
    `graycoprops` defines them (entropy in nats).

    Args:
        counts: (..., L, L) co-occurrence counts (e.g. from `glcm_counts`).
    Returns:
        dict name -> (...) float64 for contrast, homogeneity, energy, correlation, entropy.
    """
    L = counts.shape[-1]
    # Work on the symmetric counts S and divide scalars by their total N instead of normalising the matrix:
    # one pass less over L*L entries, and the same numbers (P = S / N).
    S = (counts + counts.transpose(-1, -2)).double()  # (..., L, L) symmetric counts, exact in float64
    level = torch.arange(L, dtype=torch.float64, device=counts.device)
    gap2 = (level[:, None] - level[None, :]).square().flatten()  # (L*L,) (i - j)^2
    weights = torch.stack([gap2, 1.0 / (1.0 + gap2), torch.ones_like(gap2)], 1)  # (L*L, 3)
    contrast, homogeneity, total = (S.flatten(-2) @ weights).unbind(-1)  # (...) each
    total = total.clamp(min=1)  # an offset without pairs leaves an all-zero matrix, as in scikit-image
    marginal = S.sum(-1) / total.unsqueeze(-1)  # (..., L): rows and columns agree because S is symmetric
    mean = marginal @ level  # (...)
    centred = level - mean.unsqueeze(-1)  # (..., L) i - mu
    var = (marginal * centred.square()).sum(-1)  # (...)
    cov = ((S @ centred.unsqueeze(-1)).squeeze(-1) * centred).sum(-1) / total  # (...) sum_ij P (i - mu)(j - mu)
    std = var.sqrt()
    correlation = torch.where(std < ZERO_STD, torch.ones_like(cov), cov / (std * std).clamp(min=ZERO_STD ** 2))
    entropy = total.log() - torch.special.xlogy(S, S).sum((-1, -2)) / total  # -sum P ln P = ln N - sum S ln S / N
    return {
        "contrast": contrast / total,
        "homogeneity": homogeneity / total,
        "energy": torch.linalg.vector_norm(S.flatten(-2), dim=-1) / total,
        "correlation": correlation,
        "entropy": entropy,
    }


def glcm_features(images: torch.Tensor, levels: int = 256, distances=(1,),
                  angles=(0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)) -> dict[str, torch.Tensor]:
    """GLCM texture statistics per image, averaged over distances and angles; equal to scikit-image's
    `graycomatrix(symmetric=True, normed=True)` + `graycoprops(...).mean()` on the same grey image.

    Args:
        images: (B, H, W) uint8 grey or (B, 3, H, W) uint8 RGB (grey = ITU-R 601-2 luma, as PIL "L").
        levels: grey levels L (2..256; below 256 the grey value g becomes floor(g * L / 256)).
        distances: pixel distances.
        angles: angles in radians (0 = right neighbour, pi/2 = the pixel below).
    Returns:
        dict contrast, homogeneity, energy, correlation, entropy -> (B,) float64.
    """
    workers = torch.get_num_threads() if images.device.type == "cpu" else 1
    with _intra_op_threads(1 if workers > 1 else None), ThreadPoolExecutor(workers) as pool:
        counts = glcm_counts(images, levels, distances, angles, workers=workers)  # (B, D, A, L, L)
        B, D, A = counts.shape[:3]
        # the statistics of disjoint groups of matrices in parallel too (elementwise log is their main cost)
        groups = counts.flatten(0, 2).tensor_split(min(workers, B * D * A))  # (m, L, L) each
        parts = list(pool.map(glcm_stats, groups) if len(groups) > 1 else map(glcm_stats, groups))
    return {name: torch.cat([part[name] for part in parts]).view(B, D, A).mean((1, 2)) for name in GLCM_STATS}


def _jpeg_bytes(image: np.ndarray, quality: int) -> int:
    """Size in bytes of one (H, W) or (H, W, 3) uint8 array encoded as JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING)
    return buffer.tell()


def compression_ratio(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """Compressed bytes / raw bytes with JPEG at a fixed quality (4:4:4); more detail -> higher ratio.

    Args:
        images: (B, 3, H, W) uint8 RGB or (B, H, W) uint8 grey, on any device.
        quality: JPEG quality 1..95 (default: 90).
    Returns:
        (B,) float64 on the images' device.
    """
    if images.dtype != torch.uint8 or images.dim() not in (3, 4):
        raise ValueError(f"images: expected (B, H, W) or (B, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
    arrays = images.permute(0, 2, 3, 1) if images.dim() == 4 else images  # (B, H, W[, 3])
    arrays = list(arrays.cpu().contiguous().numpy())
    if images.shape[-2] * images.shape[-1] >= PARALLEL_MIN_PIXELS:
        # libjpeg releases the GIL while it encodes, so threads use every core
        with ThreadPoolExecutor(max(1, min(len(arrays), torch.get_num_threads()))) as pool:
            sizes = list(pool.map(lambda a: _jpeg_bytes(a, quality), arrays))
    else:
        sizes = [_jpeg_bytes(a, quality) for a in arrays]
    raw = arrays[0].size if arrays else 1
    return torch.tensor(sizes, dtype=torch.float64, device=images.device) / raw


# ---------------------------------------------------------------- density: instances per image

def connected_components(label: torch.Tensor, connectivity: int = 4, ignore_index: int = 255) -> torch.Tensor:
    """Connected regions of equal label value (one region = one component of one class), batched.

    Union-find on the pixel graph with tensor ops (hook every root to the smallest neighbouring root,
    then compress paths), so it runs on the GPU next to the teacher; a handful of rounds for real
    layouts. Pixels equal to ignore_index belong to no region.

    Args:
        label: (B, H, W) integer class map.
        connectivity: 4 (edges) or 8 (edges and corners), as scipy.ndimage.label's default and full structures.
        ignore_index: value that is no class.
    Returns:
        (B, H, W) int64: for each pixel, the flat index into the batch (b*H*W + r*W + c) of its component's
        smallest pixel; -1 on ignored pixels.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity: expected 4 or 8, got {connectivity}")
    B, H, W = label.shape
    pixel = torch.arange(B * H * W, device=label.device).view(B, H, W)  # (B, H, W) flat ids
    valid = label != ignore_index
    steps = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])  # right, down, diagonals
    us, vs = [pixel.new_empty(0)], [pixel.new_empty(0)]  # (E,) pieces; a 1x1 image has no pairs
    for dr, dc in steps:
        pair = _pair_slices(H, W, dr, dc)
        if pair is None:
            continue
        (rows_a, cols_a), (rows_b, cols_b) = pair
        same = (label[:, rows_a, cols_a] == label[:, rows_b, cols_b]) & valid[:, rows_a, cols_a]  # then both valid
        us.append(pixel[:, rows_a, cols_a][same])
        vs.append(pixel[:, rows_b, cols_b][same])
    u, v = torch.cat(us), torch.cat(vs)  # (E,) each
    parent = pixel.flatten().clone()  # (N,) every pixel its own root; parents only ever decrease
    while u.numel():
        root_u, root_v = parent[u], parent[v]
        apart = root_u != root_v
        u, v, root_u, root_v = u[apart], v[apart], root_u[apart], root_v[apart]  # joined pairs stay joined
        if not u.numel():
            break
        # hook: each root points at the smallest root it touches (always smaller, so no cycles)
        parent.scatter_reduce_(0, torch.maximum(root_u, root_v), torch.minimum(root_u, root_v), reduce="amin")
        while True:  # compress: every pixel points straight at its root
            grand = parent[parent]
            if torch.equal(grand, parent):
                break
            parent = grand
    return torch.where(valid.flatten(), parent, -1).view(B, H, W)


def count_instances(label: torch.Tensor, min_area: int = 1, connectivity: int = 4,
                    ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """Instances per image: connected components per class of at least min_area pixels, and the number of
    distinct classes among those components.

    Args:
        label: (B, H, W) integer class map (a teacher's argmax, or a true layout).
        min_area: smallest component counted, in pixels.
        connectivity: 4 or 8.
        ignore_index: value that is no class.
    Returns:
        dict instances -> (B,) int64, classes -> (B,) int64.
    """
    B, H, W = label.shape
    component = connected_components(label, connectivity, ignore_index).flatten()  # (N,) root ids, -1 ignored
    counted = component >= 0
    area = torch.bincount(component[counted], minlength=B * H * W)  # (N,) pixels per root
    pixel = torch.arange(B * H * W, device=label.device)
    keep = (component == pixel) & (area >= min_area)  # (N,) one True per kept component, at its root
    image = pixel[keep] // (H * W)  # (instances,) image of each kept component
    instances = torch.bincount(image, minlength=B)
    cls = label.flatten()[keep].long()  # (instances,) class of each kept component
    stride = int(cls.max()) + 1 if cls.numel() else 1
    image_class = torch.unique(image * stride + cls)  # distinct (image, class) pairs
    classes = torch.bincount(image_class // stride, minlength=B)
    return {"instances": instances, "classes": classes}


# ---------------------------------------------------------------- teacher

def load_teacher(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The EMA teacher of a train.py checkpoint, in eval mode on device, and the run's arguments (its dataset, its
    teacher's TTA)."""
    try:
        teacher, args = model.load_checkpoint_model(path, weights="ema")
    except ValueError as error:
        raise ValueError(str(error).replace("--checkpoint", "--teacher", 1)) from None
    return teacher.to(device), args


def teacher_input(teacher: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the teacher sees of whole images: normalised as in training, resized to the nearest patch multiple.

    Args:
        teacher: a model from model.build_model.
        images: (B, 3, H, W) uint8 RGB on the teacher's device.
    Returns:
        (B, 3, h, w) float32, h and w the nearest multiples of the teacher's patch size.
    """
    patch = teacher.patch_size
    H, W = images.shape[-2:]
    size = (max(patch, round(H / patch) * patch), max(patch, round(W / patch) * patch))
    mean = torch.tensor(data.IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std  # (B, 3, H, W) normalised as in training
    return x if (H, W) == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()  # scoring only: no graph
def teacher_labels(teacher: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Argmax class map of the teacher, at the image size rounded to the nearest patch multiple.

    Args:
        teacher: a model from model.build_model.
        images: (B, 3, H, W) uint8 RGB on the teacher's device.
    Returns:
        (B, h, w) int64 class map, h and w the nearest multiples of the teacher's patch size.
    """
    return model.class_scores(teacher, teacher_input(teacher, images)).argmax(1)  # (B, h, w)


@torch.no_grad()
def gate_report(teacher: torch.nn.Module, samples: list[tuple[Path, Path]], dataset: str,
                conf_thresh: float = 0.95) -> dict[str, np.ndarray]:
    """Per class, what SENSE's γ gate lets through on images whose true layout is known.

    The teacher sees each whole image (patch-multiple size, as teacher_labels); a pixel passes when its largest
    class probability (DPT: softmax of the logits; Mask2Former: its scores) is >= conf_thresh. A Mask2Former
    teacher's image gate applies too, as in training: an image whose mean query confidence is < conf_thresh passes
    no pixel ("images", "kept").

    Args:
        teacher: a model from model.build_model, in eval mode.
        samples: (image, true layout) pairs.
        dataset: registry name of the layouts' classes.
        conf_thresh: γ.
    Returns:
        "pixels" (K,) true pixels per class, "gated" (K,) of them passing the gate, "correct" (K,) of those with
        the right label, "gated_as" (K,) gated pixels labelled as the class (right or wrong); for Mask2Former also
        "images" and "kept" (1,): the images seen and those its image gate keeps.
    """
    K = data.get_spec(dataset).num_classes
    device = next(teacher.parameters()).device
    counts = {name: np.zeros(K, np.int64) for name in ("pixels", "gated", "correct", "gated_as")}
    if teacher.arch == "mask2former":
        counts.update(images=np.zeros(1, np.int64), kept=np.zeros(1, np.int64))
    for image_path, label_path in samples:
        image = torch.from_numpy(data.load_image(image_path)).permute(2, 0, 1)[None].to(device)  # (1, 3, H, W)
        truth = torch.from_numpy(data.load_label(dataset, label_path).astype(np.int64))[None, None].float()
        x = teacher_input(teacher, image)  # (1, 3, h, w)
        size = tuple(x.shape[-2:])
        scores, query_conf = train.teacher_predict(teacher, x, "none")  # (1, K, h, w), Mask2Former (1,) or None
        probabilities = train.teacher_probabilities(scores, teacher.arch)  # (1, K, h, w)
        confidence, label = probabilities.max(1)  # (1, h, w)
        truth = F.interpolate(truth, size=size, mode="nearest")[:, 0].long().to(device)  # (1, h, w)
        known = truth != data.IGNORE_INDEX
        gated = known & (confidence >= conf_thresh)
        if query_conf is not None:
            kept = bool(query_conf[0] >= conf_thresh)
            counts["images"] += 1
            counts["kept"] += kept
            gated &= kept
        counts["pixels"] += torch.bincount(truth[known], minlength=K)[:K].cpu().numpy()
        counts["gated"] += torch.bincount(truth[gated], minlength=K)[:K].cpu().numpy()
        counts["correct"] += torch.bincount(truth[gated & (label == truth)], minlength=K)[:K].cpu().numpy()
        counts["gated_as"] += torch.bincount(label[gated], minlength=K)[:K].cpu().numpy()
    return counts


def format_gate_report(counts: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
                       class_names: tuple[str, ...]) -> str:
    """The gate report as a markdown table: per class, % of its pixels gated, % of those labelled right, and the
    gated pixels labelled as the class. Given the counts of several teachers (e.g. the seeds of one run), each cell
    is the mean ± sample std (ddof=1) of the teachers' percentages (pixel counts: their mean)."""
    runs = [counts] if isinstance(counts, dict) else list(counts)
    seeds = f" ({len(runs)} teachers)" if len(runs) > 1 else ""
    lines = [f"| class | pixels | gated (% of the class){seeds} | right (% of the gated) | gated pixels labelled as it |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for k, name in enumerate(class_names):
        pixels = [int(run["pixels"][k]) for run in runs]
        share = [100 * run["gated"][k] / run["pixels"][k] for run in runs if run["pixels"][k]]
        right = [100 * run["correct"][k] / run["gated"][k] for run in runs if run["gated"][k]]
        gated_as = round(float(np.mean([run["gated_as"][k] for run in runs])))
        lines.append(f"| {name} | {round(float(np.mean(pixels)))} | {mean_std(share, decimals=1)} | "
                     f"{mean_std(right, decimals=1)} | {gated_as} |")
    if all("kept" in run for run in runs):  # Mask2Former: its image gate, before any pixel
        kept = [100 * run["kept"][0] / max(run["images"][0], 1) for run in runs]
        lines.append(f"\nMask2Former image gate: {mean_std(kept, decimals=1)} % of the {int(runs[0]['images'][0])} "
                     f"images kept.")
    return "\n".join(lines)


# ---------------------------------------------------------------- label: the paper's Section 3 protocol

LABEL_SPLIT = "labels.txt"  # the split file `quality.py label` writes in its --out folder
LABEL_RECORD = "label.json"  # what made the labels there: a rerun with other settings must not mix with them


def label_name(image: Path, base: Path) -> Path:
    """Where an image's label goes below the --out folder: the image's path below `base` (the source folder, or the
    split file's folder) with a .png suffix; its last folder and name when it lies elsewhere."""
    image, base = image.resolve(), base.resolve()
    relative = image.relative_to(base) if image.is_relative_to(base) else Path(*image.parts[-2:])
    return relative.with_suffix(".png")


@torch.no_grad()  # labelling only: no graph
def teacher_label(teacher: torch.nn.Module, image: np.ndarray, tta: str, conf_thresh: float = 0.0) -> np.ndarray:
    """The fixed teacher's label map of one whole image (the paper's Section 3: a teacher trained on real images
    labels every synthetic image once).

    The image is seen as teacher_input makes it, with the training teacher's TTA views (train.teacher_predict on
    every image), the scores resized back to the image size; the label is their argmax.

    Args:
        teacher: a model from model.build_model, in eval mode.
        image: (H, W, 3) uint8 RGB.
        tta: "none", "flip" or "scales".
        conf_thresh: pixels whose largest class probability (DPT: softmax; Mask2Former: its scores) is below it
            get 255 (ignore); 0 labels every pixel, as the paper's protocol.
    Returns:
        (H, W) uint8 train ids, 255 = below conf_thresh.
    """
    device = next(teacher.parameters()).device
    H, W = image.shape[:2]
    x = teacher_input(teacher, torch.from_numpy(image).permute(2, 0, 1)[None].to(device))  # (1, 3, h, w)
    scores, _ = train.teacher_predict(teacher, x, tta, tta_images=1)  # (1, K, h, w)
    if tuple(scores.shape[-2:]) != (H, W):
        scores = model.resize(scores, (H, W), teacher.arch)  # (1, K, H, W)
    confidence, label = train.teacher_probabilities(scores, teacher.arch).max(1)  # (1, H, W) each
    label[confidence < conf_thresh] = data.IGNORE_INDEX
    return label[0].to(torch.uint8).cpu().numpy()


def label_images(teacher: torch.nn.Module, images: list[Path], out: Path, base: Path, *, tta: str,
                 conf_thresh: float = 0.0, progress: bool = True) -> list[tuple[Path, Path]]:
    """Label every image with the teacher, one PNG each below `out` (atomic writes; a label already there is kept,
    so a cut run resumes where it stopped).

    Args:
        teacher: a model in eval mode.
        images: image paths.
        out: label folder.
        base: the folder image paths are taken relative to (label_name).
        tta, conf_thresh: as teacher_label.
    Returns:
        [(image, label file)] in the order of `images`.
    """
    samples = []
    for image in tqdm(images, desc=f"labelling -> {out}", disable=None if progress else True, leave=False):
        target = out / label_name(image, base)
        if not target.is_file():
            data.save_png(teacher_label(teacher, data.load_image(image), tta, conf_thresh), target)
        samples.append((image, target))
    return samples


def label_confusion(samples: list[tuple[Path, Path]], dataset: str) -> tuple[torch.Tensor, int, int] | None:
    """How right a labelled split's labels are, against the stored true layouts (the toy world's synthetic images).

    Args:
        samples: (image, label) pairs; an image's true layout is at data.truth_path(image).
        dataset: registry name.
    Returns:
        ((K, K) confusion over the labelled pixels, rows = truth; labelled pixels; pixels with a true class), or
        None when an image has no stored true layout.
    """
    K = data.get_spec(dataset).num_classes
    confusion, labelled, pixels = torch.zeros(K, K, dtype=torch.int64), 0, 0
    for image, label_path in samples:
        truth_file = data.truth_path(image)
        if truth_file is None or not truth_file.is_file():
            return None
        truth = torch.from_numpy(data.load_label(dataset, truth_file).astype(np.int64))  # (H, W)
        label = torch.from_numpy(data.load_label(dataset, label_path).astype(np.int64))  # (H, W)
        if label.shape != truth.shape:
            raise ValueError(f"{label_path}: label is {tuple(label.shape)} but its true layout {truth_file} is "
                             f"{tuple(truth.shape)}")
        known = truth != data.IGNORE_INDEX
        kept = known & (label != data.IGNORE_INDEX)
        confusion += confusion_matrix(label[kept], truth[kept], K)
        labelled, pixels = labelled + int(kept.sum()), pixels + int(known.sum())
    return confusion, labelled, pixels


def format_label_report(groups: dict[str, list[tuple[torch.Tensor, int, int]]], class_names: tuple[str, ...]) -> str:
    """Per class, the IoU of the labels against the true layouts, then the mIoU and the share of pixels labelled, as
    a markdown table with one column per group of labelled splits (e.g. one split per teacher seed): the mean ±
    sample std (ddof=1) over the group's splits, the value alone for one split."""
    def cell(values: list[float]) -> str:  # a class absent from a split's truth and labels has IoU NaN: left out
        return mean_std([value for value in values if not math.isnan(value)], decimals=1)

    scores = {name: [miou_from_confusion(confusion) for confusion, _, _ in reports] for name, reports in groups.items()}
    shares = {name: [100 * labelled / max(pixels, 1) for _, labelled, pixels in reports]
              for name, reports in groups.items()}
    lines = ["| IoU of the labels vs the true layouts | " + " | ".join(
                 f"{name} ({len(reports)})" if len(reports) > 1 else name for name, reports in groups.items()) + " |",
             "| --- |" + " ---: |" * len(groups)]
    rows = [(name, [cell([score["iou"][k] for score in group]) for group in scores.values()])
            for k, name in enumerate(class_names)]
    rows.append(("mIoU", [cell([score["miou"] for score in group]) for group in scores.values()]))
    rows.append(("pixels labelled (%)", [cell(share) for share in shares.values()]))
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join(lines)


def label_split(args: argparse.Namespace) -> Path:
    """`quality.py label`: the labelled split (a folder of PNGs and the split file train.py --train-split reads)."""
    source, out = Path(args.images), Path(args.out)
    if source.is_dir() and out.resolve().is_relative_to(source.resolve()):
        raise ValueError(f"--out {out}: lies inside --images {source}, whose images it would hold (choose a folder "
                         f"outside it)")
    images = [image for image, _ in list_images(source)]
    base = source if source.is_dir() else source.parent
    if args.truth:
        teacher, dataset, tta = None, "toy", None
    else:
        device = model.pick_device(args.device)
        teacher, teacher_args = load_teacher(args.teacher, device)
        dataset = teacher_args.get("dataset") or "toy"
        tta = args.tta or teacher_args.get("tta") or "none"  # as the run's own teacher saw its synthetic images
    record = {"teacher": "truth" if args.truth else str(Path(args.teacher).resolve()),
              "images": str(source.resolve()), "tta": tta, "conf_thresh": args.conf_thresh}
    if (out / LABEL_RECORD).is_file():  # a rerun resumes only what the same settings started
        before = json.loads((out / LABEL_RECORD).read_text())
        changed = [key for key in record if before.get(key) != record[key]]
        if changed:
            raise ValueError(f"--out {out}: holds labels made with another {', '.join(changed)} "
                             f"({out / LABEL_RECORD}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    data._atomic_write(out / LABEL_RECORD, lambda temporary: temporary.write_text(json.dumps(record) + "\n"))
    if args.truth:  # the control: the stored true layouts themselves, an upper bound for any teacher
        samples = []
        for image in images:
            truth_file = data.truth_path(image)
            if truth_file is None or not truth_file.is_file():
                raise ValueError(f"--truth: {image} has no stored true layout (only the toy world's synthetic "
                                 f"images have one)")
            samples.append((image, truth_file))
    else:
        what = "every pixel" if args.conf_thresh <= 0 else f"255 below confidence {args.conf_thresh}"
        print(f"labelling {len(images)} images of {source} with {args.teacher} (TTA {tta}, {what})")
        samples = label_images(teacher.eval(), images, out, base, tta=tta, conf_thresh=args.conf_thresh)
        report = label_confusion(samples, dataset)
        if report is not None:
            print(format_label_report({out.name: [report]}, data.get_spec(dataset).classes))
    data.write_split(out / LABEL_SPLIT, samples)
    print(f"wrote {len(samples)} labelled images to {out / LABEL_SPLIT} "
          f"(train on them: python train.py --method supervised --train-split {out / LABEL_SPLIT})")
    return out / LABEL_SPLIT


# ---------------------------------------------------------------- density: open-vocabulary detector (the paper's)

def load_detector(path: str | Path, device: torch.device) -> tuple:
    """A GroundingDINO processor and model (transformers format: a save_pretrained folder), in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"--detector: {path} is not a transformers model folder (no config.json); "
                         "download e.g. IDEA-Research/grounding-dino-base and pass its folder")
    try:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
    except ImportError:
        raise ValueError("--detector needs transformers: pip install transformers") from None
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        detector = AutoModelForZeroShotObjectDetection.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"--detector: cannot load {path} ({type(error).__name__}: {str(error)[:200]})") from None
    return processor, detector.eval().to(device)


def detector_prompts(class_names: tuple[str, ...], tokenizer, max_tokens: int) -> list[str]:
    """The class names as GroundingDINO text prompts "a . b . c ." (lower case, "background" left out), split
    into as few prompts as fit the text encoder's max_tokens (256: ADE20K's 150 names need several)."""
    names = [name.lower() for name in class_names if name.lower() != "background"]
    prompts, current = [], []
    for name in names:
        text = " . ".join(current + [name]) + " ."
        if current and len(tokenizer(text)["input_ids"]) > max_tokens:
            prompts.append(" . ".join(current) + " .")
            current = [name]
        else:
            current.append(name)
    if len(tokenizer(" . ".join(current) + " .")["input_ids"]) > max_tokens:
        raise ValueError(f"--detector: the class name {current[-1]!r} alone exceeds {max_tokens} text tokens")
    return prompts + [" . ".join(current) + " ."]


@torch.no_grad()  # scoring only: no graph
def count_boxes(processor, detector, image: np.ndarray, prompts: list[str], threshold: float) -> int:
    """Objects in one image: the detector's boxes with score >= threshold over all prompts, overlapping boxes
    (IoU > DETECTOR_NMS_IOU, e.g. one car found as "car" and as "truck") counted once.

    Args:
        processor, detector: from `load_detector`.
        image: (H, W, 3) uint8 RGB.
        prompts: from `detector_prompts`.
        threshold: box score threshold (GroundingDINO's box_threshold).
    Returns:
        Number of boxes.
    """
    device = next(detector.parameters()).device
    # The image is resized and normalised once; only the text changes from prompt to prompt.
    pixels = processor.image_processor(images=Image.fromarray(image), return_tensors="pt").to(device)
    boxes, scores = [], []
    for text in prompts:
        inputs = {**pixels, **processor.tokenizer(text, return_tensors="pt").to(device)}
        found = processor.post_process_grounded_object_detection(
            detector(**inputs), inputs["input_ids"], threshold=threshold, text_threshold=threshold,
            target_sizes=[image.shape[:2]])[0]
        boxes.append(found["boxes"].float())  # (n, 4) x0, y0, x1, y1 in pixels
        scores.append(found["scores"].float())  # (n,)
    return len(nms(torch.cat(boxes), torch.cat(scores), DETECTOR_NMS_IOU))


# ---------------------------------------------------------------- score, select, ladder, sheet

def list_images(source: str | Path) -> list[tuple[Path, Path | None]]:
    """(image, label or None) of a folder (recursive) or a split file, in a fixed order."""
    source = Path(source)
    if source.is_dir():
        images = sorted(p for p in source.rglob("*") if p.suffix.lower() in data.IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"--images: no {'/'.join(data.IMAGE_SUFFIXES)} files under {source}")
        return [(p, None) for p in images]
    if source.suffix == ".txt" and source.is_file():
        return data.read_split(source)
    raise ValueError(f"--images: {source} is neither a folder of images nor a split file (.txt)")


def score_images(samples: list[tuple[Path, Path | None]], *, teacher: torch.nn.Module | None = None,
                 detector: tuple | None = None, min_area: float = 5e-4, connectivity: int = 4, levels: int = 256,
                 distances=(1,),
                 angles=(0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4), device: torch.device | None = None,
                 progress: bool = True) -> list[dict]:
    """Density and fidelity of each image (one at a time, so sizes may differ).

    Args:
        samples: (image path, label path or None) pairs.
        teacher: model for density, or None (instances and classes are then NaN).
        detector: (processor, model, prompts, box threshold) for the detector's box count, or None (boxes NaN).
        min_area: smallest instance as a fraction of the predicted map's pixels.
        connectivity, levels, distances, angles: as in `count_instances` and `glcm_features`.
        device: where the metrics run (default: cpu).
        progress: show a tqdm bar.
    Returns:
        One dict per image with the CSV_FIELDS keys.
    """
    device = device or torch.device("cpu")
    rows = []
    for image_path, label_path in tqdm(samples, desc="score", unit="img", disable=None if progress else True):
        image = torch.from_numpy(data.load_image(image_path)).permute(2, 0, 1)[None].to(device)  # (1, 3, H, W)
        # absolute paths, so select/ladder can run from any folder
        row = {"image": str(Path(image_path).resolve()),
               "label": "" if label_path is None else str(Path(label_path).resolve()),
               "instances": math.nan, "classes": math.nan, "boxes": math.nan}
        if teacher is not None:
            label = teacher_labels(teacher, image)  # (1, h, w)
            area = max(1, math.ceil(min_area * label.shape[-2] * label.shape[-1]))
            row.update({k: int(v) for k, v in count_instances(label, area, connectivity).items()})
        if detector is not None:
            processor, net, prompts, threshold = detector
            row["boxes"] = count_boxes(processor, net, image[0].permute(1, 2, 0).cpu().numpy(), prompts, threshold)
        row.update({k: float(v) for k, v in glcm_features(image, levels, distances, angles).items()})
        row["compression"] = float(compression_ratio(image)[0])
        rows.append(row)
    return rows


def write_scores(rows: list[dict], path: str | Path) -> None:
    """Scores CSV (CSV_FIELDS columns; instances/classes empty without a teacher, boxes without a detector)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})


def read_scores(path: str | Path) -> list[dict]:
    """Rows of a scores CSV, numbers as float (NaN where empty)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as error:
        raise ValueError(f"--scores: cannot read {path} ({error.strerror})")
    if not rows or set(CSV_FIELDS) - set(rows[0]):
        raise ValueError(f"--scores: {path} is not a non-empty CSV with columns {', '.join(CSV_FIELDS)}")
    numeric = CSV_FIELDS[2:]
    return [{k: (float(v) if v else math.nan) if k in numeric else v for k, v in row.items()} for row in rows]


def _percentile(values: np.ndarray) -> np.ndarray:
    """Rank of each value scaled to [0, 1] (ties share their mean rank)."""
    return (rankdata(values) - 1) / max(1, len(values) - 1)


def rank_scores(rows: list[dict], by: str, fidelity_stat: str = "contrast", density: str = "instances",
                seed: int = 0) -> np.ndarray:
    """One score per row in [0, 1], higher = denser / finer (by="random": uniform draws seeded by `seed`).

    density = percentile of the density column; fidelity = mean percentile of the GLCM statistic (signed so
    that more detail ranks higher) and the compression ratio; both = mean of the two.

    Args:
        rows: scores as from `read_scores`.
        by: "density", "fidelity" or "both".
        fidelity_stat: GLCM statistic used in fidelity.
        density: "instances" (teacher components) or "boxes" (detector boxes).
    Returns:
        (len(rows),) float64.
    """
    if by == "random":
        return np.random.default_rng(seed).random(len(rows))
    column = lambda name: np.array([row[name] for row in rows], dtype=np.float64)  # noqa: E731
    if by in ("density", "both") and np.isnan(column(density)).any():
        flag = "--teacher CKPT" if density == "instances" else "--detector DIR"
        other = DENSITY_COLUMNS[1 - DENSITY_COLUMNS.index(density)]
        hint = "" if np.isnan(column(other)).any() else f", or rank by --density {other}"
        raise ValueError(f"--scores: no {density} counts in this file; score it with {flag} to rank by density{hint}")
    dense = _percentile(column(density))
    fine = (_percentile(FIDELITY_SIGN[fidelity_stat] * column(fidelity_stat)) + _percentile(column("compression"))) / 2
    return {"density": dense, "fidelity": fine, "both": (dense + fine) / 2}[by]


def write_split(rows: list[dict], path: str | Path) -> None:
    """Split file of the rows' images (and labels), written by data.write_split (atomic, paths relative to the split
    file's folder where they lie below it)."""
    data.write_split(path, [(Path(row["image"]), Path(row["label"]) if row["label"] else None) for row in rows])


def select(rows: list[dict], score: np.ndarray, fraction: float, top: bool) -> list[dict]:
    """The highest (top=True) or lowest round(fraction * n) rows by score, best first when top."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--{'top' if top else 'bottom'}: expected a fraction in (0, 1], got {fraction}")
    order = np.argsort(-score if top else score, kind="stable")
    return [rows[i] for i in order[:max(1, round(fraction * len(rows)))]]


def ladder(rows: list[dict], fidelity_stat: str = "contrast", density: str = "instances") -> dict[str, list[dict]]:
    """The paper's 2x2 quality ladder at matched sizes: split by density at the median into sparse and
    dense halves, then each half by fidelity into its coarse and fine quarters (n // 4 images each, so
    coarse and fine have similar density).

    Args:
        rows: scores with counts in the density column.
        fidelity_stat: GLCM statistic used in fidelity.
        density: "instances" or "boxes".
    Returns:
        dict sparse_coarse, sparse_fine, dense_coarse, dense_fine -> rows.
    """
    quarter = len(rows) // 4
    if quarter == 0:
        raise ValueError(f"--scores: the ladder needs at least 4 images, got {len(rows)}")
    dense = rank_scores(rows, "density", density=density)
    fidelity = rank_scores(rows, "fidelity", fidelity_stat)
    by_density = np.argsort(dense, kind="stable")
    halves = {"sparse": by_density[:2 * quarter], "dense": by_density[-2 * quarter:]}
    splits = {}
    for name, half in halves.items():
        by_fidelity = half[np.argsort(fidelity[half], kind="stable")]
        splits[f"{name}_coarse"] = [rows[i] for i in by_fidelity[:quarter]]
        splits[f"{name}_fine"] = [rows[i] for i in by_fidelity[-quarter:]]
    return splits


def contact_sheet(rows: list[dict], score: np.ndarray, path: str | Path, n: int = 8, height: int = 128,
                  density: str = "instances") -> None:
    """PNG with the n highest-scoring images on the top row and the n lowest below, each captioned with
    its score, density count (instances or boxes), GLCM contrast and compression ratio."""
    order = np.argsort(-score, kind="stable")
    n = min(n, len(rows))
    lines = [("highest", order[:n]), ("lowest", order[::-1][:n])]
    caption = 28  # pixels of text under each tile
    tiles = []
    for _, indices in lines:
        row_tiles = []
        for i in indices:
            image = Image.fromarray(data.load_image(rows[i]["image"]))
            width = max(1, round(image.width * height / image.height))
            tile = Image.new("RGB", (width, height + caption), "white")
            tile.paste(image.resize((width, height), Image.BILINEAR), (0, 0))
            draw = ImageDraw.Draw(tile)
            count = "-" if math.isnan(rows[i][density]) else f"{rows[i][density]:.0f}"
            draw.text((2, height + 1), f"score {score[i]:.2f}  {density[:4]} {count}", fill="black")
            draw.text((2, height + 14), f"con {rows[i]['contrast']:.0f}  cr {rows[i]['compression']:.3f}", fill="black")
            row_tiles.append(tile)
        tiles.append(row_tiles)
    width = max(sum(t.width for t in row_tiles) for row_tiles in tiles)
    sheet = Image.new("RGB", (width, len(tiles) * (height + caption)), "white")
    for r, row_tiles in enumerate(tiles):
        x = 0
        for tile in row_tiles:
            sheet.paste(tile, (x, r * (height + caption)))
            x += tile.width
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _summary(splits: dict[str, list[dict]], fidelity_stat: str) -> str:
    """Table of each split's size and mean instances, boxes, GLCM statistic and compression ratio."""
    lines = [f"{'split':<16}{'images':>8}{'instances':>11}{'boxes':>8}{fidelity_stat:>13}{'compression':>13}"]
    for name, rows in splits.items():
        mean = lambda key: float(np.mean([row[key] for row in rows])) if rows else math.nan  # noqa: E731
        lines.append(f"{name:<16}{len(rows):>8}{mean('instances'):>11.2f}{mean('boxes'):>8.2f}"
                     f"{mean(fidelity_stat):>13.4g}{mean('compression'):>13.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.command == "score":
            device = model.pick_device(args.device)
            samples = list_images(args.images)
            teacher, teacher_args = load_teacher(args.teacher, device) if args.teacher else (None, {})
            teacher_dataset = teacher_args.get("dataset")
            detector = None
            if args.detector is not None:
                dataset = args.dataset or teacher_dataset or "toy"
                processor, net = load_detector(args.detector, device)
                prompts = detector_prompts(data.get_spec(dataset).classes, processor.tokenizer, net.config.max_text_len)
                print(f"detector {args.detector}: {len(prompts)} prompt(s) of {dataset} class names")
                detector = (processor, net, prompts, args.box_threshold)
            rows = score_images(samples, teacher=teacher, detector=detector, min_area=args.min_area,
                                connectivity=args.connectivity,
                                levels=args.levels, distances=tuple(args.distances),
                                angles=tuple(math.radians(a) for a in args.angles), device=device)
            write_scores(rows, args.out)
            print(_summary({"all": rows}, "contrast"))
            print(f"wrote {len(rows)} rows to {args.out}")
            return
        if args.command == "gate":
            device = model.pick_device(args.device)
            samples = []
            for image, label in list_images(args.images)[:args.max_images]:
                label = label or data.truth_path(image)
                if label is None or not Path(label).is_file():
                    raise ValueError(f"--images: {image} has no label and no stored true layout")
                samples.append((image, label))
            counts = []
            for path in args.teacher:
                teacher, teacher_args = load_teacher(path, device)
                dataset = teacher_args.get("dataset")
                counts.append(gate_report(teacher.eval(), samples, dataset or "toy", args.conf_thresh))
            print(f"γ = {args.conf_thresh} gate of {' '.join(args.teacher)} on {len(samples)} images of {args.images}:")
            print(format_gate_report(counts, data.get_spec(dataset or "toy").classes))
            return
        if args.command == "label":
            label_split(args)
            return
        if args.command == "truth":
            groups = {}  # the folder of each split file, its seed suffix dropped (dense_fine_s1 -> dense_fine)
            for path in args.labels:
                report = label_confusion(data.read_split(path), args.dataset)
                if report is None:
                    raise ValueError(f"--labels {path}: an image has no stored true layout (synthetic_truth/)")
                groups.setdefault(SEED_SUFFIX.sub("", Path(path).resolve().parent.name), []).append(report)
            print(f"labels of {len(args.labels)} split(s) against the true layouts:")
            print(format_label_report(groups, data.get_spec(args.dataset).classes))
            return
        rows = read_scores(args.scores)
        if args.command == "select":
            score = rank_scores(rows, args.by, args.fidelity_stat, args.density, args.seed)
            top = args.top is not None
            chosen = select(rows, score, args.top if top else args.bottom, top)
            write_split(chosen, args.out)
            print(_summary({"all": rows, "selected": chosen}, args.fidelity_stat))
            print(f"wrote {len(chosen)} of {len(rows)} images to {args.out}")
        else:
            splits = ladder(rows, args.fidelity_stat, args.density)
            for name, split_rows in splits.items():
                write_split(split_rows, Path(args.out_dir) / f"{name}.txt")
            print(_summary(splits, args.fidelity_stat))
            print(f"wrote {', '.join(LADDER_SPLITS)} ({len(splits['dense_fine'])} images each) to {args.out_dir}")
            score = rank_scores(rows, "both", args.fidelity_stat, args.density)
        if args.sheet:
            contact_sheet(rows, score, args.sheet, args.sheet_n, density=args.density)
            print(f"wrote contact sheet {args.sheet}")
    except (ValueError, data.DataError) as error:
        raise SystemExit(str(error))


if __name__ == "__main__":
    main()
