"""data.py: label encodings on fixture trees with the official layouts, augmentation geometry and statistics,
the toy world, and one-line errors for bad input."""
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import ndimage

import data

TOY_COUNTS = {"train": 6, "val": 4, "synthetic_dense_fine": 4, "synthetic_dense_coarse": 4,
              "synthetic_sparse_fine": 4, "synthetic_sparse_coarse": 4}


def save(array, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path, **kwargs)
    return path


def blocks(height, width, values, block=8, seed=0):
    """(H, W) uint8 map of constant `block`-px squares with values drawn from `values`."""
    rng = np.random.default_rng(seed)
    grid = rng.choice(np.asarray(values, np.uint8), (math.ceil(height / block), math.ceil(width / block)))
    return np.kron(grid, np.ones((block, block), np.uint8))[:height, :width]


def run_cli(monkeypatch, capsys, *args):
    """Run `python data.py ARGS` in-process (no interpreter start-up): (exit status, stdout, stderr line)."""
    monkeypatch.setattr(sys, "argv", ["data.py", *args])
    try:
        data.main()
        status, message = 0, ""
    except SystemExit as exit_:
        # a string code is what Python prints to stderr (exit status 1): the user sees this line, no traceback
        status, message = (1, exit_.code) if isinstance(exit_.code, str) else (exit_.code or 0, "")
    return status, capsys.readouterr().out, message


# ---------------------------------------------------------------------------------------------------------------
# Registry and label encodings

def test_registry_sizes_and_coco_ids():
    assert {name: spec.num_classes for name, spec in data.DATASETS.items()} == {
        "toy": 7, "toy_lt": 12, "cityscapes": 19, "ade20k": 150, "coco": 81}
    for spec in data.DATASETS.values():
        assert len(spec.classes) == len(spec.palette) == spec.num_classes
        # every class has its own colour, except one pair in the ecosystem's ADE20K palette
        assert len(set(spec.palette)) >= spec.num_classes - (spec.name == "ade20k")
    coco = data.DATASETS["coco"]
    assert coco.classes[:3] == ("background", "person", "bicycle") and coco.classes[-1] == "toothbrush"
    assert coco.category_ids[0] == 0 and coco.category_ids[-1] == 90 and len(coco.category_ids) == 81
    assert list(coco.category_ids) == sorted(set(coco.category_ids))
    assert data.DATASETS["ade20k"].classes[:3] == ("wall", "building", "sky")
    assert data.DATASETS["ade20k"].reduce_zero_label and not data.DATASETS["cityscapes"].reduce_zero_label


def test_cityscapes_table_matches_torchvision():
    checked = 0
    for cls in torchvision.datasets.Cityscapes.classes:
        if cls.id < 0:  # license plate: not a value in the label files
            continue
        expected = cls.train_id if cls.train_id not in (-1, 255) else 255
        assert data.CITYSCAPES_LUT[cls.id] == expected, cls.name
        if expected != 255:
            assert data.CITYSCAPES_CLASSES[expected] == cls.name
        checked += 1
    assert checked == 34 and (data.CITYSCAPES_LUT[34:] == 255).all()


