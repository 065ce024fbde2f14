"""quality.py: GLCM and grey conversion against scikit-image and PIL, compression ratio under blur, connected
components against scipy, the density/fidelity ordering of the toy world's synthetic splits, and the CLI."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import ndimage
from skimage import data as skdata
from skimage.feature import graycomatrix, graycoprops

import data
import model
import quality

ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run on one intra-op thread: on a shared 2-core machine a second thread mostly waits for a core
    (measured 10x slower under load). test_glcm_thread_pool_matches_serial covers the threaded path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(images: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, H, W) or (B, H, W) uint8 tensor from same-size HWC / HW arrays."""
    stacked = torch.from_numpy(np.stack(images))
    return stacked.permute(0, 3, 1, 2).contiguous() if stacked.dim() == 4 else stacked


def _check_against_skimage(images: torch.Tensor, levels: int, distances, angles) -> None:
    grey = quality.to_grey(images).numpy()
    if levels < 256:  # the quantisation glcm_features states: floor(g * L / 256)
        grey = (grey.astype(np.int32) * levels >> 8).astype(np.uint8)
    counts = quality.glcm_counts(images, levels, distances, angles)  # (B, D, A, L, L)
    features = quality.glcm_features(images, levels, distances, angles)
    for b, image in enumerate(grey):
        reference = graycomatrix(image, distances, angles, levels=levels)  # (L, L, D, A)
        assert np.array_equal(counts[b].permute(2, 3, 0, 1).numpy(), reference)
        normed = graycomatrix(image, distances, angles, levels=levels, symmetric=True, normed=True)
        for name in quality.GLCM_STATS:
            assert features[name][b].item() == pytest.approx(graycoprops(normed, name).mean(), abs=1e-6), name
        # entropy also straight from scikit-image's matrix, not only through graycoprops
        entropy = -(normed * np.log(np.where(normed > 0, normed, 1))).sum((0, 1)).mean()
        assert features["entropy"][b].item() == pytest.approx(entropy, abs=1e-6)


def test_grey_is_pil_luma():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 31, 47, 3), dtype=np.uint8)
    rgb[1, :8, :8] = 255  # the top of the range rounds correctly too
    grey = quality.to_grey(_batch(list(rgb))).numpy()
    for image, ours in zip(rgb, grey):
        assert np.array_equal(ours, np.asarray(Image.fromarray(image).convert("L")))
    photo = skdata.astronaut()
    assert np.array_equal(quality.to_grey(_batch([photo]))[0].numpy(), np.asarray(Image.fromarray(photo).convert("L")))


@pytest.mark.parametrize("levels, distances, angles", [
    (256, (1,), ANGLES),
    (16, (1, 3), ANGLES + (math.pi,)),
    (8, (100,), (0.0, math.pi / 2)),  # offset longer than the image: empty matrices, correlation 1
])
def test_glcm_matches_skimage_on_random_images(levels, distances, angles):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 37, 53, 3), dtype=np.uint8)
    images[1] = 77  # a constant image: zero standard deviation
    images[2] = np.repeat(rng.integers(0, 256, (37, 1, 1), dtype=np.uint8), 53, 1)  # constant rows
    _check_against_skimage(_batch(list(images)), levels, distances, angles)
    grey = rng.integers(0, 256, (2, 20, 30), dtype=np.uint8)  # (B, H, W) grey input path
    _check_against_skimage(_batch(list(grey)), levels, distances, angles)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "camera"])
def test_glcm_matches_skimage_on_photographs(name):
    photo = getattr(skdata, name)()  # bundled with scikit-image, no download
    _check_against_skimage(_batch([photo]), 256, (1,), ANGLES)


def test_glcm_thread_pool_matches_serial(monkeypatch):
    images = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (3, 3, 40, 50), dtype=np.uint8))
    serial = quality.glcm_counts(images)
    monkeypatch.setattr(quality, "PAIRS_PER_TASK", 4000)  # two (image, offset) units per bincount call
    monkeypatch.setattr(quality, "CHUNK_PIXELS", 4000)  # two images per chunk
    serial_features = quality.glcm_features(images)
    torch.set_num_threads(2)
    assert torch.equal(quality.glcm_counts(images), serial)
    for name, value in quality.glcm_features(images).items():  # statistics in two groups of matrices
        torch.testing.assert_close(value, serial_features[name], rtol=1e-12, atol=1e-12)


