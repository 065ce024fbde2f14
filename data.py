"""Datasets, split files, the toy world and the weak/strong augmentation of SENSE.

Paper: the method (real labelled images + unlabelled synthetic images trained together; weak view for the EMA
teacher, strong view + CutMix for the student) and the dual-factor analysis (sparse/dense scenes, coarse/fine fidelity). Recipe and data
conventions: docs/data.md.

    python data.py toy --root data/toy --preview toy.png      # CPU, a few seconds: the toy world and a picture
    python data.py check --dataset cityscapes --root data/cityscapes --split val
    python data.py prepare-coco --root data/coco               # masks/<id>.png from the instance annotations

Datasets on disk (split files `<root>/<split>.txt`, one `image [label]` per line, relative to the root; made from
the standard layout when absent):
    cityscapes  leftImg8bit/{train,val}/<city>/*_leftImg8bit.png, gtFine/.../*_gtFine_label{TrainIds,Ids}.png
    ade20k      ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.{jpg,png}
    coco        {train,val}2017/<id>.jpg, masks/<id>.png (python data.py prepare-coco)
    toy         images/, labels/, synthetic/<split>/, synthetic_truth/<split>/ (python data.py toy)

Shapes: H×W image, c×c crop (c = --crop-size, a multiple of the patch size). Arrays read from disk are uint8:
images (H, W, 3) RGB, labels (H, W) train ids. Dataset items are torch tensors: images (3, c, c) float32
ImageNet-normalised, labels (c, c) int64. Label value 255 = ignore everywhere, padding included.
"""
import argparse
import contextlib
import functools
import io
import json
import math
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError
from tqdm import tqdm

IGNORE_INDEX = 255  # label never trained on or scored: void classes, crowd regions, padding (all three datasets)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics the DINOv2/DINOv3 backbones were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)
# The weak view is rescale + crop + flip; the strong view shares that geometry and adds jitter, grayscale, blur
# and CutMix. The paper does not ablate these values, so they stay constants here rather than flags.
SCALE_RANGE = (0.5, 2.0)  # random rescale factor of the long side (SENSE / UniMatch reference code)
FLIP_P = 0.5  # horizontal flip probability (reference code)
JITTER = (0.5, 0.5, 0.5, 0.25)  # strong view: brightness, contrast, saturation, hue strengths (reference code)
JITTER_P = 0.8  # probability of applying the colour jitter (reference code)
GRAYSCALE_P = 0.2  # strong view grayscale probability (reference code)
BLUR_SIGMA = (0.1, 2.0)  # strong view Gaussian blur σ range in pixels (reference code)
BLUR_P = 0.5  # strong view blur probability (reference code)
CUTMIX_P = 0.5  # probability that a synthetic sample carries a CutMix box (reference code)
CUTMIX_AREA = (0.02, 0.4)  # box area as a fraction of the crop (reference code)
CUTMIX_ASPECT = (0.3, 1 / 0.3)  # box height / width (reference code)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, what PIL's convert("L") and torchvision's grayscale use
COLOUR_TABLE_SIZE = 17  # lattice points per axis of the 3-D table that applies jitter + grayscale in one pass
QUICK_SAMPLES = 8  # images fully decoded by check_dataset(quick=True); the others are only checked to exist
# decoded images and labels a training dataset keeps in memory (each loader worker its own copy): the toy world's
# (~4 MB) are decoded once instead of at every read; a large set keeps its first 64 MB and decodes the rest each time
DECODED_KEEP_BYTES = 64 * 2**20
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# ----------------------------------------------------------------------------------------------------------------
# Class names and palettes (the ecosystem's usual ones: mmsegmentation / detectron2 order)

# Cityscapes: the 19 evaluated classes in trainId order (0 road ... 18 bicycle); 11 person onwards are things.
CITYSCAPES_CLASSES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign', 'vegetation',
    'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle', 'bicycle',
)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# ADE20K (SceneParsing, ADEChallengeData2016): 150 classes; train id k is raw mask value k + 1 after the
# zero-label reduction, raw 0 ("other") being ignored.
ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher',
    'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)
# COCO-81: background (train id 0) plus the 80 thing classes of the instance annotations, in category-id order.
COCO_CLASSES = (
    'background', 'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse',
    'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie',
    'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove',
    'skateboard', 'surfboard', 'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl',
    'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair',
    'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard',
    'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush',
)
# The original category id of each COCO-81 class: ids run 1..90 with ten unused (12, 26, 29, 30, 45, 66, 68, 69,
# 71, 83), so a train id is the position in this tuple, never the category id itself.
COCO_CATEGORY_IDS = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60,
    61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)
# Official labelIds -> trainIds (cityscapesScripts helpers/labels.py); every id not listed is void -> ignore.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}
# The toy world's classes mirror a street scene's split into stuff (amorphous regions) and things (countable
# objects), so per-class results read like Cityscapes' stuff/thing rows.
TOY_CLASSES = ("sky", "grass", "road", "ball", "crate", "cone", "sign")  # 3 stuff classes, then 4 thing classes
TOY_PALETTE = ((70, 130, 180), (107, 142, 35), (128, 64, 128), (220, 20, 60), (160, 110, 50), (250, 170, 30),
               (0, 0, 142))
TOY_NUM_STUFF = 3
# The long-tailed toy world (`python data.py toy --long-tail`, --dataset toy_lt): 12 classes whose pixel shares fall
# off as Cityscapes' do (a few classes cover most pixels, the rarest things well under 1 %), for the OT ablation: OT
# owes every class the problem holds a share of the marginal, which matters only where classes are unequal.
TOY_LT_CLASSES = ("sky", "grass", "road", "sidewalk", "crate", "ball", "cone", "sign", "barrel", "pole", "tyre",
                  "lamp")  # 4 stuff classes, then 8 thing classes from the most to the least frequent
TOY_LT_PALETTE = ((70, 130, 180), (107, 142, 35), (128, 64, 128), (244, 35, 232), (160, 110, 50), (220, 20, 60),
                  (250, 170, 30), (0, 0, 142), (0, 80, 100), (153, 153, 153), (119, 11, 32), (220, 220, 0))
TOY_LT_NUM_STUFF = 4
# the chance that a drawn thing is of each thing class: crates ~11× as common as lamps (Cityscapes' car : motorcycle
# pixel ratio is ~70, its person : rider ~9)
TOY_LT_THING_P = (0.34, 0.2, 0.14, 0.1, 0.08, 0.06, 0.05, 0.03)
# 60 labelled images (~270 things, ~8 lamps): with the balanced world's 20, a supervised teacher saw one lamp image
# and never labelled a lamp right, where a Cityscapes teacher knows its rarest classes at moderate confidence
TOY_LT_LABELLED = 60