def make_cityscapes(root):
    """Official layout: two train cities (one with labelTrainIds), one val city, plus the other gtFine files."""
    ids = np.array([[7, 26, 0], [24, 23, 33]], np.uint8).repeat(8, 0).repeat(8, 1)  # (16, 24) labelIds
    files = [("train", "aachen", "aachen_000000_000019"), ("train", "bochum", "bochum_000000_000313"),
             ("val", "frankfurt", "frankfurt_000000_000294")]
    for split, city, stem in files:
        save(np.full((16, 24, 3), 90, np.uint8), root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        gt = root / "gtFine" / split / city
        save(ids, gt / f"{stem}_gtFine_labelIds.png")
        save(np.zeros((16, 24, 3), np.uint8), gt / f"{stem}_gtFine_color.png")
        save(ids.astype(np.uint16) * 1000, gt / f"{stem}_gtFine_instanceIds.png")
        (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
    save(data.CITYSCAPES_LUT[ids], root / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png")
    return ids


def test_cityscapes_layout_split_files_and_train_ids(tmp_path):
    ids = make_cityscapes(tmp_path)
    data.prepare_root("cityscapes", tmp_path)
    assert (tmp_path / "train.txt").read_text().splitlines() == [
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png "
        "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png",
        "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png "
        "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png"]
    expected = data.CITYSCAPES_LUT[ids]  # road 0, car 13, unlabeled 255, person 11, sky 10, bicycle 18
    assert sorted(np.unique(expected).tolist()) == [0, 10, 11, 13, 18, 255]
    for split in ("train", "val"):
        dataset = data.LabelledDataset("cityscapes", tmp_path, split, train=False)
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, 16, 24) and np.array_equal(label.numpy(), expected)
    assert data.check_dataset("cityscapes", tmp_path, "train") == []


def test_ade20k_zero_label_reduction_and_flag(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    raw = np.array([[0, 1, 150]], np.uint8).repeat(4, 0).repeat(4, 1)
    for folder, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
        save(np.full((4, 12, 3), 128, np.uint8), base / "images" / folder / f"{prefix}_00000001.jpg")
        save(raw, base / "annotations" / folder / f"{prefix}_00000001.png")
    (base / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n")
    data.prepare_root("ade20k", tmp_path)
    assert (tmp_path / "val.txt").read_text().split() == [
        "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg",
        "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png"]
    _, label = data.LabelledDataset("ade20k", tmp_path, "val", train=False)[0]
    assert label[0, ::4].tolist() == [255, 0, 149]
    # already reduced masks: values stay; raw masks wrongly flagged as reduced fail with the file named
    reduced = save(np.array([[255, 0, 149]], np.uint8), tmp_path / "reduced.png")
    assert data.load_label("ade20k", reduced, reduce_zero_label=False).tolist() == [[255, 0, 149]]
    label_file = base / "annotations/validation/ADE_val_00000001.png"
    with pytest.raises(data.DataError, match=f"{label_file}: label values \\[150\\]"):
        data.load_label("ade20k", label_file, reduce_zero_label=False)
    problems = data.check_dataset("ade20k", tmp_path, "val", reduce_zero_label=False)
    assert len(problems) == 1 and problems[0].startswith(str(label_file))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' numpy-2 notice
def test_prepare_coco_masks_from_tiny_instances_file(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pycocotools")
    images = [{"id": 9, "file_name": "000000000009.jpg", "height": 30, "width": 40},
              {"id": 25, "file_name": "000000000025.jpg", "height": 20, "width": 20}]
    crowd_rle = {"size": [30, 40], "counts": [0, 30 * 40]}  # uncompressed RLE covering the whole image
    annotations = [
        {"id": 1, "image_id": 9, "category_id": 1, "iscrowd": 1, "area": 1200.0, "bbox": [0, 0, 40, 30],
         "segmentation": crowd_rle},
        {"id": 2, "image_id": 9, "category_id": 1, "iscrowd": 0, "area": 100.0, "bbox": [0, 0, 10, 10],
         "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},
        {"id": 3, "image_id": 9, "category_id": 90, "iscrowd": 0, "area": 25.0, "bbox": [20, 20, 5, 5],
         "segmentation": [[20, 20, 25, 20, 25, 25, 20, 25]]},
        {"id": 4, "image_id": 25, "category_id": 3, "iscrowd": 0, "area": 36.0, "bbox": [2, 2, 6, 6],
         "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]]},
    ]
    categories = [{"id": cid, "name": name} for cid, name in zip(data.COCO_CATEGORY_IDS[1:], data.COCO_CLASSES[1:])]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/instances_train2017.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    for info in images:
        save(np.zeros((info["height"], info["width"], 3), np.uint8), tmp_path / "train2017" / info["file_name"])
    status, out, _ = run_cli(monkeypatch, capsys, "prepare-coco", "--root", str(tmp_path))
    assert status == 0 and out.startswith("2 masks written")
    mask = np.asarray(Image.open(tmp_path / "masks/000000000009.png"))
    assert mask.shape == (30, 40)
    assert mask[5, 5] == 1  # person instance drawn over the crowd region
    assert mask[22, 22] == 80  # COCO category 90 (toothbrush) is class 80
    assert mask[15, 35] == 255  # crowd
    other = np.asarray(Image.open(tmp_path / "masks/000000000025.png"))
    assert other[5, 5] == 3 and other[15, 15] == 0  # car (category 3) on background
    data.prepare_root("coco", tmp_path)
    assert (tmp_path / "train.txt").read_text().splitlines()[0] == "train2017/000000000009.jpg masks/000000000009.png"
    assert data.check_dataset("coco", tmp_path, "train") == []
    (tmp_path / "annotations/instances_train2017.json").write_text("{not json")
    status, _, message = run_cli(monkeypatch, capsys, "prepare-coco", "--root", str(tmp_path), "--overwrite")
    assert status == 1 and "\n" not in message
    assert message.startswith(f"error: {tmp_path / 'annotations/instances_train2017.json'}: not a COCO instances file")


def test_read_split_paths_and_errors(tmp_path):
    split = tmp_path / "lists" / "s.txt"
    split.parent.mkdir()
    split.write_text("# comment\n\na.png b.png\n/abs/c.jpg\n")
    assert data.read_split(split) == [(tmp_path / "lists/a.png", tmp_path / "lists/b.png"),
                                      (Path("/abs/c.jpg"), None)]
    split.write_text("a.png b.png c.png\n")
    with pytest.raises(data.DataError, match=f"{split}:1: expected 'image \\[label\\]'"):
        data.read_split(split)
    with pytest.raises(data.DataError, match="missing.txt: split file not found"):
        data.read_split(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------------------------------
# Augmentation

def test_resized_region_equals_resize_then_crop():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    label = Image.fromarray(blocks(60, 80, range(10), block=3))
    for width, height, left, top in [(123, 91, 17, 5), (41, 31, 3, 2), (157, 118, 0, 50)]:
        crop = data._Crop(width, height, left, top, min(32, width - left), min(32, height - top), False, 32)
        box = (left, top, left + crop.valid_w, top + crop.valid_h)
        full = np.asarray(image.resize((width, height), Image.BILINEAR).crop(box)).astype(int)
        difference = np.abs(np.asarray(data._resized_region(image, crop, Image.BILINEAR)).astype(int) - full)
        assert difference.max() <= 2 and difference.mean() < 0.3  # rounding of PIL's 8-bit intermediate pass
        same = np.asarray(data._resized_region(label, crop, Image.NEAREST)) == np.asarray(
            label.resize((width, height), Image.NEAREST).crop(box))
        assert same.mean() > 0.95  # a few exact ties between source pixels round the other way


def test_labelled_views_share_geometry_and_keep_label_values(tmp_path):
    label = blocks(48, 64, [0, 1, 2, 3, 6, 255], block=16)
    colours = np.array(data.TOY_PALETTE + ((255, 255, 255),) * (256 - 7), np.uint8)
    save(colours[label], tmp_path / "images/train/000000.png")
    save(label, tmp_path / "labels/train/000000.png")
    (tmp_path / "train.txt").write_text("images/train/000000.png labels/train/000000.png\n")
    (tmp_path / "toy.json").write_text(json.dumps({"version": data.TOY_VERSION}))
    dataset = data.LabelledDataset("toy", tmp_path, "train", crop_size=64, patch_size=8)
    torch.manual_seed(0)
    for _ in range(12):
        image, target = dataset[0]
        assert image.shape == (3, 64, 64) and target.shape == (64, 64) and target.dtype == torch.int64
        assert set(target.unique().tolist()) <= {0, 1, 2, 3, 6, 255}  # nearest resizing invents no value
        pixels = data.denormalize(image).astype(int)  # (64, 64, 3)
        values = target.numpy()
        # block interiors (5×5 neighbourhood of one label): away from the bilinear blend at block edges
        interior = (ndimage.minimum_filter(values, 5) == ndimage.maximum_filter(values, 5)) & (values != 255)
        match = np.abs(pixels - colours[values].astype(int)).max(-1) <= 3
        assert interior.sum() > 100 and match[interior].mean() > 0.98  # image and label moved together


def test_padding_is_ignore_in_labels_and_masks(tmp_path):
    save(np.full((10, 14, 3), 200, np.uint8), tmp_path / "synthetic/a.png")
    save(np.full((10, 14), 4, np.uint8), tmp_path / "synthetic_truth/a.png")
    dataset = data.SyntheticDataset(tmp_path / "synthetic", crop_size=32, patch_size=8, with_truth=True)
    torch.manual_seed(1)
    for _ in range(8):
        image_w, image_s, ignore_mask, box, truth = dataset[0]  # 10×14 scaled ≤ 2× never fills 32×32
        assert ignore_mask.any() and (~ignore_mask).any()
        assert torch.equal(ignore_mask, truth == 255) and (truth[~ignore_mask] == 4).all()
        padded = torch.tensor(data.IMAGENET_MEAN) / torch.tensor(data.IMAGENET_STD)
        assert torch.allclose(image_w[:, ignore_mask].T, -padded.expand(int(ignore_mask.sum()), 3), atol=1e-5)
        assert box.dtype == torch.bool and image_s.shape == (3, 32, 32)


def test_weak_and_strong_views_share_geometry(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    save(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), tmp_path / "x.png")
    dataset = data.SyntheticDataset(tmp_path, crop_size=48, patch_size=8)
    monkeypatch.setattr(data, "_strong_colour", lambda region: region)  # geometry only
    torch.manual_seed(0)
    for _ in range(6):
        image_w, image_s, _, _ = dataset[0]
        assert torch.equal(image_w, image_s)
    monkeypatch.undo()
    torch.manual_seed(0)
    first = [dataset[0] for _ in range(3)]
    torch.manual_seed(0)
    again = [dataset[0] for _ in range(3)]
    assert all(torch.equal(a, b) for x, y in zip(first, again) for a, b in zip(x, y))  # torch RNG only


def test_training_sets_decode_each_file_once_while_it_fits(tmp_path, monkeypatch):
    # The decoded files a dataset keeps give the same items as decoding again; past DECODED_KEEP_BYTES nothing more
    # is kept (each read decodes anew)
    rng = np.random.default_rng(4)
    for name in ("a", "b"):
        save(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), tmp_path / f"{name}.png")
    opened = []
    real_open = data._open_image
    monkeypatch.setattr(data, "_open_image", lambda path: opened.append(path.name) or real_open(path))
    dataset = data.SyntheticDataset(tmp_path, crop_size=32, patch_size=8)
    torch.manual_seed(0)
    kept = [dataset[i % 2] for i in range(6)]
    assert sorted(opened) == ["a.png", "b.png"]  # decoded once each
    monkeypatch.setattr(data, "DECODED_KEEP_BYTES", 40 * 40 * 3)  # room for one file
    fresh = data.SyntheticDataset(tmp_path, crop_size=32, patch_size=8)
    opened.clear()
    torch.manual_seed(0)
    again = [fresh[i % 2] for i in range(6)]
    assert opened == ["a.png", "b.png", "b.png", "b.png"]  # a kept, b decoded at every read
    assert all(torch.equal(x, y) for first, second in zip(kept, again) for x, y in zip(first, second))


def test_colour_table_matches_torchvision_ops():
    rng = np.random.default_rng(0)
    image = Image.fromarray(np.clip(rng.normal(120, 60, (64, 64, 3)), 0, 255).astype(np.uint8))
    ops = [("contrast", 1.4), ("hue", 0.2), ("brightness", 0.7), ("saturation", 1.5), ("grayscale", 0.0)]
    for count in (4, 5):
        reference = image
        for name, factor in ops[:count]:
            reference = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
                         "saturation": TF.adjust_saturation, "hue": TF.adjust_hue,
                         "grayscale": lambda im, _: TF.rgb_to_grayscale(im, 3)}[name](reference, factor)
        ours = image.filter(data._colour_table(ops[:count], image))
        difference = np.abs(np.asarray(ours).astype(float) - np.asarray(reference).astype(float))
        assert difference.mean() < 2.0 and np.percentile(difference, 99) < 12


def test_cutmix_box_statistics():
    torch.manual_seed(0)
    size, draws = 96, 2000
    boxes = [data.cutmix_box(size) for _ in range(draws)]
    nonempty = [box for box in boxes if box.any()]
    assert abs(len(nonempty) / draws - data.CUTMIX_P) < 0.04
    areas, aspects = [], []
    for box in nonempty:
        rows, cols = box.any(1).nonzero().squeeze(1), box.any(0).nonzero().squeeze(1)
        height, width = len(rows), len(cols)
        assert box.sum() == height * width  # one solid rectangle
        areas.append(height * width / size ** 2)
        aspects.append(height / width)
    assert 0.015 < min(areas) and max(areas) <= 0.4
    assert abs(np.mean(areas) - 0.21) < 0.03  # uniform area fraction in [0.02, 0.4] (rounding down a little)
    assert 0.27 < min(aspects) and max(aspects) < 3.7


def test_normalisation_constants_and_inverse():
    assert data.IMAGENET_MEAN == (0.485, 0.456, 0.406) and data.IMAGENET_STD == (0.229, 0.224, 0.225)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = TF.normalize(TF.to_tensor(pixels), data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert torch.allclose(data._image_tensor(Image.fromarray(pixels), None), expected, atol=1e-5)
    assert np.array_equal(data.denormalize(expected), pixels)
    assert data.denormalize(expected[None]).shape == (1, 5, 7, 3)


def test_crop_must_be_multiple_of_patch(tmp_path):
    with pytest.raises(data.DataError, match="--crop-size 97: must be a positive multiple of .* patch size 8"):
        data.SyntheticDataset(tmp_path, crop_size=97, patch_size=8)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic sources

def test_synthetic_sources_folder_split_manifest(tmp_path):
    for name in ("a/1.png", "a/b/2.jpg", "3.png"):
        save(np.zeros((8, 8, 3), np.uint8), tmp_path / "gen" / name)
    (tmp_path / "gen/notes.txt").write_text("not an image")
    assert [p.name for p in data.synthetic_images(tmp_path / "gen")] == ["3.png", "1.png", "2.jpg"]
    manifest = tmp_path / "gen/manifest.jsonl"
    manifest.write_text('{"file": "a/1.png", "prompt": "x"}\n{"file": "3.png"}\n')
    assert data.synthetic_images(manifest) == [tmp_path / "gen/a/1.png", tmp_path / "gen/3.png"]
    (tmp_path / "syn.txt").write_text("gen/3.png\n")
    assert data.synthetic_images(tmp_path / "syn.txt") == [tmp_path / "gen/3.png"]
    manifest.write_text('{"file": "a/1.png"}\n{"prompt": "no file"}\n')
    with pytest.raises(data.DataError, match=f"{manifest}:2: expected a JSON object with a 'file' key"):
        data.synthetic_images(manifest)
    with pytest.raises(data.DataError, match="nowhere: synthetic source not found"):
        data.synthetic_images(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------------
# The toy world

def test_toy_scene_deterministic_and_knobs_act():
    def scenes(split, count=12):
        return [data.render_toy_scene(np.random.default_rng([5, i]), data.TOY_SPLITS[split]) for i in range(count)]

    first, again = scenes("train", 3), scenes("train", 3)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    things = {split: np.mean([(label >= data.TOY_NUM_STUFF).mean() for _, label in scenes(split)])
              for split in ("synthetic_dense_fine", "synthetic_sparse_fine")}
    assert things["synthetic_dense_fine"] > 2 * things["synthetic_sparse_fine"]

    def high_frequency(split):  # mean |horizontal gradient| of the gray image
        return np.mean([np.abs(np.diff(image.astype(float).mean(-1), axis=1)).mean() for image, _ in scenes(split)])

    assert high_frequency("synthetic_dense_fine") > 1.5 * high_frequency("synthetic_dense_coarse")


def test_toy_things_have_any_hue_while_stuff_keeps_its_own():
    """A thing is known by its shape and texture, not its hue (so the strong view's hue jitter leaves it what it is):
    the hues of each thing class spread round the circle (mean resultant length near 0) while each stuff class keeps
    one hue (near 1)."""
    scenes = [data.render_toy_scene(np.random.default_rng([9, i]), data.TOY_SPLITS["train"]) for i in range(40)]
    hsv = np.concatenate([np.asarray(Image.fromarray(image).convert("HSV")).reshape(-1, 3) for image, _ in scenes])
    labels = np.concatenate([label.ravel() for _, label in scenes])
    angle = hsv[:, 0].astype(float) / 256 * 2 * np.pi
    coloured = hsv[:, 1] > 60  # hue is meaningless on grey pixels (white bands, road)
    resultant = [np.abs(np.exp(1j * angle[(labels == k) & coloured]).mean()) for k in range(len(data.TOY_CLASSES))]
    assert min(resultant[0], resultant[1]) > 0.9  # sky, grass (the road is grey)
    assert max(resultant[data.TOY_NUM_STUFF:]) < 0.35


def test_toy_synthetic_splits_are_subsets_of_the_pools():
    pools = {split: [f"{split}/{i}" for i in range(knobs.count)] for split, knobs in data.TOY_SPLITS.items()}
    n = len(pools["train"])
    splits = data.toy_synthetic_splits(pools)
    assert splits["synthetic"] == splits["synthetic_dense_fine"] == pools["synthetic_dense_fine"][:2 * n]
    assert all(len(splits[kind]) == 2 * n for kind in pools if kind.startswith("synthetic_"))  # matched sizes
    assert [len(splits[f"synthetic_x{m}"]) for m in data.TOY_SCALES] == [m * n for m in data.TOY_SCALES]
    pool = splits["synthetic_pool"]
    assert len(pool) == 4 * (n // 2) and len(set(pool)) == len(pool)
    assert {line.split("/")[0] for line in pool} == {kind for kind in pools if kind.startswith("synthetic_")}


def test_pretraining_world_has_its_own_classes_in_any_colour():
    scenes = [data.render_pretrain_scene(np.random.default_rng([3, i]), 48) for i in range(40)]
    labels = np.stack([label for _, label in scenes])
    assert set(np.unique(labels)) == set(range(len(data.PRETRAIN_CLASSES)))  # every class appears
    assert not set(data.PRETRAIN_CLASSES) & (set(data.TOY_CLASSES) | set(data.TOY_LT_CLASSES))
    again = data.render_pretrain_scene(np.random.default_rng([3, 0]), 48)
    assert np.array_equal(again[0], scenes[0][0]) and np.array_equal(again[1], scenes[0][1])


def test_toy_world_files_preview_and_check(tmp_path, monkeypatch):
    small = {split: dataclasses.replace(knobs, count=TOY_COUNTS[split]) for split, knobs in data.TOY_SPLITS.items()}
    monkeypatch.setattr(data, "TOY_SPLITS", small)
    root = data.prepare_root("toy", tmp_path / "toy")  # generated on first use
    for split in [*TOY_COUNTS, "synthetic"]:
        assert (root / f"{split}.txt").is_file()
    assert data.read_split(root / "synthetic.txt") == data.read_split(root / "synthetic_dense_fine.txt")
    image, label = data.read_split(root / "train.txt")[0]
    assert label is not None and data.load_image(image).shape == (data.TOY_SIZE, data.TOY_SIZE, 3)
    synthetic = data.read_split(root / "synthetic_sparse_coarse.txt")
    assert all(label is None and data.truth_path(image).is_file() for image, label in synthetic)
    dataset = data.SyntheticDataset(root / "synthetic.txt", crop_size=96, patch_size=8, with_truth=True)
    assert len(dataset[0]) == 5 and (dataset[0][4] != 255).any()
    other = data.make_toy_world(tmp_path / "again", counts=TOY_COUNTS)
    for name in ("images/train/000001.jpg", "synthetic_truth/dense_coarse/000002.png", "val.txt"):
        assert (root / name).read_bytes() == (other / name).read_bytes()  # deterministic from the seed
    preview = data.toy_preview(root, tmp_path / "preview.png")
    assert Image.open(preview).size == (8 * data.TOY_SIZE, 5 * data.TOY_SIZE)
    assert data.check_dataset("toy", root, "val") == [] and data.check_dataset("toy", root, "synthetic") == []


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file

def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(data.DataError, match=f"{tmp_path / 'none'}: cityscapes root not found"):
        data.prepare_root("cityscapes", tmp_path / "none")
    with pytest.raises(data.DataError, match="--dataset 'voc': unknown"):
        data.get_spec("voc")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(data.DataError, match=f"{broken}: unreadable image"):
        data.load_image(broken)
    colour = save(np.zeros((4, 4, 3), np.uint8), tmp_path / "x_gtFine_color.png")
    with pytest.raises(data.DataError, match=f"{colour}: label must be a one-channel image"):
        data.load_label("cityscapes", colour)
    wide = save(np.full((4, 4), 300, np.uint16), tmp_path / "wide.png")
    with pytest.raises(data.DataError, match=f"{wide}: label values 300..300 do not fit 8 bits"):
        data.load_label("coco", wide)
    trainids = save(np.full((4, 4), 26, np.uint8), tmp_path / "a_gtFine_labelTrainIds.png")
    with pytest.raises(data.DataError, match=f"{trainids}: label values \\[26\\] >= 19 classes of cityscapes"):
        data.load_label("cityscapes", trainids)


def test_check_cli_reports_each_problem_on_one_line(tmp_path, monkeypatch, capsys):
    make_cityscapes(tmp_path)
    data.prepare_root("cityscapes", tmp_path)
    aachen = tmp_path / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    aachen.write_bytes(b"garbage")
    bochum_label = tmp_path / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png"
    save(np.full((16, 20), 3, np.uint8), bochum_label)  # wrong size
    val_label = tmp_path / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
    val_label.unlink()
    quick = data.check_dataset("cityscapes", tmp_path, "val", quick=True)
    assert quick == [f"{val_label}: missing (listed in {tmp_path / 'val.txt'})"]
    status, out, message = run_cli(monkeypatch, capsys, "check", "--dataset", "cityscapes", "--root", str(tmp_path))
    assert status == 1
    lines = [line for line in out.splitlines() if line.startswith(str(tmp_path))]  # problems; summaries follow
    assert len(lines) == 3
    assert lines[0].startswith(f"{aachen}: unreadable image")
    assert lines[1].startswith(f"{bochum_label}: label is 20×16 but")
    assert lines[2].startswith(f"{val_label}: missing")
    assert message == f"3 problem(s) in cityscapes at {tmp_path}"
    with pytest.raises(data.DataError, match=f"{aachen}: unreadable image"):
        data.LabelledDataset("cityscapes", tmp_path, "train", crop_size=28)[0]


def test_strong_view_matches_its_torchvision_twin():
    # The fast strong view (one colour table) against the readable one (torchvision's ops one by one), with the same
    # random draws: about one gray level apart on average, on every draw (grayscale alone and no-op draws exactly).
    rng = np.random.default_rng(1)
    image, _ = data.render_toy_scene(rng, data.TOY_SPLITS["train"])
    region = Image.fromarray(image)
    differences = []
    for seed in range(24):
        torch.manual_seed(seed)
        fast = np.asarray(data._strong_colour(region)).astype(float)
        torch.manual_seed(seed)
        ops, _ = data._strong_draws()
        torch.manual_seed(seed)
        reference = np.asarray(data.strong_colour_reference(region)).astype(float)
        difference = np.abs(fast - reference)
        if not ops:
            assert difference.max() == 0
        differences.append(difference.mean())
        assert difference.mean() < 2.5 and np.percentile(difference, 99) < 10, (seed, ops)
    assert np.mean(differences) < 1.6  # 1.34 on these 24 draws


def test_strong_view_of_a_small_crop_is_the_exact_chain():
    # A crop with fewer pixels than the colour table's lattice takes the ops on its own pixels (the table's own
    # chain, without the table): as near the torchvision twin as the table is on the 128 x 128 image above.
    rng = np.random.default_rng(2)
    image, _ = data.render_toy_scene(rng, data.TOY_SPLITS["train"])
    region = Image.fromarray(image).crop((10, 20, 74, 84))  # 64 x 64 = 4096 pixels < 17³
    assert region.width * region.height <= data.COLOUR_TABLE_SIZE ** 3
    differences = []
    for seed in range(24):
        torch.manual_seed(seed)
        fast = np.asarray(data._strong_colour(region)).astype(float)
        torch.manual_seed(seed)
        reference = np.asarray(data.strong_colour_reference(region)).astype(float)
        differences.append(np.abs(fast - reference).mean())
        assert differences[-1] < 2.5 and np.percentile(np.abs(fast - reference), 99) < 10, seed
    assert np.mean(differences) < 1.6  # 1.33 on these 24 draws (PIL rounds every op to 8 bits, the chain once)


def test_check_lists_every_planted_fault_once_then_the_summary(tmp_path, monkeypatch, capsys):
    """A value 40 in a trainIds file, an image without a label, an image that is not a PNG: each named once, in one
    pass (the missing label used to stop the scan, and was printed once per split)."""
    values = np.array([[7, 26], [24, 0]], np.uint8).repeat(8, 0).repeat(8, 1)  # (16, 16) labelIds
    stems = {"aachen": "aachen_000001_000019", "bochum": "bochum_000002_000019", "bremen": "bremen_000003_000019",
             "dresden": "dresden_000004_000019"}
    for city, stem in stems.items():
        save(np.full((16, 16, 3), 90, np.uint8), tmp_path / "leftImg8bit/train" / city / f"{stem}_leftImg8bit.png")
        if city != "bochum":
            save(values, tmp_path / "gtFine/train" / city / f"{stem}_gtFine_labelIds.png")
    frankfurt = "frankfurt/frankfurt_000000_000294"
    save(np.full((16, 16, 3), 90, np.uint8), tmp_path / f"leftImg8bit/val/{frankfurt}_leftImg8bit.png")
    save(values, tmp_path / f"gtFine/val/{frankfurt}_gtFine_labelIds.png")
    train_ids = data.CITYSCAPES_LUT[values].copy()
    train_ids[0, 0] = 40
    save(train_ids, tmp_path / "gtFine/train/aachen" / f"{stems['aachen']}_gtFine_labelTrainIds.png")
    (tmp_path / "leftImg8bit/train/bremen" / f"{stems['bremen']}_leftImg8bit.png").write_text("this is not a PNG")
    status, out, message = run_cli(monkeypatch, capsys, "check", "--dataset", "cityscapes", "--root", str(tmp_path))
    assert status == 1 and message == f"3 problem(s) in cityscapes at {tmp_path}"
    lines = out.strip().splitlines()
    for fault, stem in (("label values [40] >= 19", "aachen_000001"), ("no label, expected", "bochum_000002"),
                        ("unreadable image", "bremen_000003")):
        named = [line for line in lines if stem in line]
        assert len(named) == 1 and fault in named[0], (stem, lines)
    assert not any("dresden" in line or "frankfurt" in line for line in lines)  # the healthy samples
    assert lines[3].startswith("cityscapes train: 4 images, 3 labelled, 4 decoded, 3 problem(s)")
    assert any(line.startswith("cityscapes val: 1 images, 1 labelled, 1 decoded, 0 problem(s)") for line in lines)
    assert not (tmp_path / "train.txt").exists() and (tmp_path / "val.txt").is_file()  # no split with a hole
    with pytest.raises(data.DataError, match="bochum_000002_000019_leftImg8bit.png: no label"):
        data.prepare_root("cityscapes", tmp_path)  # what training says: the first, and where to see them all


def test_check_reports_every_bad_split_line(tmp_path):
    save(np.zeros((8, 8, 3), np.uint8), tmp_path / "a.png")
    save(np.zeros((8, 8), np.uint8), tmp_path / "a_label.png")
    (tmp_path / "toy.json").write_text(json.dumps({"version": data.TOY_VERSION}))
    split = tmp_path / "train.txt"
    split.write_text("a.png a_label.png\n\na.png a_label.png\nb.png c.png d.png\n")
    assert data.check_dataset("toy", tmp_path, "train") == [
        f"{split}:3: a.png is listed again (first on line 1)", f"{split}:4: expected 'image [label]', got 3 fields"]
    with pytest.raises(data.DataError, match=f"{split}:3: a.png is listed again .*\\(2 bad lines"):
        data.read_split(split)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"file": "a.png"}\n{"file": "a.png"}\n')
    with pytest.raises(data.DataError, match=f"{manifest}:2: .*a.png is listed again \\(first on line 1\\)"):
        data.synthetic_images(manifest)


def test_labels_that_would_be_changed_quietly_are_refused(tmp_path):
    not_ids = save(np.array([[7, 40]], np.uint8), tmp_path / "x_gtFine_labelIds.png")  # 40: no Cityscapes id
    with pytest.raises(data.DataError, match=f"{not_ids}: label values \\[40\\] are not Cityscapes label ids"):
        data.load_label("cityscapes", not_ids)
    fractions = tmp_path / "float.tif"
    Image.fromarray(np.array([[1.0, 2.5]], np.float32)).save(fractions)  # mode F: 2.5 would become 2
    with pytest.raises(data.DataError, match=f"{fractions}: label values are not whole numbers"):
        data.load_label("toy", fractions)
    whole = tmp_path / "whole.tif"
    Image.fromarray(np.array([[1.0, 2.0]], np.float32)).save(whole)
    assert data.load_label("toy", whole).tolist() == [[1, 2]]


def test_synthetic_set_with_a_missing_listed_image_fails_at_start(tmp_path):
    save(np.zeros((8, 8, 3), np.uint8), tmp_path / "gen/1.png")
    (tmp_path / "syn.txt").write_text("gen/1.png\ngen/2.png\ngen/3.png\n")
    with pytest.raises(data.DataError, match=f"{tmp_path / 'gen/2.png'}: missing \\(2 of the 3 images of"):
        data.SyntheticDataset(tmp_path / "syn.txt", crop_size=8, patch_size=8)


def test_long_tailed_world_has_its_classes_and_a_long_tail(tmp_path):
    counts = {"train": 2, "val": 80, **{split: 1 for split in data.TOY_SPLITS if data.TOY_SPLITS[split].synthetic}}
    root = data.make_toy_world(tmp_path / "lt", counts=counts, world="toy_lt")
    assert data.toy_world_exists(root, "toy_lt") and not data.toy_world_exists(root, "toy")
    with pytest.raises(data.DataError, match="another toy world"):
        data.prepare_root("toy", root)
    assert data.thing_classes("toy_lt") == data.TOY_LT_CLASSES[4:]
    pixels = np.zeros(len(data.TOY_LT_CLASSES))
    for _, label_file in data.read_split(root / "val.txt"):
        label = data.load_label("toy_lt", label_file)
        pixels += np.bincount(label.ravel(), minlength=256)[:len(pixels)]
    share = pixels / pixels.sum()
    assert (share > 0).all()  # every class is drawn
    things = share[data.TOY_LT_NUM_STUFF:]
    assert things[0] > 5 * things[-1] and share.max() > 20 * share.min()  # a long tail: few classes hold most pixels
    assert share.min() < 0.02


def test_balanced_world_is_what_the_default_draws():
    knobs = data.TOY_SPLITS["synthetic_dense_fine"]
    image, label = data.render_toy_scene(np.random.default_rng(3), knobs)
    image_toy, label_toy = data.render_toy_scene(np.random.default_rng(3), knobs, world=data.TOY_WORLDS["toy"])
    assert np.array_equal(image, image_toy) and np.array_equal(label, label_toy) and label.max() < 7
    _, label_lt = data.render_toy_scene(np.random.default_rng(3), knobs, world=data.TOY_WORLDS["toy_lt"])
    assert label_lt.max() < 12