def test_compression_ratio_falls_under_blur():
    photo = Image.fromarray(skdata.astronaut())
    blurred = [np.asarray(photo.filter(ImageFilter.GaussianBlur(sigma))) for sigma in (0, 1, 2, 4)]
    ratio = quality.compression_ratio(_batch(blurred))
    assert ratio.shape == (4,)
    assert (ratio[1:] < ratio[:-1]).all() and 0 < ratio[-1] and ratio[0] < 1
    grey = quality.compression_ratio(quality.to_grey(_batch(blurred)))
    assert (grey[1:] < grey[:-1]).all()
    # the GLCM agrees: blurring lowers the contrast
    contrast = quality.glcm_features(_batch(blurred))["contrast"]
    assert (contrast[1:] < contrast[:-1]).all()


@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_match_scipy(connectivity):
    rng = np.random.default_rng(2)
    label = rng.integers(0, 4, (3, 29, 41))
    label[1] = ndimage.zoom(rng.integers(0, 4, (4, 6)), (29 / 4, 41 / 6), order=0)[:29, :41]  # large regions
    label[rng.random(label.shape) < 0.1] = 255
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    component = quality.connected_components(torch.from_numpy(label), connectivity).numpy()
    for min_area in (1, 4):
        counts = quality.count_instances(torch.from_numpy(label), min_area, connectivity)
        for b in range(label.shape[0]):
            instances, classes = 0, 0
            for k in range(4):
                regions, n = ndimage.label(label[b] == k, structure)
                area = np.bincount(regions.ravel())[1:]
                instances += int((area >= min_area).sum())
                classes += int((area >= min_area).any())
                if min_area == 1 and n:  # same partition: scipy's regions and ours map one to one
                    inside = regions > 0
                    pairs = set(zip(regions[inside].tolist(), component[b][inside].tolist()))
                    assert len(pairs) == n == len(np.unique(component[b][inside]))
            assert counts["instances"][b].item() == instances
            assert counts["classes"][b].item() == classes
    assert (component[label == 255] == -1).all()


def test_toy_dense_and_fine_splits_score_higher():
    """Density and fidelity measured on the images (and, for density, on their true layouts standing in for
    a trained teacher's prediction), not read from the generator's settings. The scenes are rendered in memory
    with the toy world's own generator and seeds (the files data.py writes hold the same scenes as JPEG)."""
    n = 8
    splits = list(data.TOY_SPLITS)
    scores = {}
    for density in ("sparse", "dense"):
        for fidelity in ("coarse", "fine"):
            split = f"synthetic_{density}_{fidelity}"
            scenes = [data.render_toy_scene(np.random.default_rng([data.TOY_SEED, splits.index(split), i]),
                                            data.TOY_SPLITS[split]) for i in range(n)]
            images = _batch([image for image, _ in scenes])  # (n, 3, S, S)
            layouts = torch.from_numpy(np.stack([layout for _, layout in scenes]))  # (n, S, S)
            scores[density, fidelity] = {
                "instances": quality.count_instances(layouts, min_area=4)["instances"].double().mean().item(),
                "contrast": quality.glcm_features(images)["contrast"].mean().item(),
                "compression": quality.compression_ratio(images).mean().item(),
            }
    for fidelity in ("coarse", "fine"):
        assert scores["dense", fidelity]["instances"] > scores["sparse", fidelity]["instances"]
    for density in ("sparse", "dense"):
        for metric in ("contrast", "compression"):
            assert scores[density, "fine"][metric] > scores[density, "coarse"][metric], (density, metric)