def _bit_palette(num_colours: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct colours from the bits of the class index spread over R, G, B (the PASCAL VOC colour map)."""
    colours = []
    for index in range(num_colours):
        red = green = blue = 0
        bits = index
        # bit 0 of the index goes to red's top bit, bit 1 to green's, bit 2 to blue's, then the next three bits
        # one place lower: nearby indices differ in the brightest bits, so their colours are far apart
        for shift in range(7, -1, -1):
            red |= (bits & 1) << shift
            green |= ((bits >> 1) & 1) << shift
            blue |= ((bits >> 2) & 1) << shift
            bits >>= 3
        colours.append((red, green, blue))
    return tuple(colours)


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: class names, their colours, and how raw label files become train ids.

    Attributes:
        name: registry key.
        classes: K class names in train-id order.
        palette: K RGB colours for pictures.
        num_classes: K.
        reduce_zero_label: raw 0 -> ignore, raw k -> k - 1 (ADE20K's "other" label).
        category_ids: original COCO category id of each class (COCO only; 0 = background).
    """
    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    num_classes: int
    reduce_zero_label: bool = False
    category_ids: tuple[int, ...] = ()


DATASETS = {
    "toy": DatasetSpec("toy", TOY_CLASSES, TOY_PALETTE, len(TOY_CLASSES)),
    "toy_lt": DatasetSpec("toy_lt", TOY_LT_CLASSES, TOY_LT_PALETTE, len(TOY_LT_CLASSES)),
    "cityscapes": DatasetSpec("cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, len(CITYSCAPES_CLASSES)),
    "ade20k": DatasetSpec("ade20k", ADE20K_CLASSES, ADE20K_PALETTE, len(ADE20K_CLASSES), reduce_zero_label=True),
    # classes.json carries no COCO palette: the VOC bit map gives distinct colours and black background.
    "coco": DatasetSpec("coco", COCO_CLASSES, _bit_palette(len(COCO_CLASSES)), len(COCO_CLASSES),
                        category_ids=COCO_CATEGORY_IDS),
}

LAYOUTS = {  # what a root must look like, for error messages
    "cityscapes": "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/{train,val}/<city>/*_gtFine_labelIds.png",
    "ade20k": "ADEChallengeData2016/images/{training,validation}/*.jpg and .../annotations/{training,validation}/*.png",
    "coco": "{train,val}2017/*.jpg and masks/<id>.png (python data.py prepare-coco --root ROOT)",
    "toy": "toy.json, images/, labels/ and split files (python data.py toy --root ROOT)",
    "toy_lt": "toy.json, images/, labels/ and split files (python data.py toy --long-tail --root ROOT)",
}
ADE20K_FOLDERS = {"train": "training", "val": "validation"}


class DataError(Exception):
    """A dataset problem in one line: the file (or flag) at fault and what was expected."""


def get_spec(dataset: str) -> DatasetSpec:
    """The registry entry of a dataset name (DataError naming --dataset when unknown)."""
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset!r}: unknown, expected one of {', '.join(sorted(DATASETS))}")
    return DATASETS[dataset]


def thing_classes(dataset: str) -> tuple[str, ...]:
    """The countable-object classes of a dataset (reported apart from stuff): toy ball ... sign, Cityscapes person
    ... bicycle, COCO's 80; ADE20K mixes both without an official split, so none."""
    classes = get_spec(dataset).classes
    return {"toy": classes[TOY_NUM_STUFF:], "toy_lt": classes[TOY_LT_NUM_STUFF:], "cityscapes": classes[11:],
            "coco": classes[1:]}.get(dataset, ())


# ----------------------------------------------------------------------------------------------------------------
# Reading images, labels and split files

def _lut(mapping: dict[int, int]) -> np.ndarray:
    """(256,) uint8 table: raw value -> train id, IGNORE_INDEX for values not in the mapping."""
    table = np.full(256, IGNORE_INDEX, np.uint8)
    for raw, train_id in mapping.items():
        table[raw] = train_id
    return table


CITYSCAPES_LUT = _lut(CITYSCAPES_ID_TO_TRAIN_ID)
CITYSCAPES_NUM_IDS = 34  # labelIds files hold ids 0..33 (cityscapesScripts; the license plate's -1 is never drawn)
REDUCE_ZERO_LUT = _lut({raw: raw - 1 for raw in range(1, IGNORE_INDEX)})  # 0 ("other") and 255 stay ignore


def _open_image(path: Path) -> Image.Image:
    """Decode an image file as RGB (DataError naming the file when missing or unreadable)."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: unreadable image ({error})") from None
    # convert() copies even when nothing changes: skip it for RGB files (most of them)
    return image if image.mode == "RGB" else image.convert("RGB")


class DecodedFiles:
    """Decoded files of one dataset, kept while their pixels fit in DECODED_KEEP_BYTES. The images handed out are
    shared: every use here makes a new image (resize, point, filter) and never changes one in place."""

    def __init__(self):
        self.kept, self.bytes = {}, 0

    def open(self, path: Path, opener) -> Image.Image:
        """opener(path) (_open_image or _open_label), decoded once while there is room."""
        image = self.kept.get(path)
        if image is None:
            image = opener(path)  # a DataError is raised each time, never kept
            size = image.width * image.height * len(image.getbands())
            if self.bytes + size <= DECODED_KEEP_BYTES:
                self.kept[path], self.bytes = image, self.bytes + size
        return image


def _open_label(path: Path) -> Image.Image:
    """Decode a label file as a one-band 8-bit ("L") image of raw label values."""
    try:
        label = Image.open(path)
        label.load()
    except FileNotFoundError:
        raise DataError(f"{path}: label file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: unreadable label ({error})") from None
    if label.mode == "L":
        return label
    if label.mode == "P":  # the palette index is the class id (VOC-style masks); convert("L") would mix colours
        return Image.fromarray(np.asarray(label))
    if len(label.getbands()) != 1:
        raise DataError(f"{path}: label must be a one-channel image of class ids, got mode {label.mode} "
                        "(a colour visualisation such as *_gtFine_color.png?)")
    values = np.asarray(label)
    # other one-band modes (I;16, I, F): 16/32-bit integer or float masks, accepted when the values are 8-bit ids
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):  # mode F: a cast would truncate
        raise DataError(f"{path}: label values are not whole numbers (a float image, expected class ids)")
    if values.min() < 0 or values.max() > 255:
        raise DataError(f"{path}: label values {values.min()}..{values.max()} do not fit 8 bits (expected 0..255)")
    return Image.fromarray(values.astype(np.uint8))


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file.

    Args:
        path: image file (any format PIL reads; converted to RGB).
    Returns:
        (H, W, 3) uint8 RGB array.
    """
    return np.array(_open_image(Path(path)))


def _label_lut(spec: DatasetSpec, path: Path, reduce_zero_label: bool | None) -> np.ndarray | None:
    """The raw -> train-id table for one label file, or None when the file already holds train ids."""
    if spec.name == "cityscapes" and path.name.endswith("_labelIds.png"):
        return CITYSCAPES_LUT
    reduce = spec.reduce_zero_label if reduce_zero_label is None else reduce_zero_label
    return REDUCE_ZERO_LUT if reduce else None


def _to_train_ids(label: Image.Image, spec: DatasetSpec, path: Path,
                  reduce_zero_label: bool | None) -> tuple[Image.Image, list[int]]:
    """Raw label values -> train ids ("L" image) and its 256-bin histogram, with the range check that keeps a wrong
    encoding from training silently. PIL's point/histogram run in C: ~20× faster than numpy fancy indexing."""
    table = _label_lut(spec, path, reduce_zero_label)
    if table is CITYSCAPES_LUT:  # the table sends any other value to ignore: a wrong file would train as void
        raw = label.histogram()
        bad = [value for value in range(CITYSCAPES_NUM_IDS, IGNORE_INDEX) if raw[value]]
        if bad:
            raise DataError(f"{path}: label values {bad[:6]} are not Cityscapes label ids (expected "
                            f"0..{CITYSCAPES_NUM_IDS - 1} or {IGNORE_INDEX} in a *_labelIds.png)")
    if table is not None:
        label = label.point(table.tolist())
    # After conversion every value must be a train id or ignore: K..254 means a file encoded for another dataset
    # or another conversion, which would otherwise index past the logits or train silently as the wrong class.
    counts = label.histogram()
    bad = [value for value in range(spec.num_classes, IGNORE_INDEX) if counts[value]]
    if bad:
        raise DataError(f"{path}: label values {bad[:6]} >= {spec.num_classes} classes of {spec.name} "
                        f"(expected 0..{spec.num_classes - 1} or {IGNORE_INDEX}){_ENCODING_HINTS.get(spec.name, '')}")
    return label, counts


_ENCODING_HINTS = {
    "cityscapes": "; is it a *_gtFine_labelIds.png saved under another name?",
    "ade20k": "; raw ADEChallengeData2016 masks need the zero-label reduction (do not mark them as reduced)",
}


def load_label(dataset: str, path: str | Path, *, reduce_zero_label: bool | None = None) -> np.ndarray:
    """Read a label file and convert it to train ids.

    Args:
        dataset: registry name; decides the conversion (Cityscapes *_labelIds.png -> trainIds, ADE20K 0 -> 255 and
            k -> k-1, the others as stored).
        path: label PNG.
        reduce_zero_label: override the dataset's zero-label reduction (False for ADE20K masks already reduced).
    Returns:
        (H, W) uint8 train ids, 255 = ignore. DataError when a value is >= K and not 255.
    """
    path = Path(path)
    return np.array(_to_train_ids(_open_label(path), get_spec(dataset), path, reduce_zero_label)[0])


def split_path(dataset: str, root: str | Path, split: str) -> Path:
    """Where a split file lives: `<root>/<split>.txt`, or `split` itself when it names a .txt file.

    Args:
        dataset: registry name (checked).
        root: dataset root.
        split: split name (train, val, synthetic_dense_fine, ...) or a path to a split file.
    Returns:
        Path of the split file.
    """
    get_spec(dataset)
    return Path(split) if split.endswith(".txt") else Path(root) / f"{split}.txt"


def _parse_split(path: Path) -> tuple[list[tuple[Path, Path | None]], list[str]]:
    """A split file's samples and one problem per line that is malformed or lists an image already listed (a
    repeated line would weight its sample twice without a word; a repeated image with another label contradicts)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: unreadable split file ({error})") from None
    # first_line: image -> line number of its first listing; problems are collected, not raised, so that
    # `python data.py check` can list every bad line while read_split stops at the first.
    samples, problems, first_line = [], [], {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2:
            problems.append(f"{path}:{number}: expected 'image [label]', got {len(fields)} fields")
            continue
        image = path.parent / fields[0]
        if image in first_line:
            problems.append(f"{path}:{number}: {fields[0]} is listed again (first on line {first_line[image]})")
            continue
        first_line[image] = number
        # paths resolve against the split file's folder, so a dataset root can be moved or mounted elsewhere
        samples.append((image, path.parent / fields[1] if len(fields) == 2 else None))
    return samples, problems


def read_split(path: str | Path) -> list[tuple[Path, Path | None]]:
    """Read a split file: one sample per line, `image [label]`; blank lines and `#` comments are skipped.

    Args:
        path: split file; relative paths inside it resolve against its own directory, absolute ones stay.
    Returns:
        [(image path, label path or None)] in file order. DataError on the first malformed or repeated line.
    """
    path = Path(path)
    samples, problems = _parse_split(path)
    if problems:
        more = f" ({len(problems)} bad lines; python data.py check lists them)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    return samples


def _atomic_write(path: Path, write) -> None:
    """Run write(temporary path), then rename onto path, so readers never see half a file (DDP ranks race here)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise DataError(f"{path}: cannot write ({error.strerror or error})") from None


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a (H, W) uint8 label map (or any PIL-readable array) as PNG, atomically."""
    _atomic_write(path, lambda temporary: Image.fromarray(array).save(temporary, format="PNG", compress_level=1))


def write_split(path: str | Path, samples: list[tuple[Path, Path | None]]) -> None:
    """Write a split file, paths relative to its directory when they lie below it.

    Args:
        path: split file to write (atomically).
        samples: [(image, label or None)].
    """
    path = Path(path)
    base = path.parent.resolve()

    def relative(file: Path) -> str:
        """Relative to the split file's folder when below it (the pair moves together), else absolute."""
        file = file.resolve()
        return (file.relative_to(base) if file.is_relative_to(base) else file).as_posix()

    lines = [" ".join(relative(file) for file in sample if file is not None) for sample in samples]
    _atomic_write(path, lambda temporary: temporary.write_text("\n".join(lines) + "\n"))


# ----------------------------------------------------------------------------------------------------------------
# The three real layouts

def _cityscapes_samples(root: Path, split: str) -> tuple[list[tuple[Path, Path | None]], list[str]]:
    """leftImg8bit/<split>/<city>/X_leftImg8bit.png with gtFine/<split>/<city>/X_gtFine_labelTrainIds.png when
    present (cityscapesScripts' createTrainIdLabelImgs), else X_gtFine_labelIds.png (mapped when read).
    Every lister returns (image, label) pairs, label None for an image without one, and a problem line for each
    of those."""
    if not (root / "gtFine" / split).is_dir():
        raise DataError(f"{root / 'gtFine' / split}: missing (expected gtFine/{split}/<city>/*_gtFine_labelIds.png)")
    samples, problems = [], []
    # one folder per city; the label shares the image's <city>_<sequence>_<frame> stem
    for image in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
        stem = image.name[: -len("_leftImg8bit.png")]
        label_dir = root / "gtFine" / split / image.parent.name
        candidates = [label_dir / f"{stem}_gtFine_labelTrainIds.png", label_dir / f"{stem}_gtFine_labelIds.png"]
        # trainIds first: converted once by cityscapesScripts, they need no table when read
        label = next((file for file in candidates if file.is_file()), None)
        if label is None:
            problems.append(f"{image}: no label, expected {candidates[1]} or {candidates[0].name}")
        samples.append((image, label))
    return samples, problems


def _ade20k_base(root: Path) -> Path:
    """The ADEChallengeData2016 folder: the root itself or its child of that name."""
    return root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root


def _ade20k_samples(root: Path, split: str) -> tuple[list[tuple[Path, Path | None]], list[str]]:
    """images/<training|validation>/ADE_*.jpg with annotations/<same folder>/ADE_*.png."""
    base, folder = _ade20k_base(root), ADE20K_FOLDERS[split]
    samples, problems = [], []
    for image in sorted((base / "images" / folder).glob("*.jpg")):
        label = base / "annotations" / folder / f"{image.stem}.png"
        if not label.is_file():
            problems.append(f"{image}: no label, expected {label}")
        samples.append((image, label if label.is_file() else None))
    return samples, problems


def _coco_samples(root: Path, split: str) -> tuple[list[tuple[Path, Path | None]], list[str]]:
    """<split>2017/<id>.jpg with masks/<id>.png rendered by prepare-coco."""
    if not (root / "masks").is_dir():
        raise DataError(f"{root / 'masks'}: COCO semantic masks missing; render them with "
                        f"python data.py prepare-coco --root {root}")
    samples, problems = [], []
    for image in sorted((root / f"{split}2017").glob("*.jpg")):
        label = root / "masks" / f"{image.stem}.png"
        if not label.is_file():
            problems.append(f"{image}: no mask, expected {label} (python data.py prepare-coco --root {root})")
        samples.append((image, label if label.is_file() else None))
    return samples, problems


_LISTERS = {"cityscapes": _cityscapes_samples, "ade20k": _ade20k_samples, "coco": _coco_samples}
LAYOUT_SPLITS = ("train", "val")  # the splits a real root's standard layout defines


def _image_dir(dataset: str, root: Path, split: str) -> Path:
    """The folder holding a layout split's images (train/val); whether it exists says if the split is there."""
    if dataset == "cityscapes":
        return root / "leftImg8bit" / split
    if dataset == "ade20k":
        return _ade20k_base(root) / "images" / ADE20K_FOLDERS[split]
    return root / f"{split}2017"


def _check_layout(spec: DatasetSpec, root: Path) -> None:
    """DataError naming the folder unless root holds the image folder of at least one layout split."""
    if not root.is_dir():
        raise DataError(f"{root}: {spec.name} root not found (expected {LAYOUTS[spec.name]})")
    if not any(_image_dir(spec.name, root, split).is_dir() for split in LAYOUT_SPLITS):
        raise DataError(f"{root}: not a {spec.name} root (expected {LAYOUTS[spec.name]})")


def _layout_split(spec: DatasetSpec, root: Path, split: str) -> tuple[list[tuple[Path, Path | None]], list[str]] | None:
    """A layout split that has no split file yet: its (image, label or None) pairs and its problems (images without
    a label, no image at all); None when the split file exists or the layout has no such split."""
    path = split_path(spec.name, root, split)
    if split not in LAYOUT_SPLITS or path.is_file():
        return None
    image_dir = _image_dir(spec.name, root, split)
    if not image_dir.is_dir():
        return None
    samples, problems = _LISTERS[spec.name](root, split)
    if not samples and not problems:
        problems = [f"{image_dir}: no images (expected {LAYOUTS[spec.name]})"]
    return samples, problems


def prepare_root(dataset: str, root: str | Path) -> Path:
    """Make a dataset root usable: the toy world is generated if absent; a real root has its layout checked and its
    missing train/val split files written from the standard layout.

    Args:
        dataset: registry name.
        root: dataset root.
    Returns:
        The root as a Path. DataError naming the folder when the layout is wrong, or the first image without a
        label (`python data.py check` lists them all).
    """
    spec, root = get_spec(dataset), Path(root)
    if spec.name in TOY_WORLDS:
        if not toy_world_exists(root, spec.name):
            if (root / "toy.json").is_file() and json.loads((root / "toy.json").read_text()).get(
                    "world", "toy") != spec.name:
                raise DataError(f"{root}: holds another toy world than --dataset {dataset}; give --data-root a "
                                f"folder of its own")
            make_toy_world(root, world=spec.name)
        return root
    _check_layout(spec, root)
    # only missing split files are written: one already there (a labelled subset, a custom list) is the user's
    for split in LAYOUT_SPLITS:
        listed = _layout_split(spec, root, split)
        if listed is None:
            continue
        samples, problems = listed
        if problems:
            more = (f" ({len(problems)} problems; python data.py check --dataset {dataset} --root {root} --split "
                    f"{split} lists them)") if len(problems) > 1 else ""
            raise DataError(problems[0] + more)
        write_split(split_path(dataset, root, split), samples)
    return root


def prepare_coco(root: str | Path, *, splits: tuple[str, ...] = ("train", "val"), overwrite: bool = False) -> int:
    """Render COCO-81 semantic masks from the instance annotations (pycocotools).

    masks/<id>.png: 0 = background, 1..80 = the thing classes in category-id order, 255 = crowd regions. Crowd
    regions are painted first and instances over them from the largest to the smallest, so individually annotated
    objects inside a crowd and small objects in front of large ones keep their class.

    Args:
        root: COCO root holding annotations/instances_{train,val}2017.json.
        splits: which annotation files to render.
        overwrite: re-render masks that exist (default: skip them, so an interrupted run resumes).
    Returns:
        Number of masks written.
    """
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise DataError("prepare-coco needs pycocotools: pip install pycocotools") from None
    root = Path(root)
    # COCO category id (1..90, with gaps) -> train id 1..80; 0 stays background
    class_of = {category: index for index, category in enumerate(COCO_CATEGORY_IDS) if index > 0}
    annotation_files = [root / "annotations" / f"instances_{split}2017.json" for split in splits]
    if not any(file.is_file() for file in annotation_files):
        raise DataError(f"{root / 'annotations'}: no {' or '.join(file.name for file in annotation_files)}")
    written = 0
    for file in annotation_files:
        if not file.is_file():
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its timing
                coco = COCO(str(file))
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{file}: not a COCO instances file ({error})") from None
        # one mask per image, named after the image file so _coco_samples pairs them by stem
        for image_id in tqdm(sorted(coco.imgs), desc=file.name, leave=False, disable=None):
            info = coco.imgs[image_id]
            out = root / "masks" / f"{Path(info['file_name']).stem}.png"
            if out.is_file() and not overwrite:
                continue
            mask = np.zeros((info["height"], info["width"]), np.uint8)  # (H, W), 0 = background
            annotations = coco.imgToAnns.get(image_id, [])
            # painter's order: crowds first, then instances largest first, so later (smaller) ones stay on top
            for annotation in sorted(annotations, key=lambda a: (not a.get("iscrowd", 0), -a.get("area", 0))):
                if annotation["category_id"] not in class_of:
                    raise DataError(f"{file}: annotation {annotation.get('id')} has category id "
                                    f"{annotation['category_id']}, not one of the 80 COCO categories")
                try:
                    region = coco.annToMask(annotation).astype(bool)  # (H, W)
                except (ValueError, KeyError, TypeError, IndexError) as error:
                    raise DataError(f"{file}: annotation {annotation.get('id')} has an unreadable "
                                    f"segmentation ({error})") from None
                mask[region] = IGNORE_INDEX if annotation.get("iscrowd", 0) else class_of[annotation["category_id"]]
            save_png(mask, out)
            written += 1
    return written


# ----------------------------------------------------------------------------------------------------------------
# The toy world: procedurally generated street-like scenes, stored like a real dataset

TOY_SIZE = 128  # image side in pixels: big enough for a 64 crop of a patch-8 ViT, small enough for CPU training
TOY_SEED = 0
TOY_VERSION = 3  # bump when the generator changes, so stale worlds are regenerated
TOY_JPEG_QUALITY = 95  # with 4:4:4 chroma: the fine textures survive compression
TOY_DEFAULT_SYNTHETIC = "synthetic_dense_fine"  # what synthetic.txt lists: the paper's preferred kind (dense, fine)
TOY_SYNTHETIC_PER_REAL = 2  # synthetic.txt and every synthetic_<kind>.txt list 2× the labelled set (the paper's default)
TOY_SCALES = (1, 2, 4, 6)  # synthetic_x<n>.txt: the first n × |train| dense-fine images (the paper's 1× ... 6× study)
# 20 labelled images: scarce enough that true labels on the 40 synthetic images add 6.0 mIoU (truth against
# supervised_B, 3 seeds: docs/toy_study.md), enough that the supervised teacher is ≥ 95 % sure of ≥ 40 % of every
# thing class's synthetic pixels (12 images: balls and crates are mistaken for each other)
TOY_LABELLED = 20
# a thing's size as a fraction of the side, a + b · nearness (0 at the horizon, 1 at the bottom): large enough that
# a thing's interior, not its border, holds most of its pixels at the crops' 0.5× scale (it was 0.12 + 0.24)
TOY_THING_SIZE = (0.16, 0.28)


@dataclass(frozen=True)
class ToyKnobs:
    """Generator settings of one toy split.

    Attributes:
        count: images in the split (for synthetic kinds: the pool on disk; split files list subsets of it).
        objects: (min, max) things per image: the density factor.
        scale: thing size multiplier (dense scenes hold smaller things, as crowded photos do).
        detail: amplitude of the fine textures, 1 = full: the texture half of the fidelity factor.
        softness: edge ramp width in pixels, 1 = anti-aliased sharp edge: the edge half of the fidelity factor.
        synthetic: apply the real -> synthetic appearance shift and store the true layout apart.
    """
    count: int
    objects: tuple[int, int]
    scale: float
    detail: float
    softness: float
    synthetic: bool


# TOY_LABELLED labelled images with 3-6 things each (the regime in which the paper adds synthetic data: labels are
# the scarce part); 6 × TOY_LABELLED images of each synthetic kind, for the 1× ... 6× scale study.
TOY_SPLITS = {
    "train": ToyKnobs(TOY_LABELLED, (3, 6), 1.0, 1.0, 1.0, False),
    "val": ToyKnobs(100, (3, 6), 1.0, 1.0, 1.0, False),
    "synthetic_dense_fine": ToyKnobs(max(TOY_SCALES) * TOY_LABELLED, (8, 14), 0.8, 1.0, 1.0, True),
    "synthetic_dense_coarse": ToyKnobs(max(TOY_SCALES) * TOY_LABELLED, (8, 14), 0.8, 0.25, 4.0, True),
    "synthetic_sparse_fine": ToyKnobs(max(TOY_SCALES) * TOY_LABELLED, (1, 2), 1.0, 1.0, 1.0, True),
    "synthetic_sparse_coarse": ToyKnobs(max(TOY_SCALES) * TOY_LABELLED, (1, 2), 1.0, 0.25, 4.0, True),
}


@dataclass(frozen=True)
class ToyWorld:
    """Which toy world a scene belongs to: its dataset name, classes and how often each thing class is drawn."""
    dataset: str  # registry name (DATASETS) and train.py's --dataset
    classes: tuple[str, ...]
    num_stuff: int  # classes[:num_stuff] are stuff, the rest things
    thing_p: tuple[float, ...] | None  # chance of each thing class per drawn thing; None = all alike
    labelled: int  # images of the train split (the synthetic splits list 2× as many)


TOY_WORLDS = {"toy": ToyWorld("toy", TOY_CLASSES, TOY_NUM_STUFF, None, TOY_LABELLED),
              "toy_lt": ToyWorld("toy_lt", TOY_LT_CLASSES, TOY_LT_NUM_STUFF, TOY_LT_THING_P, TOY_LT_LABELLED)}
# The synthetic look: warmer, brighter in the mid-tones and cleaner than real images, a small domain gap (half the
# first world's: (1.06, 1, 0.9), γ 0.9 and σ 1.5 made the supervised teacher call 18 % of synthetic road pixels ball)
TOY_SHIFT_GAIN = (1.03, 1.0, 0.95)
TOY_SHIFT_GAMMA = 0.95
TOY_NOISE = {False: 4.0, True: 3.0}  # pixel noise σ: real "sensor" noise vs slightly cleaner generated images
_SHIFT_LUT = (255 * (np.minimum(np.arange(256)[:, None] * np.array(TOY_SHIFT_GAIN), 255) / 255) ** TOY_SHIFT_GAMMA
              + 0.5).astype(np.uint8)  # (256, 3): the appearance shift per 8-bit value and channel


def _coverage(distance: np.ndarray, softness: float) -> np.ndarray:
    """Fraction of a pixel inside a shape from its signed distance (negative inside), ramp `softness` px wide."""
    return np.clip(0.5 - distance / softness, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """(size, size) float32 noise with features about `cell` px wide (a coarse random grid upsampled bicubically),
    rescaled to unit standard deviation."""
    # 2 spare cells: the box keeps the output between the coarse grid's cell centres, off its clamped border
    coarse = rng.standard_normal((int(size / cell) + 2,) * 2, dtype=np.float32)
    noise = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC, box=(
        0.5, 0.5, coarse.shape[1] - 1.5, coarse.shape[0] - 1.5)))
    return noise / noise.std()


def _colour(rng: np.random.Generator, mean: tuple[int, int, int], spread: float) -> np.ndarray:
    """(3,) float32 stuff colour: the class colour plus per-image variation."""
    return (np.array(mean) + rng.normal(0, spread, 3)).astype(np.float32)


def _any_colour(rng: np.random.Generator) -> np.ndarray:
    """(3,) float32 thing colour of any hue (saturation 0.45-0.9, value 0.45-0.95): a toy thing is known by its
    shape and texture, as a real car is, so the strong view's hue jitter and grayscale keep it what it is."""
    hue, saturation, value = rng.uniform(0, 6), rng.uniform(0.45, 0.9), rng.uniform(0.45, 0.95)
    channels = [(hue + offset) % 6 for offset in (5.0, 3.0, 1.0)]  # the HSV -> RGB formula per channel
    return np.array([255 * value * (1 - saturation * np.clip(min(k, 4 - k), 0, 1)) for k in channels], np.float32)


def _thing(rng: np.random.Generator, name: str, ground: float, size: float, detail: float,
           fine_noise: np.ndarray, grid: tuple[np.ndarray, np.ndarray]) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """One thing standing on the ground line y = `ground`: its window, signed distance and colour there.

    Each class has its own shape and a bold texture no other class has, in a colour drawn anew for every
    instance: ball = disc with light polka dots, shading and a highlight, crate = box of horizontal planks with
    dark gaps and a dark frame, cone = broad triangle with white stripes fanning out from its apex and a white
    base band, sign = diamond with a light checker; in the long-tailed world also barrel = upright rounded box of
    vertical staves, pole = tall thin bar with white stripes winding up it, tyre = ring with radial treads, lamp =
    disc of light concentric rings floating high. Every pixel of a thing shows its class's texture, which hue
    jitter and grayscale leave intact (blur and the coarse splits weaken it). (In the first toy world balls had six
    light and coloured segments and cones horizontal bands like a crate's planks: a supervised teacher was then
    never sure of a cone and often wrong on balls.)
    Returns None when the thing lies outside the image.
    """
    full = fine_noise.shape[0]
    # the centre may lie a little past either side, so some things are cut by the frame, as in photos
    cx = rng.uniform(-0.05, 1.05) * full
    # half extents and centre per class; all but the sign stand with their lowest point on the ground line
    if name == "ball":
        radius = 0.65 * size
        cy = ground - radius
        half_w, half_h = radius, radius
    elif name == "crate":
        half_w, half_h = size * rng.uniform(0.45, 0.75), size * rng.uniform(0.35, 0.55)
        cy = ground - half_h
    elif name == "cone":
        half_w, half_h = 0.65 * size, 0.8 * size
        cy = ground - half_h
    elif name == "sign":
        half_w = half_h = 0.6 * size
        cy = ground - 1.6 * size  # the sign floats above the ground on an unseen pole
    elif name == "barrel":
        half_w, half_h = 0.42 * size, 0.6 * size
        cy = ground - half_h
    elif name == "pole":
        half_w, half_h = 0.12 * size, 1.1 * size
        cy = ground - half_h
    elif name == "tyre":
        half_w = half_h = 0.55 * size
        cy = ground - half_h
    else:
        half_w = half_h = 0.45 * size
        cy = ground - 1.8 * size  # the lamp hangs high, its post unseen
    # the window: the bounding box plus a 3-4 px margin for the soft edge ramp (softness ≤ 4 px), clipped to the
    # image; the shape is evaluated there only, not over the whole image
    x0, x1 = max(int(cx - half_w) - 3, 0), min(int(cx + half_w) + 4, full)
    y0, y1 = max(int(cy - half_h) - 3, 0), min(int(cy + half_h) + 4, full)
    if x0 >= x1 or y0 >= y1:
        return None
    y, x = grid[0][y0:y1, x0:x1], grid[1][y0:y1, x0:x1]  # (h, w) pixel centres of the window
    dx, dy = x - cx, y - cy
    noise = fine_noise[y0:y1, x0:x1, None] * detail  # (h, w, 1)
    if name == "ball":
        # a disc lit from the upper left: darker away from the light, a glint near it, light polka dots on a 6 px
        # grid (a texture no other thing has, so every interior pixel says "ball")
        distance = np.hypot(dx, dy) - radius
        shade = 1 - 0.5 * np.clip(np.hypot(dx + 0.35 * radius, dy + 0.35 * radius) / (1.6 * radius), 0, 1)
        glint = 90 * detail * np.exp(-((dx + 0.3 * radius) ** 2 + (dy + 0.3 * radius) ** 2) / (0.05 * radius ** 2))
        dots = (_coverage(np.hypot(dx % 6 - 3, dy % 6 - 3) - 1.8, 1.0))[..., None]  # (h, w, 1)
        base = _any_colour(rng)
        light = base + (255 - base) * 0.85 * detail * dots
        colour = light * shade[..., None] + glint[..., None] + 6 * noise
    elif name == "crate":
        # an axis-aligned box (the L∞ distance) of horizontal planks 5-8 px tall
        distance = np.maximum(np.abs(dx) - half_w, np.abs(dy) - half_h)
        planks = 1 - 0.55 * detail * (np.floor((y - cy) / rng.uniform(5, 8)) % 2)  # dark gaps between planks
        rim = np.where(distance > -1.5, 1 - 0.5 * detail, 1.0)  # dark frame along the edge
        base = _any_colour(rng)
        colour = (base + 8 * noise) * (planks * rim)[..., None]
    elif name == "cone":
        top = cy - half_h
        slope = half_w / (2 * half_h)  # half-width grows by this per pixel down from the apex
        # divided by √(1 + slope²): a Euclidean distance, so the slanted sides get the same edge ramp as the base
        side = (np.abs(dx) - slope * (y - top)) / math.hypot(1, slope)
        distance = np.maximum(side, np.abs(dy) - half_h)
        # white stripes running down from the apex, fanning out (no other thing has slanted lines), and a white base
        # band along the bottom 15 % of the height
        band = (((x - cx) / np.maximum(y - top, 1.0) * 4) % 1 > 0.5) | (y > cy + 0.7 * half_h)
        base = _any_colour(rng)
        white = np.array([240, 240, 235], np.float32)
        colour = base + (white - base) * (detail * band)[..., None] + 6 * noise
    elif name == "sign":
        # a diamond (the L1 ball, / √2 to be Euclidean across its edges) with a 5 px checker
        distance = (np.abs(dx) + np.abs(dy) - half_w) / math.sqrt(2)
        checker = ((np.floor((x - cx) / 5) + np.floor((y - cy) / 5)) % 2)[..., None]
        base = _any_colour(rng)
        white = np.array([235, 235, 235], np.float32)
        colour = base + (white - base) * 0.85 * detail * checker + 6 * noise
    elif name == "barrel":
        # a box with rounded corners (radius r) of vertical staves 4 px wide with dark seams
        r = 0.35 * half_w
        qx, qy = np.abs(dx) - (half_w - r), np.abs(dy) - (half_h - r)
        distance = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r
        staves = 1 - 0.5 * detail * (np.floor((x - cx) / 4) % 2)
        base = _any_colour(rng)
        colour = (base + 8 * noise) * staves[..., None]
    elif name == "pole":
        # a thin upright bar with white stripes slanting up to the right, 6 px apart
        distance = np.maximum(np.abs(dx) - half_w, np.abs(dy) - half_h)
        stripes = ((((x - cx) + (y - cy)) / 6) % 1 > 0.5)[..., None]
        base = _any_colour(rng)
        white = np.array([240, 240, 240], np.float32)
        colour = base + (white - base) * 0.85 * detail * stripes + 6 * noise
    elif name == "tyre":
        # a ring (outer radius half_w, inner 0.45 of it), dark, with 16 lighter treads around it
        radius = np.hypot(dx, dy)
        distance = np.maximum(radius - half_w, 0.45 * half_w - radius)
        treads = (np.arctan2(dy, dx) * 8 / np.pi) % 1 > 0.5
        base = 0.45 * _any_colour(rng)
        colour = (base + 8 * noise) * (1 + 0.9 * detail * treads)[..., None]
    else:
        # lamp: a disc of light concentric rings 4 px apart
        radius = np.hypot(dx, dy)
        distance = radius - half_w
        rings = ((radius / 4) % 1 > 0.5)[..., None]
        base = _any_colour(rng)
        white = np.array([250, 250, 230], np.float32)
        colour = base + (white - base) * 0.85 * detail * rings + 6 * noise
    return (slice(y0, y1), slice(x0, x1)), distance, colour


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) float32 (size, size) pixel-centre coordinates, shared by all scenes (read-only)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    y.flags.writeable = x.flags.writeable = False
    return y, x