def test_cli_score_select_ladder(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "images"
    folder.mkdir()
    smooth = ndimage.zoom(rng.integers(0, 256, (4, 6, 3)), (12, 12, 1), order=1).astype(np.uint8)  # (48, 72, 3)
    for i in range(4):  # images 0..3 carry more and more noise: rising fidelity scores
        noise = rng.normal(0, 16 * i, smooth.shape)
        Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    teacher = model.build_model("dpt", "toy", 3, pretrained=False)
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": teacher.state_dict(), "ema": teacher.state_dict(), "step": 0,
                "args": {"dataset": "toy", "arch": "dpt", "backbone": "toy", "num_classes": 3}}, checkpoint)

    quality.main(["score", "--images", str(folder), "--teacher", str(checkpoint), "--out", str(tmp_path / "s.csv")])
    rows = quality.read_scores(tmp_path / "s.csv")
    assert len(rows) == 4 and all(row["instances"] >= 1 and 1 <= row["classes"] <= 3 for row in rows)

    quality.main(["select", "--scores", str(tmp_path / "s.csv"), "--by", "fidelity", "--top", "0.25",
                  "--out", str(tmp_path / "split" / "fine.txt"), "--sheet", str(tmp_path / "sheet.png")])
    chosen = data.read_split(tmp_path / "split" / "fine.txt")
    assert [path.resolve().name for path, _ in chosen] == ["3.png"]
    assert Image.open(tmp_path / "sheet.png").size[1] > 0

    quality.main(["ladder", "--scores", str(tmp_path / "s.csv"), "--out-dir", str(tmp_path / "ladder")])
    splits = {name: data.read_split(tmp_path / "ladder" / f"{name}.txt") for name in quality.LADDER_SPLITS}
    assert all(len(split) == 1 for split in splits.values())
    assert len({path.resolve() for split in splits.values() for path, _ in split}) == 4
    by_name = {Path(row["image"]).name: row for row in rows}
    picked = {name: by_name[split[0][0].resolve().name] for name, split in splits.items()}
    for half in ("sparse", "dense"):  # fine = the noisier image of its half (higher contrast)
        assert picked[f"{half}_fine"]["contrast"] > picked[f"{half}_coarse"]["contrast"]
    assert min(picked["dense_coarse"]["instances"], picked["dense_fine"]["instances"]) >= max(
        picked["sparse_coarse"]["instances"], picked["sparse_fine"]["instances"])

    for seed in (0, 0, 1):  # the control of a selection: a seeded random subset of the same size
        quality.main(["select", "--scores", str(tmp_path / "s.csv"), "--by", "random", "--top", "0.5",
                      "--seed", str(seed), "--out", str(tmp_path / f"random{seed}.txt")])
    drawn = [data.read_split(tmp_path / f"random{seed}.txt") for seed in (0, 1)]
    assert all(len(split) == 2 for split in drawn)
    expected = [rows[i]["image"] for i in np.argsort(-np.random.default_rng(0).random(4), kind="stable")[:2]]
    assert [str(path.resolve()) for path, _ in drawn[0]] == [str(Path(p).resolve()) for p in expected]

    quality.main(["score", "--images", str(folder), "--out", str(tmp_path / "fidelity_only.csv")])
    with pytest.raises(SystemExit, match="--teacher"):
        quality.main(["select", "--scores", str(tmp_path / "fidelity_only.csv"), "--by", "density", "--top", "0.5",
                      "--out", str(tmp_path / "x.txt")])
    with pytest.raises(SystemExit, match="--images"):
        quality.main(["score", "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "y.csv")])


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory) -> Path:
    """A GroundingDINO with random weights (tiny Swin and BERT) and a word-level BERT tokenizer, saved with
    save_pretrained: the real loading and prompting path without a download."""
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)
    folder = tmp_path_factory.mktemp("grounding_dino")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *data.TOY_CLASSES]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 1, 1], window_size=4, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=12, max_text_len=32,
        encoder_n_points=2, decoder_n_points=2)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    processor = GroundingDinoProcessor(GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
                                       BertTokenizerFast(vocab_file=str(folder / "vocab.txt")))
    processor.save_pretrained(folder)
    return folder