def render_toy_scene(rng: np.random.Generator, knobs: ToyKnobs, size: int = TOY_SIZE,
                     world: ToyWorld = TOY_WORLDS["toy"]) -> tuple[np.ndarray, np.ndarray]:
    """Draw one toy scene: sky over grass with a road to the horizon (and sidewalks along it in the long-tailed
    world), then things from far to near.

    Args:
        rng: numpy generator (one per image, so every image is reproducible on its own).
        knobs: the split's density / fidelity / appearance settings.
        size: image side.
        world: which world's classes (TOY_WORLDS); the balanced world draws exactly what it always drew.
    Returns:
        image (size, size, 3) uint8 RGB, label (size, size) uint8 train ids (the true layout, hard edges).
    """
    y, x = _pixel_grid(size)  # (S, S) pixel centres
    fine = rng.standard_normal((size, size), dtype=np.float32)  # (S, S) per-pixel texture noise
    # `fine` carries the per-pixel texture that the coarse splits damp (knobs.detail); `mid` (3 px) and `low`
    # (16 px) are shading that every split keeps
    mid, low = _smooth_noise(rng, size, 3), _smooth_noise(rng, size, 16)
    # horizon between 1/4 and 1/2 of the height, waved by up to 5 % of the side so it is not one image row
    horizon_level = size * rng.uniform(0.25, 0.5)
    horizon = horizon_level + size * rng.uniform(0, 0.05) * np.sin(
        2 * np.pi * x[0] / (size * rng.uniform(0.5, 1.5)) + rng.uniform(0, 2 * np.pi))  # (S,) per column
    depth = np.clip((y - horizon) / (size - horizon), 0, 1)  # (S, S) 0 at the horizon, 1 at the bottom

    # 1. stuff: grass everywhere, a road receding to the horizon, sky above
    classes = world.classes
    label = np.full((size, size), classes.index("grass"), np.uint8)
    grass = (_colour(rng, (75, 135, 50), 8)
             + (22 * knobs.detail * fine + 10 * mid + 12 * low)[..., None] * np.array([0.7, 1.0, 0.5], np.float32))
    image = grass  # (S, S, 3) float
    # most scenes have a road: half-width 1 px at the horizon, widening towards the bottom while its centre
    # drifts sideways, as a road seen from a car does
    if rng.random() < 0.8:
        centre = size * rng.uniform(0.3, 0.7) + depth * size * rng.uniform(-0.4, 0.4)
        road_distance = np.abs(x - centre) - (1 + depth * size * rng.uniform(0.25, 0.5))
        road_distance = np.maximum(road_distance, horizon - y)  # nothing of the road above the horizon
        road = (_colour(rng, (110, 108, 112), 6)
                + (12 * knobs.detail * fine + 6 * low)[..., None])
        if "sidewalk" in classes:  # a paved band along each side, 0-12 % of the side wide, widening to the bottom
            walk_distance = np.maximum(road_distance - 0.5 - depth * size * rng.uniform(0.04, 0.12), horizon - y)
            tiles = 1 - 0.25 * knobs.detail * ((np.floor(x / 6) + np.floor(y / 4)) % 2)  # (S, S) paving
            walk = (_colour(rng, (185, 165, 160), 8) + (10 * knobs.detail * fine + 5 * low)[..., None]) * tiles[..., None]
            image = image + (walk - image) * _coverage(walk_distance, knobs.softness)[..., None]
            label[walk_distance < 0] = classes.index("sidewalk")
        image = image + (road - image) * _coverage(road_distance, knobs.softness)[..., None]
        label[road_distance < 0] = classes.index("road")
    sky = (_colour(rng, (95, 145, 215), 8)
           + (35 * np.clip(y / horizon, 0, 1) + 5 * low)[..., None])  # lighter towards the horizon
    sky_distance = y - horizon
    image = image + (sky - image) * _coverage(sky_distance, knobs.softness)[..., None]
    label[sky_distance < 0] = classes.index("sky")

    # 2. things, far (near the horizon) to near (bottom) so nearer things occlude farther ones
    count = int(rng.integers(knobs.objects[0], knobs.objects[1] + 1))
    # ground lines from just below the horizon to 10 % past the bottom edge; a thing's size grows with its
    # nearness from 12 % to 36 % of the side (perspective), times the split's scale
    grounds = np.sort(rng.uniform(horizon_level + 0.05 * size, 1.1 * size, count))
    for ground in grounds:
        if world.thing_p is None:
            cls = int(rng.integers(world.num_stuff, len(classes)))
        else:
            cls = world.num_stuff + int(rng.choice(len(world.thing_p), p=world.thing_p))
        near = np.clip((ground - horizon_level) / (size - horizon_level), 0, 1)
        thing_size = knobs.scale * size * (TOY_THING_SIZE[0] + TOY_THING_SIZE[1] * near) * rng.uniform(0.85, 1.15)
        drawn = _thing(rng, classes[cls], ground, thing_size, knobs.detail, fine, (y, x))
        if drawn is None:
            continue
        window, distance, colour = drawn
        image[window] += (colour - image[window]) * _coverage(distance, knobs.softness)[..., None]
        # label[window] is a view, so the write lands in label; the label takes the hard edge (distance < 0)
        # whatever the image's softness: a coarse image keeps a sharp true layout
        label[window][distance < 0] = cls

    # 3. appearance: exposure and noise for real images; a warmer, brighter, cleaner look for synthetic ones
    if not knobs.synthetic:
        image *= rng.uniform(0.9, 1.1)
    image += TOY_NOISE[knobs.synthetic] * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    if knobs.synthetic:
        image = np.take_along_axis(_SHIFT_LUT, image.reshape(-1, 3), 0).reshape(image.shape)
    return image, label