def test_detector_prompts_fit_the_text_encoder(tiny_detector):
    processor, _ = quality.load_detector(tiny_detector, torch.device("cpu"))
    names = ("background",) + data.TOY_CLASSES
    whole = quality.detector_prompts(names, processor.tokenizer, 32)
    assert whole == [" . ".join(data.TOY_CLASSES) + " ."]  # background is no object to count
    split = quality.detector_prompts(names, processor.tokenizer, 8)  # [CLS] + at most 3 names with dots + [SEP]
    assert len(split) > 1 and all(len(processor.tokenizer(p)["input_ids"]) <= 8 for p in split)
    assert " . ".join(p[:-2] for p in split).split(" . ") == list(data.TOY_CLASSES)


def test_count_boxes_thresholds_and_duplicates(tiny_detector):
    processor, detector = quality.load_detector(tiny_detector, torch.device("cpu"))
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    prompt = quality.detector_prompts(data.TOY_CLASSES, processor.tokenizer, 32)
    everything = quality.count_boxes(processor, detector, image, prompt, threshold=0.0)
    assert 1 <= everything <= detector.config.num_queries
    assert quality.count_boxes(processor, detector, image, prompt, threshold=1.01) == 0
    # The same objects found through two prompts are counted once (NMS across prompts)
    assert quality.count_boxes(processor, detector, image, prompt * 2, threshold=0.0) == everything


def test_cli_detector_density(tiny_detector, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    scores = tmp_path / "s.csv"
    quality.main(["score", "--images", str(folder), "--detector", str(tiny_detector), "--box-threshold", "0.3",
                  "--out", str(scores)])
    rows = quality.read_scores(scores)
    assert all(0 <= row["boxes"] <= 12 and math.isnan(row["instances"]) for row in rows)
    quality.main(["select", "--scores", str(scores), "--by", "density", "--density", "boxes", "--top", "0.25",
                  "--out", str(tmp_path / "dense.txt")])
    chosen = data.read_split(tmp_path / "dense.txt")[0][0].resolve().name
    assert rows[[Path(r["image"]).name for r in rows].index(chosen)]["boxes"] == max(r["boxes"] for r in rows)
    with pytest.raises(SystemExit, match="--teacher CKPT to rank by density, or rank by --density boxes"):
        quality.main(["select", "--scores", str(scores), "--by", "density", "--top", "0.5", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match=r"--detector: .* \(no config.json\)"):
        quality.main(["score", "--images", str(folder), "--detector", str(tmp_path), "--out", str(tmp_path / "y.csv")])


class _LeftHalfTeacher(torch.nn.Module):
    """A DPT-like teacher sure of class 1 on the left half of every image and unsure (uniform) on the right."""
    arch, patch_size = "dpt", 8

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device to read

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 7, *x.shape[-2:])
        logits[:, 1, :, :x.shape[-1] // 2] = 10.0
        return logits


def test_gate_report_counts_what_the_gate_lets_through(tmp_path):
    truth = np.zeros((16, 16), np.uint8)  # sky everywhere ...
    truth[8:, :] = 1  # ... grass in the bottom half
    truth[0, 0] = 255  # one unknown pixel
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    Image.fromarray(truth).save(tmp_path / "a_truth.png")
    counts = quality.gate_report(_LeftHalfTeacher(), [(image, tmp_path / "a_truth.png")], "toy", 0.95)
    np.testing.assert_array_equal(counts["pixels"][:2], [127, 128])
    np.testing.assert_array_equal(counts["gated"][:2], [63, 64])  # the left half of each, minus the unknown pixel
    np.testing.assert_array_equal(counts["correct"][:2], [0, 64])  # sky gated as grass is wrong
    np.testing.assert_array_equal(counts["gated_as"][:2], [0, 127])
    table = quality.format_gate_report(counts, data.TOY_CLASSES)
    assert "| sky | 127 | 49.6 | 0.0 | 0 |" in table and "| ball | 0 | – | – | 0 |" in table


def test_gate_report_of_several_teachers_is_mean_and_std_per_class():
    one = {"pixels": np.array([100, 50, 0]), "gated": np.array([50, 10, 0]), "correct": np.array([50, 5, 0]),
           "gated_as": np.array([60, 10, 0])}
    two = {"pixels": np.array([100, 50, 0]), "gated": np.array([70, 20, 0]), "correct": np.array([35, 20, 0]),
           "gated_as": np.array([80, 20, 0])}
    table = quality.format_gate_report([one, two], ("sky", "grass", "road"))
    # sky: 50 % and 70 % gated -> 60.0 ± 14.1; right: 100 % and 50 % -> 75.0 ± 35.4; gated as: mean 70
    assert "| sky | 100 | 60.0 ± 14.1 | 75.0 ± 35.4 | 70 |" in table
    assert "| grass | 50 | 30.0 ± 14.1 | 75.0 ± 35.4 | 15 |" in table and "| road | 0 | – | – | 0 |" in table
    assert "(2 teachers)" in table.splitlines()[0]


def test_teacher_label_uses_the_training_teachers_tta_and_the_threshold():
    image = np.zeros((16, 16, 3), np.uint8)
    teacher = _LeftHalfTeacher()
    # no TTA: class 1 (sure) on the left half; the right half is uniform, argmax class 0 at confidence 1/7
    plain = quality.teacher_label(teacher, image, "none")
    assert (plain[:, :8] == 1).all() and (plain[:, 8:] == 0).all()
    gated = quality.teacher_label(teacher, image, "none", conf_thresh=0.5)
    assert (gated[:, :8] == 1).all() and (gated[:, 8:] == data.IGNORE_INDEX).all()
    # flip TTA averages the plain and the mirrored pass: logit 5 for class 1 everywhere, softmax e^5 / (e^5 + 6)
    flipped = quality.teacher_label(teacher, image, "flip", conf_thresh=0.95)
    assert (flipped == 1).all()
    assert (quality.teacher_label(teacher, image, "flip", conf_thresh=0.97) == data.IGNORE_INDEX).all()


def test_cli_label_writes_a_split_that_trains_resumes_and_scores_against_the_truth(tmp_path, capsys):
    root = data.make_toy_world(tmp_path / "toy", counts={split: 1 for split in data.TOY_SPLITS}
                               | {"synthetic_dense_fine": 3})
    torch.manual_seed(0)
    net = model.build_model("dpt", "toy", 7, pretrained=False).eval()
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "step": 0,
                "args": {"dataset": "toy", "arch": "dpt", "backbone": "toy", "num_classes": 7, "tta": "flip"}},
               checkpoint)
    out = tmp_path / "labels"
    source = root / "synthetic" / "dense_fine"  # a folder: its 3 images; the split file lists 2n = 2 of them
    quality.main(["label", "--teacher", str(checkpoint), "--images", str(source), "--out", str(out), "--device", "cpu"])
    samples = data.read_split(out / quality.LABEL_SPLIT)
    assert [image.resolve() for image, _ in samples] == [(root / f"synthetic/dense_fine/{i:06d}.jpg").resolve()
                                                         for i in range(3)]
    confusion = np.zeros((7, 7), np.int64)
    for image_path, label_path in samples:
        assert label_path.resolve() == (out / f"{image_path.stem}.png").resolve()
        # the reference: the mean of the plain and the mirrored-back logits, argmax (a 128 image needs no resize)
        x = data.normalize(data.load_image(image_path)[None])  # (1, 3, 128, 128)
        with torch.no_grad():
            logits = (net(x) + net(x.flip(-1)).flip(-1)) / 2
        label = data.load_label("toy", label_path)
        np.testing.assert_array_equal(label, logits.argmax(1)[0].numpy())
        truth = data.load_label("toy", data.truth_path(image_path))
        np.add.at(confusion, (truth.ravel(), label.ravel()), 1)
    # the printed IoU of the labels against the true layouts, from the confusion counted here
    inter, union = np.diag(confusion), confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    miou = np.mean(100 * inter[union > 0] / union[union > 0])
    assert f"| mIoU | {miou:.1f} |" in capsys.readouterr().out  # one column: the --out folder
    # what train.py reads: every label at its image's size
    labelled = data.LabelledDataset("toy", root, str(out / quality.LABEL_SPLIT), train=False, patch_size=8)
    assert [tuple(label.shape) for _, label in labelled] == [(data.TOY_SIZE, data.TOY_SIZE)] * 3

    # a rerun keeps what is there (a cut run resumes) and makes what is missing
    first, second = samples[0][1], samples[1][1]
    data.save_png(np.full((data.TOY_SIZE, data.TOY_SIZE), 6, np.uint8), first)
    made = data.load_label("toy", second)
    second.unlink()
    quality.main(["label", "--teacher", str(checkpoint), "--images", str(source), "--out", str(out), "--device", "cpu"])
    assert (data.load_label("toy", first) == 6).all() and np.array_equal(data.load_label("toy", second), made)
    # ... but never mixes labels made with other settings
    with pytest.raises(SystemExit, match=r"--out .*labels: holds labels made with another tta"):
        quality.main(["label", "--teacher", str(checkpoint), "--images", str(source), "--out", str(out),
                      "--tta", "none", "--device", "cpu"])

    # the control: the stored true layouts; `truth` then reads 100 for every class present
    quality.main(["label", "--truth", "--images", str(source), "--out", str(tmp_path / "truth")])
    assert [label.resolve() for _, label in data.read_split(tmp_path / "truth" / quality.LABEL_SPLIT)] == [
        data.truth_path(image).resolve() for image, _ in samples]
    capsys.readouterr()
    quality.main(["truth", "--labels", str(tmp_path / "truth" / quality.LABEL_SPLIT)])
    assert "| mIoU | 100.0 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--out .*: lies inside --images"):  # its PNGs would be listed as images
        quality.main(["label", "--truth", "--images", str(source), "--out", str(source / "labels")])
    with pytest.raises(SystemExit, match="--truth: .* has no stored true layout"):
        quality.main(["label", "--truth", "--images", str(root / "train.txt"), "--out", str(tmp_path / "x")])