def _toy_files(split: str, index: int) -> tuple[str, str | None, str | None]:
    """Relative (image, label, true layout) paths of one toy sample: JPEG images (20× faster to write than PNG
    for noisy textures, like ADE20K/COCO), PNG labels."""
    name = f"{index:06d}"
    if TOY_SPLITS[split].synthetic:
        kind = split[len("synthetic_"):]
        return f"synthetic/{kind}/{name}.jpg", None, f"synthetic_truth/{kind}/{name}.png"
    return f"images/{split}/{name}.jpg", f"labels/{split}/{name}.png", None


def toy_world_exists(root: str | Path, world: str = "toy") -> bool:
    """True when root holds a complete toy world of the current generator version, of the given world."""
    try:
        meta = json.loads((Path(root) / "toy.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == TOY_VERSION and meta.get("world", "toy") == world


def make_toy_world(root: str | Path, *, seed: int = TOY_SEED, counts: dict[str, int] | None = None,
                   world: str = "toy") -> Path:
    """Write the toy world: images, label PNGs, true layouts of the synthetic images and split files.

    Deterministic from `seed`: image i of split s comes from numpy's generator seeded with (seed, s, i).
    toy.json is written last, so an interrupted run is redone on next use.

    Args:
        root: output folder (created).
        seed: world seed.
        counts: images per split where not the TOY_SPLITS count (small worlds for tests).
        world: "toy" (7 classes, things alike) or "toy_lt" (12 classes, long-tailed), TOY_WORLDS.
    Returns:
        root as a Path.
    """
    root, world = Path(root), TOY_WORLDS[world]
    counts = {split: (counts or {}).get(split, world.labelled if split == "train" else knobs.count)
              for split, knobs in TOY_SPLITS.items()}
    splits = {}
    progress = tqdm(total=sum(counts.values()), desc=f"toy world -> {root}", leave=False, disable=None)
    for split_index, (split, knobs) in enumerate(TOY_SPLITS.items()):
        lines = []
        for index in range(counts[split]):
            # one generator per image: image i is the same whatever the counts, so a small test world holds
            # the first images of the full one
            image, label = render_toy_scene(np.random.default_rng([seed, split_index, index]), knobs, world=world)
            image_file, label_file, truth_file = _toy_files(split, index)
            _atomic_write(root / image_file, lambda temporary, image=image: Image.fromarray(image).save(
                temporary, format="JPEG", quality=TOY_JPEG_QUALITY, subsampling=0))
            # synthetic images get no label line: their layout goes to synthetic_truth/, read only to measure
            # pseudo-labels, never to train
            save_png(label, root / (label_file or truth_file))
            lines.append(f"{image_file} {label_file}" if label_file else image_file)
            progress.update()
        splits[split] = lines
    progress.close()
    splits.update(toy_synthetic_splits(splits))
    for split, lines in splits.items():
        _atomic_write(root / f"{split}.txt", lambda temporary, lines=lines: temporary.write_text("\n".join(lines) + "\n"))
    meta = {"version": TOY_VERSION, "world": world.dataset, "seed": seed, "size": TOY_SIZE,
            "classes": list(world.classes),
            "splits": {split: dict(vars(knobs), count=counts[split]) for split, knobs in TOY_SPLITS.items()}}
    _atomic_write(root / "toy.json", lambda temporary: temporary.write_text(json.dumps(meta, indent=1) + "\n"))
    return root


def toy_synthetic_splits(pools: dict[str, list[str]]) -> dict[str, list[str]]:
    """The synthetic split files of the toy world, as subsets of each kind's pool (n = the labelled set's size):

    synthetic_<kind>   the first 2n images of the kind (matched sizes for the density × fidelity study);
    synthetic          = synthetic_dense_fine (what train.py reads by default);
    synthetic_x<m>     the first m·n dense-fine images, m in TOY_SCALES (the synthetic-scale study);
    synthetic_pool     the first n/2 images of each kind, mixed (for `quality.py select`: the top half is n).
    Lists are cut to the pool when a small world (tests) holds fewer images.
    """
    n = len(pools["train"])
    kinds = [split for split in TOY_SPLITS if TOY_SPLITS[split].synthetic]
    splits = {kind: pools[kind][:TOY_SYNTHETIC_PER_REAL * n] for kind in kinds}
    splits["synthetic"] = splits[TOY_DEFAULT_SYNTHETIC]
    for multiple in TOY_SCALES:
        splits[f"synthetic_x{multiple}"] = pools[TOY_DEFAULT_SYNTHETIC][:multiple * n]
    splits["synthetic_pool"] = [line for kind in kinds for line in pools[kind][:max(1, n // 2)]]
    return splits


def truth_path(image: str | Path) -> Path | None:
    """Where the true layout of a synthetic image is stored: its path with the last `synthetic` folder renamed
    `synthetic_truth` and a .png suffix (the toy world's convention), or None when the path has no such folder."""
    parts = list(Path(image).parts)
    # from the innermost folder outwards (the file name itself excluded): a root that lies under some other folder
    # called `synthetic` still maps to its own synthetic_truth/
    for position in range(len(parts) - 2, -1, -1):
        if parts[position] == "synthetic":
            parts[position] = "synthetic_truth"
            return Path(*parts).with_suffix(".png")
    return None


def toy_preview(root: str | Path, out: str | Path, *, per_split: int = 4, dataset: str = "toy") -> Path:
    """Save a grid of toy samples: one row per split (real train, synthetic dense/sparse × fine/coarse), each
    sample as image | coloured label (the stored true layout for synthetic images).

    Args:
        root: toy world folder (generated when absent).
        out: PNG to write.
        per_split: samples per row.
        dataset: "toy" or "toy_lt".
    Returns:
        out as a Path.
    """
    root = prepare_root(dataset, root)
    rows = ["train", "synthetic_dense_fine", "synthetic_dense_coarse", "synthetic_sparse_fine",
            "synthetic_sparse_coarse"]
    tiles = []
    for split in rows:
        row = []
        for image_file, label_file in read_split(split_path(dataset, root, split))[:per_split]:
            label = load_label(dataset, label_file or truth_path(image_file))
            row += [load_image(image_file), colorize(label, get_spec(dataset).palette)]
        tiles.append(np.concatenate(row, axis=1))  # (S, 2·per_split·S, 3)
    grid = Image.fromarray(np.concatenate(tiles, axis=0))
    draw = ImageDraw.Draw(grid)
    for number, split in enumerate(rows):
        draw.text((3, number * TOY_SIZE + 2), split, fill=(255, 255, 255))
    _atomic_write(Path(out), lambda temporary: grid.save(temporary, format="PNG"))
    return Path(out)


# ----------------------------------------------------------------------------------------------------------------
# The pretraining world of the toy backbone: what DINOv2's web images are to the real backbones. Other shapes and
# textures with classes of their own (none of them a toy-world class), any colour, never a toy-world image.

PRETRAIN_CLASSES = ("plain", "stripes", "dots", "grain", "ring", "cross", "star", "crescent", "bar",
                    "disc", "box", "triangle", "diamond")
PRETRAIN_TEXTURES = 4  # the first 4 classes are background textures, the other 5 shapes


def _texture(rng: np.random.Generator, kind: int, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(S, S, 3) float32 picture of texture `kind` (an index of PRETRAIN_CLASSES below PRETRAIN_TEXTURES) in two
    random colours."""
    y, x = grid
    size = y.shape[0]
    first, second = _any_colour(rng), _any_colour(rng)
    if kind == 0:  # plain: one colour, slow shading
        mix = 0.25 * _smooth_noise(rng, size, 16)
    elif kind == 1:  # stripes at any angle, 3-9 px period
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 9)
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    elif kind == 2:  # dots on a square grid
        spacing = rng.uniform(5, 10)
        radius = spacing * rng.uniform(0.2, 0.35)
        dx, dy = x % spacing - spacing / 2, y % spacing - spacing / 2
        mix = _coverage(np.hypot(dx, dy) - radius, 1.0)
    else:  # grain: fine random texture
        mix = np.clip(0.5 + 0.25 * rng.standard_normal((size, size), dtype=np.float32)
                      + 0.15 * _smooth_noise(rng, size, 3), 0, 1)
    return first + (second - first) * np.asarray(mix, np.float32)[..., None]


def _pretrain_shape(rng: np.random.Generator, kind: int, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(S, S) float32 signed distance (negative inside) of one shape of class `kind` (ring ... bar)."""
    y, x = grid
    size = y.shape[0]
    cx, cy, radius = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.08, 0.3) * size
    angle = rng.uniform(0, 2 * np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)  # coordinates in the shape's own frame
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    r = np.hypot(u, v)
    name = PRETRAIN_CLASSES[kind]
    if name == "ring":
        return np.abs(r - radius) - radius * rng.uniform(0.15, 0.3)
    if name == "cross":
        arm = 0.25 * radius
        return np.minimum(np.maximum(np.abs(u) - radius, np.abs(v) - arm), np.maximum(np.abs(v) - radius, np.abs(u) - arm))
    if name == "star":
        return r - radius * (0.6 + 0.4 * np.cos(5 * np.arctan2(v, u)))
    if name == "crescent":
        return np.maximum(r - radius, 0.85 * radius - np.hypot(u - 0.5 * radius, v))
    if name == "disc":
        return r - radius
    if name == "box":
        return np.maximum(np.abs(u) - radius, np.abs(v) - radius * rng.uniform(0.5, 1.0))
    if name == "triangle":
        top, slope = -radius, 0.5
        return np.maximum((np.abs(u) - slope * (v - top)) / math.hypot(1, slope), np.abs(v) - radius)
    if name == "diamond":
        return (np.abs(u) + np.abs(v) - radius) / math.sqrt(2)
    return np.hypot(np.maximum(np.abs(u) - radius, 0), v) - 0.3 * radius  # bar: a capsule


def render_pretrain_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image of the pretraining world: 1-3 textured regions split by straight lines, then 1-5 shapes, each
    filled with a texture that says nothing about its class.

    Args:
        rng: numpy generator of this image.
        size: image side S.
    Returns:
        image (size, size, 3) uint8 RGB, label (size, size) uint8 indices of PRETRAIN_CLASSES.
    """
    grid = _pixel_grid(size)
    y, x = grid
    kind = int(rng.integers(PRETRAIN_TEXTURES))
    image, label = _texture(rng, kind, grid), np.full((size, size), kind, np.uint8)
    for _ in range(int(rng.integers(0, 3))):  # more regions: the far side of a random line
        angle, offset = rng.uniform(0, 2 * np.pi), rng.uniform(-0.3, 0.3) * size
        side = (x - size / 2) * np.cos(angle) + (y - size / 2) * np.sin(angle) - offset
        kind = int(rng.integers(PRETRAIN_TEXTURES))
        image += (_texture(rng, kind, grid) - image) * _coverage(side, 1.0)[..., None]
        label[side < 0] = kind
    # a shape's class shows in its outline only (its fill is a background texture, its edge 1-3 px soft): the
    # backbone has to learn shapes and edges, not only textures, as the toy world's things then ask of it
    for _ in range(int(rng.integers(1, 6))):
        kind = int(rng.integers(PRETRAIN_TEXTURES, len(PRETRAIN_CLASSES)))
        distance = _pretrain_shape(rng, kind, grid)
        fill = _texture(rng, int(rng.integers(PRETRAIN_TEXTURES)), grid)
        image += (fill - image) * _coverage(distance, rng.uniform(1, 3))[..., None]
        label[distance < 0] = kind
    image += 3 * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), label


def normalize(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32 ImageNet-normalised, as every dataset item is."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return pixels.mul_(_NORM_SCALE).sub_(_NORM_SHIFT)


# ----------------------------------------------------------------------------------------------------------------
# Augmentation (the paper's weak and strong views). All randomness from torch's global generator: DataLoader worker seeding and the
# RNG state saved in checkpoints then make every crop reproducible.

def _uniform(low: float, high: float) -> float:
    """A float uniform in [low, high) from torch's global generator."""
    return low + (high - low) * torch.rand(()).item()


@dataclass(frozen=True)
class _Crop:
    """One random crop: resize the image to width × height, cut [left, left + c) × [top, top + c), pad the part
    that runs past the resized image on the right/bottom (valid_w × valid_h is what remains), then maybe flip."""
    width: int
    height: int
    left: int
    top: int
    valid_w: int
    valid_h: int
    flip: bool
    size: int


def _sample_crop(size: tuple[int, int], crop_size: int) -> _Crop:
    """Draw rescale factor (long side × [0.5, 2]), crop offset and flip for an image of size (W, H)."""
    width, height = size
    long_side = max(int(max(width, height) * _uniform(*SCALE_RANGE) + 0.5), 1)
    if width >= height:
        new_w, new_h = long_side, max(int(height * long_side / width + 0.5), 1)
    else:
        new_w, new_h = max(int(width * long_side / height + 0.5), 1), long_side
    # the offset is uniform over the positions that keep the crop inside the resized image; a side shorter than
    # the crop gets offset 0 and padding with ignore, as the reference code pads before cropping
    left = int(torch.randint(0, max(new_w - crop_size, 0) + 1, ()))
    top = int(torch.randint(0, max(new_h - crop_size, 0) + 1, ()))
    flip = torch.rand(()).item() < FLIP_P
    return _Crop(new_w, new_h, left, top, min(crop_size, new_w - left), min(crop_size, new_h - top), flip, crop_size)


def _resized_region(image: Image.Image, crop: _Crop, resample: int) -> Image.Image:
    """The valid part of the crop, resampled straight from the source image.

    PIL's `box` maps output pixels to the same source coordinates and filter support as resizing the whole image
    and cutting afterwards, so the pixels are the same up to rounding (≤ 2 levels from PIL's 8-bit intermediate
    pass; nearest-neighbour ties at exact half-pixels may pick the other neighbour); only the crop is computed,
    not up to 4× the image.
    """
    scale_x, scale_y = image.width / crop.width, image.height / crop.height
    box = (crop.left * scale_x, crop.top * scale_y,
           (crop.left + crop.valid_w) * scale_x, (crop.top + crop.valid_h) * scale_y)
    return image.resize((crop.valid_w, crop.valid_h), resample, box=box)


def _to_tensor(region: Image.Image, crop: _Crop | None, fill: int, dtype: torch.dtype) -> torch.Tensor:
    """(C, c, c) tensor of a crop's valid region, flipped and padded with `fill` as the crop says; (C, H, W) for
    the whole image when crop is None. One copy out of PIL, one converting copy into the output."""
    if crop is not None and crop.flip:
        region = region.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    with warnings.catch_warnings():
        # the bytes are only read (copied into the output), so torch's warning about read-only buffers is moot
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.frombuffer(region.tobytes(), dtype=torch.uint8)
    pixels = pixels.view(region.height, region.width, -1).permute(2, 0, 1)  # (C, h, w) uint8 view
    if crop is None or (crop.valid_w == crop.size and crop.valid_h == crop.size):
        return torch.empty(pixels.shape, dtype=dtype).copy_(pixels)
    out = torch.full((pixels.shape[0], crop.size, crop.size), fill, dtype=dtype)
    left = crop.size - crop.valid_w if crop.flip else 0  # padding was on the right; a flip moves it left
    out[:, :crop.valid_h, left:left + crop.valid_w] = pixels
    return out


_NORM_SCALE = 1 / (255 * torch.tensor(IMAGENET_STD).view(3, 1, 1))
_NORM_SHIFT = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _image_tensor(region: Image.Image, crop: _Crop | None) -> torch.Tensor:
    """(3, c, c) float32 ImageNet-normalised view, (x/255 − mean)/std in place; padding is x = 0."""
    return _to_tensor(region, crop, 0, torch.float32).mul_(_NORM_SCALE).sub_(_NORM_SHIFT)


def _label_tensor(label: Image.Image, crop: _Crop | None) -> torch.Tensor:
    """(c, c) int64 train ids, 255 = ignore (padding included)."""
    return _to_tensor(label, crop, IGNORE_INDEX, torch.int64)[0]


def _ignore_mask(crop: _Crop) -> torch.Tensor:
    """(c, c) bool, True on padding."""
    mask = torch.ones(crop.size, crop.size, dtype=torch.bool)
    left = crop.size - crop.valid_w if crop.flip else 0
    mask[:crop.valid_h, left:left + crop.valid_w] = False
    return mask


def _gray(points: np.ndarray) -> np.ndarray:
    """(N, 3) RGB points -> (N,) luma, the gray level that grayscale and the saturation/contrast blends use."""
    return points @ np.array(GRAY_WEIGHTS, np.float32)  # (N,)


def _shift_hue(points: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the HSV hue of (N, 3) RGB points by `shift` turns (value and saturation kept), as PIL/torchvision do."""
    high, low = points.max(1), points.min(1)
    chroma = high - low
    red, green, blue = points.T
    safe = np.where(chroma > 0, chroma, 1)  # grey points have no hue; any value works since chroma = 0
    hue = np.where(high == red, ((green - blue) / safe) % 6,
                   np.where(high == green, (blue - red) / safe + 2, (red - green) / safe + 4))  # (N,) in [0, 6)
    hue = (hue + 6 * shift) % 6
    channels = [(hue + offset) % 6 for offset in (5.0, 3.0, 1.0)]  # the HSV -> RGB formula per channel
    return np.stack([high - chroma * np.clip(np.minimum(k, 4 - k), 0, 1) for k in channels], 1)


def _colour_ops(ops: list[tuple[str, float]], points: np.ndarray, image: slice) -> np.ndarray:
    """The colour jitter (in its random order) and grayscale on (N, 3) float RGB points, saturating to [0, 255]
    after each op as PIL's 8-bit ops do; contrast blends with the mean gray of points[image], the image's pixels."""
    for name, factor in ops:
        if name == "brightness":
            points = points * factor
        elif name == "contrast":
            mean = _gray(points[image]).mean()
            points = mean + factor * (points - mean)
        elif name == "saturation":
            gray = _gray(points)[:, None]
            points = gray + factor * (points - gray)
        elif name == "hue":
            points = _shift_hue(points, factor)
        else:
            points = np.repeat(_gray(points)[:, None], 3, 1)
        points = np.clip(points, 0, 255)
    return points


def _colour_table(ops: list[tuple[str, float]], region: Image.Image) -> ImageFilter.Color3DLUT:
    """The colour jitter (in its random order) and grayscale as one 3-D lookup table.

    Brightness, saturation, hue and grayscale act on each pixel alone; contrast blends with the image's mean gray,
    taken here from a ~4096-pixel subsample passed through the preceding ops. Evaluating the chain on a
    17³ lattice and letting PIL interpolate costs one pass over the crop instead of torchvision's six
    (two of them HSV conversions); the result differs from the exact chain by about one gray level on average.
    """
    grid = np.linspace(0, 255, COLOUR_TABLE_SIZE, dtype=np.float32)
    blue, green, red = np.meshgrid(grid, grid, grid, indexing="ij")  # red varies fastest, as Color3DLUT expects
    lattice = np.stack([red, green, blue], -1).reshape(-1, 3)  # (n³, 3)
    stride = max(1, int(math.sqrt(region.width * region.height / 4096)))
    sample = np.asarray(region)[::stride, ::stride].reshape(-1, 3).astype(np.float32)  # (~4096, 3)
    # lattice and sample pass through the ops together: the sample only supplies the image mean that contrast
    # blends towards, the lattice rows become the table
    points = _colour_ops(ops, np.concatenate([lattice, sample]), slice(len(lattice), None))  # (N, 3)
    return ImageFilter.Color3DLUT(COLOUR_TABLE_SIZE, points[:len(lattice)] / 255, channels=3)


def _strong_draws() -> tuple[list[tuple[str, float]], float | None]:
    """The strong view's random draws, in one fixed order from torch's global generator: the colour ops to apply
    (jitter p 0.8 in torchvision's random order, then grayscale p 0.2) and the blur σ (None = no blur, p 0.5)."""
    ops = []
    # factor ranges as torchvision's ColorJitter: [max(0, 1 - s), 1 + s] for the first three, ±s turns for hue
    if torch.rand(()).item() < JITTER_P:
        order = torch.randperm(4).tolist()
        brightness, contrast, saturation = (_uniform(max(0.0, 1 - s), 1 + s) for s in JITTER[:3])
        hue = _uniform(-JITTER[3], JITTER[3])
        named = [("brightness", brightness), ("contrast", contrast), ("saturation", saturation), ("hue", hue)]
        ops = [named[index] for index in order]
    if torch.rand(()).item() < GRAYSCALE_P:
        ops.append(("grayscale", 0.0))
    sigma = _uniform(*BLUR_SIGMA) if torch.rand(()).item() < BLUR_P else None
    return ops, sigma


def _strong_colour(region: Image.Image) -> Image.Image:
    """Strong-view photometric ops: colour jitter and grayscale as one colour table (_colour_table; on the pixels
    themselves for a crop smaller than the table), then Gaussian blur (PIL's filter, as the reference code uses).
    strong_colour_reference is the same view, op by op."""
    ops, sigma = _strong_draws()
    if ops == [("grayscale", 0.0)]:
        region = region.convert("L").convert("RGB")  # cheaper than a table for grayscale alone
    elif ops and region.width * region.height <= COLOUR_TABLE_SIZE**3:
        # a crop with no more pixels than the table's lattice (the toy world's 64 x 64): the table's chain on the
        # pixels themselves costs less than building the table (and skips its interpolation)
        pixels = np.asarray(region, dtype=np.float32).reshape(-1, 3)  # (h·w, 3)
        pixels = _colour_ops(ops, pixels, slice(None))
        region = Image.fromarray(np.rint(pixels).astype(np.uint8).reshape(region.height, region.width, 3))
    elif ops:
        region = region.filter(_colour_table(ops, region))
    if sigma is not None:
        region = region.filter(ImageFilter.GaussianBlur(sigma))
    return region


def strong_colour_reference(region: Image.Image) -> Image.Image:
    """The textbook strong view: torchvision's ColorJitter and RandomGrayscale steps one after another (six passes
    over the crop, two of them HSV conversions), then the blur, with the same random draws as _strong_colour.
    _strong_colour is 1.7× faster on a CPU and 1.3 gray levels from this on average (tests/test_data.py; bench.py data
    uses this function as its reference)."""
    import torchvision.transforms.functional as TF  # only the reference needs torchvision here

    adjust = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
              "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    ops, sigma = _strong_draws()
    for name, factor in ops:
        region = TF.rgb_to_grayscale(region, 3) if name == "grayscale" else adjust[name](region, factor)
    if sigma is not None:
        region = region.filter(ImageFilter.GaussianBlur(sigma))
    return region


def cutmix_box(crop_size: int, p: float = CUTMIX_P) -> torch.Tensor:
    """A random CutMix box, drawn as the reference code does: area fraction ∈ [0.02, 0.4], aspect h/w ∈ [0.3, 1/0.3],
    top-left uniform, redrawn (aspect and position) until the box fits inside the crop.

    Args:
        crop_size: c.
        p: probability of a box (else the mask is empty).
    Returns:
        (c, c) bool, True inside the box.
    """
    mask = torch.zeros(crop_size, crop_size, dtype=torch.bool)
    if torch.rand(()).item() >= p:
        return mask
    area = _uniform(*CUTMIX_AREA) * crop_size * crop_size
    # rejection sampling, as the reference code: the area is drawn once, aspect and corner again until the box
    # fits, so the accepted corner is uniform over the positions where it fits
    while True:
        aspect = _uniform(*CUTMIX_ASPECT)
        box_w, box_h = int(math.sqrt(area / aspect)), int(math.sqrt(area * aspect))
        left, top = int(torch.randint(0, crop_size, ())), int(torch.randint(0, crop_size, ()))
        if left + box_w <= crop_size and top + box_h <= crop_size:
            break
    mask[top:top + box_h, left:left + box_w] = True
    return mask


def _check_crop(crop_size: int | None, patch_size: int) -> int:
    """The crop size, or DataError naming --crop-size when it is missing or not a multiple of the patch."""
    if crop_size is None or crop_size <= 0 or crop_size % patch_size:
        raise DataError(f"--crop-size {crop_size}: must be a positive multiple of the backbone patch size {patch_size}")
    return crop_size


# ----------------------------------------------------------------------------------------------------------------
# Datasets

class LabelledDataset(torch.utils.data.Dataset):
    """Real labelled images of one split.

    train=True: `(image (3, c, c) float32, label (c, c) int64)` with the paper's augmentation (rescale, pad with
    ignore, random crop, flip, ImageNet normalisation). train=False: `(image (3, H, W), label (H, W))` unaugmented.
    """

    def __init__(self, dataset: str, root: str | Path, split: str, *, crop_size: int | None = None,
                 train: bool = True, patch_size: int = 14, reduce_zero_label: bool | None = None):
        """
        Args:
            dataset: registry name.
            root: dataset root (the toy world is generated there when absent; split files are written if missing).
            split: split name (train, val) or a split file path.
            crop_size: c for train=True; a multiple of patch_size.
            train: augment and crop (True) or return full images (False).
            patch_size: the backbone's patch size.
            reduce_zero_label: override the dataset's zero-label reduction (False for already reduced ADE20K masks).
        """
        self.spec = get_spec(dataset)
        # evaluation reads full images at their own size, so only training needs a crop that tiles into patches
        self.crop_size = _check_crop(crop_size, patch_size) if train else crop_size
        self.train, self.reduce_zero_label = train, reduce_zero_label
        path = split_path(dataset, prepare_root(dataset, root), split)
        self.samples = read_split(path)
        if not self.samples:
            raise DataError(f"{path}: split file lists no images")
        unlabelled = next((image for image, label in self.samples if label is None), None)
        if unlabelled is not None:
            raise DataError(f"{path}: {unlabelled} has no label (a labelled split needs 'image label' lines)")
        self.decoded = DecodedFiles()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.samples[index]
        image, label = self.decoded.open(image_path, _open_image), self.decoded.open(label_path, _open_label)
        if image.size != label.size:
            raise DataError(f"{label_path}: label is {label.width}×{label.height} but {image_path} is "
                            f"{image.width}×{image.height}")
        crop = _sample_crop(image.size, self.crop_size) if self.train else None
        if crop is not None:
            image = _resized_region(image, crop, Image.BILINEAR)
            label = _resized_region(label, crop, Image.NEAREST)  # nearest keeps label values
        # train ids are looked up after resizing (same result for nearest), on the crop only
        label = _to_train_ids(label, self.spec, label_path, self.reduce_zero_label)[0]
        return _image_tensor(image, crop), _label_tensor(label, crop)  # (3, c, c), (c, c) 255 = ignore


def synthetic_images(source: str | Path) -> list[Path]:
    """The image list of a synthetic source.

    Args:
        source: a folder (images found recursively), a split file (.txt, first column), or generate.py's
            manifest.jsonl (one JSON object per line with a `file` key relative to the manifest's folder).
    Returns:
        Image paths (sorted for folders, file order otherwise).
    """
    source = Path(source)
    # a folder: every image file below it, in a fixed order whatever the file system lists first
    if source.is_dir():
        images = sorted(file for file in source.rglob("*") if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file())
    # generate.py's manifest: the `file` of each record; the other keys (prompt, seed, ...) are not needed here
    elif source.suffix == ".jsonl" and source.is_file():
        first_line = {}  # image -> line: a repeated record would weight its image twice without a word
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                image = source.parent / json.loads(line)["file"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{source}:{number}: expected a JSON object with a 'file' key") from None
            if image in first_line:
                raise DataError(f"{source}:{number}: {image} is listed again (first on line {first_line[image]})")
            first_line[image] = number
        images = list(first_line)
    # a split file: its image column; a label column, if any, is not read (synthetic images train without one)
    elif source.suffix == ".txt" and source.is_file():
        images = [image for image, _ in read_split(source)]
    elif not source.exists():
        raise DataError(f"{source}: synthetic source not found (expected a folder, a .txt split file or manifest.jsonl)")
    else:
        raise DataError(f"{source}: unsupported synthetic source (expected a folder, a .txt split file or a .jsonl manifest)")
    if not images:
        raise DataError(f"{source}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return images


class SyntheticDataset(torch.utils.data.Dataset):
    """Unlabelled (synthetic) images with a weak and a strong view of the same crop.

    Item: `(image_w (3, c, c) float32, image_s (3, c, c) float32, ignore_mask (c, c) bool (True = padding),
    cutmix_box (c, c) bool)`, plus `truth (c, c) int64` with with_truth=True: the stored true layout under the
    same geometry, all 255 when none exists (for measuring pseudo-labels; never for training).
    """

    def __init__(self, source: str | Path, *, crop_size: int, patch_size: int = 14, with_truth: bool = False):
        """
        Args:
            source: folder, split file or manifest.jsonl (see synthetic_images).
            crop_size: c, a multiple of patch_size.
            patch_size: the backbone's patch size.
            with_truth: append the true layout (toy world) to each item.
        """
        self.crop_size = _check_crop(crop_size, patch_size)
        self.images = synthetic_images(source)
        missing = [image for image in self.images if not image.is_file()]  # met at start, not hours into a run
        if missing:
            raise DataError(f"{missing[0]}: missing ({len(missing)} of the {len(self.images)} images of {source})")
        self.with_truth = with_truth
        self.decoded = DecodedFiles()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        path, size = self.images[index], self.crop_size
        image = self.decoded.open(path, _open_image)
        # one crop for both views, so the teacher's pseudo-label from the weak view lines up pixel for pixel with
        # the student's strong view; only colour and blur differ between them
        crop = _sample_crop(image.size, size)
        region = _resized_region(image, crop, Image.BILINEAR)  # shared geometry of both views
        image_w = _image_tensor(region, crop)  # (3, c, c)
        image_s = _image_tensor(_strong_colour(region), crop)  # (3, c, c)
        item = (image_w, image_s, _ignore_mask(crop), cutmix_box(size))
        if self.with_truth:
            item += (self._truth(path, image.size, crop),)
        return item

    def _truth(self, path: Path, image_size: tuple[int, int], crop: _Crop) -> torch.Tensor:
        """(c, c) int64 true layout under the crop's geometry; all ignore when the image has none."""
        truth_file = truth_path(path)
        if truth_file is None or not truth_file.is_file():
            return torch.full((self.crop_size, self.crop_size), IGNORE_INDEX, dtype=torch.int64)
        truth = self.decoded.open(truth_file, _open_label)
        if truth.size != image_size:
            raise DataError(f"{truth_file}: true layout is {truth.width}×{truth.height}, {path} is "
                            f"{image_size[0]}×{image_size[1]}")
        return _label_tensor(_resized_region(truth, crop, Image.NEAREST), crop)


# ----------------------------------------------------------------------------------------------------------------
# Validation: python data.py check, and the quick version train.py runs before training

def _check_sample(spec: DatasetSpec, image_path: Path, label_path: Path | None,
                  reduce_zero_label: bool | None) -> tuple[list[str], tuple[int, int] | None, np.ndarray | None]:
    """Decode one sample: (problems, image size (W, H), per-value pixel counts (256,) of its train ids). The image
    and the label are checked apart, so that a sample with both broken reports both."""
    problems, image, counts = [], None, None
    try:
        image = _open_image(image_path)
    except DataError as error:
        problems.append(str(error))
    if label_path is not None:
        try:
            label = _open_label(label_path)
            if image is not None and label.size != image.size:
                raise DataError(f"{label_path}: label is {label.width}×{label.height} but {image_path} is "
                                f"{image.width}×{image.height}")
            counts = np.array(_to_train_ids(label, spec, label_path, reduce_zero_label)[1])
        except DataError as error:
            problems.append(str(error))
    return problems, None if image is None else image.size, None if problems else counts


def _scan(dataset: str, root: str | Path, split: str, *, quick: bool,
          reduce_zero_label: bool | None) -> tuple[list[str], dict]:
    """check_dataset's work, plus the statistics of the summary table. Every problem is collected, none stops
    the scan: a user fixing a dataset sees them all in one pass."""
    stats = {"samples": 0, "labelled": 0, "decoded": 0, "sizes": Counter(), "pixels": np.zeros(256, np.int64),
             "images_with": np.zeros(256, np.int64)}
    # 1. the sample list: a problem here (no root, no split file) ends the scan, as there is nothing to decode
    try:
        spec, root = get_spec(dataset), Path(root)
        if spec.name in TOY_WORLDS:
            prepare_root(dataset, root)
        else:
            _check_layout(spec, root)
        path = split_path(dataset, root, split)
        # a real root's train/val without a split file yet: listed from the layout (as prepare_root does)
        listed = None if spec.name in TOY_WORLDS else _layout_split(spec, root, split)
        if listed is None and not path.is_file() and split in LAYOUT_SPLITS and spec.name not in TOY_WORLDS:
            raise DataError(f"{path}: split file not found, and no {_image_dir(spec.name, root, split)} to make it from")
        samples, problems = _parse_split(path) if listed is None else listed
    except DataError as error:
        return [str(error)], stats
    if not samples and not problems:
        return [f"{path}: split file lists no images"], stats
    if listed is not None and not problems:
        write_split(path, samples)  # what prepare_root writes, so that training finds it
    # 2. the split as a whole: a split file that labels some lines and not others was most likely cut or mis-merged
    stats["samples"] = len(samples)
    labelled = [label is not None for _, label in samples]
    stats["labelled"] = sum(labelled)
    if listed is None and any(labelled) and not all(labelled):
        first = samples[labelled.index(False)][0]
        problems.append(f"{path}: {len(labelled) - sum(labelled)} lines without a label, first {first}")
    # 3. every listed file exists (cheap, always all of them); only files that exist are decoded
    present = []
    for image, label in samples:
        missing = [file for file in (image, label) if file is not None and not file.is_file()]
        problems += [f"{file}: missing (listed in {path})" for file in missing]
        if not missing:
            present.append((image, label))
    # quick: QUICK_SAMPLES samples evenly spaced from the first to the last, not the first few of one folder
    if quick and len(present) > QUICK_SAMPLES:
        present = [present[round(i * (len(present) - 1) / (QUICK_SAMPLES - 1))] for i in range(QUICK_SAMPLES)]
    # 4. decode each sample and gather the summary's statistics
    # decoding is mostly in C with the GIL released: threads use the cores without pickling images
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda sample: _check_sample(spec, *sample, reduce_zero_label), present)
        for found, size, counts in tqdm(results, total=len(present), desc=f"check {split}", leave=False,
                                        disable=True if quick else None):
            problems += found
            stats["decoded"] += 1
            if size is not None:
                stats["sizes"][size] += 1
            if counts is not None:
                stats["pixels"] += counts
                stats["images_with"] += counts > 0
    return problems, stats


def class_frequencies(dataset: str, root: str | Path, split: str, num_classes: int, *,
                      reduce_zero_label: bool | None = None) -> np.ndarray:
    """(K,) float64 share of each class among the labelled pixels of a split (ignore excluded), read from every
    label file: the prior class marginal of `train.py --ot-marginal prior`."""
    spec = get_spec(dataset)
    counts = np.zeros(num_classes, np.float64)
    for _, label_path in read_split(split_path(dataset, prepare_root(dataset, root), split)):
        _, histogram = _to_train_ids(_open_label(label_path), spec, label_path, reduce_zero_label)
        counts += histogram[:num_classes]
    if counts.sum() == 0:
        raise DataError(f"{split}: no labelled pixel to take class frequencies from")
    return counts / counts.sum()


def check_dataset(dataset: str, root: str | Path, split: str, *, quick: bool = False,
                  reduce_zero_label: bool | None = None) -> list[str]:
    """Validate one split: layout, split file, missing or unreadable files, image/label size agreement, label values
    >= K other than 255 (after the dataset's conversion).

    Args:
        dataset: registry name.
        root: dataset root (prepared as prepare_root does: toy generated, split files written).
        split: split name or split file.
        quick: check that every listed file exists but decode only QUICK_SAMPLES samples spread over the split
            (seconds; what train.py runs at start) instead of all of them.
        reduce_zero_label: override the dataset's zero-label reduction.
    Returns:
        One line per problem, each naming the file; empty when the split is fine.
    """
    return _scan(dataset, root, split, quick=quick, reduce_zero_label=reduce_zero_label)[0]


def _summary(dataset: str, split: str, stats: dict, problems: int) -> str:
    """The table `python data.py check` prints after a split's problems (the classes over the readable samples)."""
    spec = get_spec(dataset)
    sizes = ", ".join(f"{w}×{h} ({n})" for (w, h), n in stats["sizes"].most_common(3))
    more = f" and {len(stats['sizes']) - 3} more" if len(stats["sizes"]) > 3 else ""
    lines = [f"{dataset} {split}: {stats['samples']} images, {stats['labelled']} labelled, "
             f"{stats['decoded']} decoded, {problems} problem(s); sizes {sizes or '-'}{more}"]
    total = stats["pixels"].sum()
    if total:
        lines += [f"{'id':>4}  {'class':<22}{'pixels %':>9}{'images':>8}"]
        for index, name in enumerate(spec.classes):
            lines.append(f"{index:>4}  {name[:22]:<22}{100 * stats['pixels'][index] / total:>9.2f}"
                         f"{stats['images_with'][index]:>8}")
        lines.append(f"{IGNORE_INDEX:>4}  {'ignore':<22}{100 * stats['pixels'][IGNORE_INDEX] / total:>9.2f}"
                     f"{stats['images_with'][IGNORE_INDEX]:>8}")
        absent = [spec.classes[k] for k in range(spec.num_classes) if stats["pixels"][k] == 0]
        if absent:
            lines.append(f"classes absent from this split: {', '.join(absent)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Pictures

def colorize(label: np.ndarray, palette: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    """Colour a label map.

    Args:
        label: (H, W) integer train ids, 255 = ignore.
        palette: K RGB colours.
    Returns:
        (H, W, 3) uint8; ignore and values without a colour are black.
    """
    # a 256-entry table: 255 and any id past the palette index black rows instead of failing
    table = np.zeros((256, 3), np.uint8)
    table[:len(palette)] = palette
    return table[np.asarray(label).astype(np.int64).clip(0, 255)]


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation.

    Args:
        image: (3, H, W) or (B, 3, H, W) float tensor.
    Returns:
        (H, W, 3) or (B, H, W, 3) uint8 numpy array.
    """
    image = image.detach().float().cpu()
    # x·std + mean in [0, 1], from the same two constants the forward normalisation uses, then back to 0..255
    pixels = (image * _NORM_SCALE.reciprocal() / 255 + _NORM_SHIFT / _NORM_SCALE / 255) * 255
    return pixels.round().clamp(0, 255).to(torch.uint8).movedim(-3, -1).numpy()


# ----------------------------------------------------------------------------------------------------------------
# Command line

def main() -> None:
    """Command line: `toy`, `check` and `prepare-coco` (see the file docstring); DataError exits with its one line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    # toy: write the toy world, optionally with a picture of it
    toy = commands.add_parser("toy", help="generate the toy world (and optionally a preview picture)")
    toy.add_argument("--root", default=None, help="output folder (default: data/toy, data/toy_lt with --long-tail)")
    toy.add_argument("--long-tail", action="store_true",
                     help="the long-tailed world: 12 classes with Cityscapes-like pixel shares (--dataset toy_lt)")
    toy.add_argument("--seed", type=int, default=TOY_SEED, help=f"world seed (default: {TOY_SEED})")
    toy.add_argument("--force", action="store_true", help="regenerate even if a toy world is there")
    toy.add_argument("--preview", help="save a grid of real / synthetic samples with coloured labels to this PNG")
    # check: validate a split of any registered dataset
    check = commands.add_parser("check", help="validate a dataset split; non-zero exit status on any problem")
    check.add_argument("--dataset", default="toy", choices=sorted(DATASETS), help="dataset (default: toy)")
    check.add_argument("--root", help="dataset root (default: data/<dataset>)")
    check.add_argument("--split", help="split name or split file (default: train and val)")
    check.add_argument("--quick", action="store_true", help="decode only a few samples (what training runs at start)")
    check.add_argument("--ade-reduced", action="store_true",
                       help="ADE20K masks are already reduced (0..149, 255 ignore) (default: raw 0..150)")
    # prepare-coco: render the semantic masks the coco layout expects
    coco = commands.add_parser("prepare-coco", help="render COCO-81 masks/<id>.png from the instance annotations")
    coco.add_argument("--root", required=True, help="COCO root with annotations/instances_{train,val}2017.json")
    coco.add_argument("--overwrite", action="store_true", help="re-render existing masks (default: skip them)")
    args = parser.parse_args()
    # a DataError already names the file or flag at fault: print that line and exit 1, without a traceback
    try:
        if args.command == "toy":
            world = "toy_lt" if args.long_tail else "toy"
            root = args.root or f"data/{world}"
            if args.force or not toy_world_exists(root, world):
                make_toy_world(root, seed=args.seed, world=world)
                print(f"{world} world written to {root}")
            else:
                print(f"{world} world already at {root} (--force regenerates it)")
            if args.preview:
                print(f"preview: {toy_preview(root, args.preview, dataset=world)}")
        # check: every split is scanned in full before the exit status is decided, so one run lists all problems
        elif args.command == "check":
            root = args.root or f"data/{args.dataset}"
            reduce = False if args.ade_reduced else None
            failed = 0
            for split in [args.split] if args.split else ["train", "val"]:
                problems, stats = _scan(args.dataset, root, split, quick=args.quick, reduce_zero_label=reduce)
                print("\n".join([*problems, _summary(args.dataset, split, stats, len(problems))]))
                failed += len(problems)
            if failed:
                raise SystemExit(f"{failed} problem(s) in {args.dataset} at {root}")
        else:
            print(f"{prepare_coco(args.root, overwrite=args.overwrite)} masks written to {Path(args.root) / 'masks'}")
    except DataError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