def test_label_report_of_several_splits_is_mean_and_std_per_class():
    one = torch.tensor([[8, 2], [0, 10]])  # sky IoU 8/10, grass 10/12
    two = torch.tensor([[10, 0], [0, 10]])
    table = quality.format_label_report({"dense": [(one, 20, 20), (two, 10, 20)], "sparse": [(two, 20, 20)]},
                                        ("sky", "grass"))
    assert table.splitlines()[0] == "| IoU of the labels vs the true layouts | dense (2) | sparse |"
    assert "| sky | 90.0 ± 14.1 | 100.0 |" in table and "| grass | 91.7 ± 11.8 | 100.0 |" in table
    assert "| pixels labelled (%) | 75.0 ± 35.4 | 100.0 |" in table


def test_gate_report_applies_the_mask2former_image_gate(tmp_path):
    torch.manual_seed(0)
    teacher = model.build_model("mask2former", "toy", 7, pretrained=False).eval()
    image, truth = tmp_path / "a.png", tmp_path / "a_truth.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    Image.fromarray(np.full((32, 32), 2, np.uint8)).save(truth)
    x = quality.teacher_input(teacher, torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1)[None])
    with torch.no_grad():
        query_conf = float(teacher(x)["pred_logits"].softmax(-1).amax(-1).mean())  # the image's mean query confidence
    sure = quality.gate_report(teacher, [(image, truth)], "toy", 0.0)  # every image and pixel passes
    assert sure["images"][0] == sure["kept"][0] == 1 and sure["gated"][2] == sure["pixels"][2] == 32 * 32
    unsure = quality.gate_report(teacher, [(image, truth)], "toy", query_conf + 1e-4)  # the image just fails
    assert unsure["kept"][0] == 0 and unsure["gated"].sum() == 0
    assert "image gate: 0.0 % of the 1 images kept" in quality.format_gate_report(unsure, data.TOY_CLASSES)
