"""eval.py: mIoU against torchmetrics, the three inference modes, DDP summation, the command line."""
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

import data
from eval import confusion_matrix, evaluate, infer, main, miou_from_confusion
from model import build_model


def test_miou_matches_torchmetrics_with_absent_classes():
    # K = 6: class 5 occurs nowhere (NaN, left out of the mean by both implementations: torchmetrics' macro
    # average gives weight 0 to a class with no target and no prediction, checked with torchmetrics 1.9),
    # class 4 only in the prediction (IoU 0, counted by both), class 3 only in the target (IoU 0);
    # 255 pixels are ignored whatever is predicted there.
    K = 6
    g = torch.Generator().manual_seed(0)
    metric = MulticlassJaccardIndex(num_classes=K, average="macro", ignore_index=255)
    cm = torch.zeros(K, K, dtype=torch.int64)
    for _ in range(3):  # accumulated over batches, as in evaluate
        label = torch.randint(0, 4, (2, 17, 23), generator=g)
        noise = torch.randint(0, 5, label.shape, generator=g)
        pred = torch.where(torch.rand(label.shape, generator=g) < 0.7, label, noise)
        pred[pred == 3] = 0  # class 3: target only
        label[torch.rand(label.shape, generator=g) < 0.1] = 255
        cm += confusion_matrix(pred, label, K)
        metric.update(pred, label)
    result = miou_from_confusion(cm)
    assert result["miou"] == pytest.approx(metric.compute().item() * 100, abs=1e-4)
    assert np.isnan(result["iou"][5]) and result["iou"][4] == 0 and result["iou"][3] == 0
    assert abs(result["miou"] - np.nansum(result["iou"]) / K) > 1  # the absent class does change a mean over all K


def test_label_values_beyond_k_are_an_error():
    with pytest.raises(ValueError, match="255"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 7, 255]), 3)


class PixelModel(nn.Module):
    """A per-pixel linear classifier with the model.py attributes: translation-equivariant, no context."""

    def __init__(self, num_classes: int = 3, patch_size: int = 8):
        super().__init__()
        self.arch, self.patch_size, self.num_classes = "dpt", patch_size, num_classes
        torch.manual_seed(0)  # weights and bias alike
        self.conv = nn.Conv2d(3, num_classes, 1)
        nn.init.normal_(self.conv.weight)

    def forward(self, images):
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError("not a multiple of the patch size")
        return self.conv(images)


def test_slide_averages_softmax_over_windows_at_odd_sizes():
    # every window sees the same pixel the same way, so the average over windows is the full-image softmax;
    # a pixel covered by no window or counted wrongly would break the equality
    net = PixelModel()
    for size in [(37, 53), (13, 20), (16, 40)]:  # larger than, smaller than, and equal to the window
        images = torch.randn(2, 3, *size)
        probs = infer(net, images, mode="slide", crop_size=16)
        expected = nn.functional.pad(images, (0, -size[1] % 8, 0, -size[0] % 8))
        expected = net(expected).softmax(1)[..., :size[0], :size[1]]
        assert probs.shape == (2, 3, *size)
        torch.testing.assert_close(probs, expected)
    with pytest.raises(ValueError, match="--crop-size"):
        infer(net, images, mode="slide", crop_size=12)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return build_model("dpt", "toy", 4).eval()


def test_single_and_ms_on_the_toy_model(toy):
    images = torch.randn(1, 3, 21, 27)
    with torch.no_grad():
        single = infer(toy, images, mode="single")
        ms = infer(toy, images, mode="ms")
        ms_of_flipped = infer(toy, images.flip(-1), mode="ms")
        single_of_flipped = infer(toy, images.flip(-1), mode="single")
    assert single.shape == ms.shape == (1, 4, 21, 27)
    # ms averages both flips (each flipped back), so it commutes with a flip; the model itself does not
    torch.testing.assert_close(ms_of_flipped, ms.flip(-1), rtol=1e-4, atol=1e-4)
    assert (single_of_flipped - single.flip(-1)).abs().max() > 1e-3
    assert (ms - single).abs().max() > 1e-3  # the 1.25 scale contributes
    with pytest.raises(ValueError, match="--mode"):
        infer(toy, images, mode="triple")


def _labelled_batches(net: nn.Module, sizes, seed: int = 0):
    """(image, label) batches whose labels are the pixel model's own predictions, 10 % set to ignore."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        image = torch.randn(1, 3, *size, generator=g)
        with torch.no_grad():
            label = net(image).argmax(1)
        label[torch.rand(label.shape, generator=g) < 0.1] = 255
        batches.append((image, label))
    return batches


def test_evaluate_single_and_slide_reach_100_on_own_predictions():
    net = PixelModel().train()
    loader = _labelled_batches(net, [(32, 48), (40, 24)])
    for mode in ("single", "slide"):
        result = evaluate(net, loader, num_classes=3, mode=mode, crop_size=16, progress=False)
        assert result["miou"] == pytest.approx(100) and result["acc"] == pytest.approx(100)
    assert net.training  # mode restored


def test_evaluate_matches_torchmetrics_on_a_model(toy):
    loader = [(torch.randn(1, 3, 24, 32), torch.randint(0, 4, (1, 24, 32))) for _ in range(2)]
    metric = MulticlassJaccardIndex(num_classes=4, average="macro", ignore_index=255)
    with torch.no_grad():
        for image, label in loader:
            metric.update(toy(image).argmax(1), label)
    result = evaluate(toy, loader, num_classes=4, progress=False)
    assert result["miou"] == pytest.approx(metric.compute().item() * 100, abs=1e-4)


def test_evaluate_sums_the_confusion_matrix_over_ranks(monkeypatch):
    # Rank 0 of 2 evaluates its half; the stand-in all_reduce adds what rank 1 holds for the other half
    # (a real 2-process gloo group costs more start-up time than this suite has). The summed result must
    # equal one process evaluating everything.
    net = PixelModel()
    batches = _labelled_batches(PixelModel(num_classes=3), [(16, 16), (24, 16), (16, 32), (8, 8)], seed=1)
    with torch.no_grad():
        net.conv.bias[0] += 1.0  # labels come from another model: a result below 100 that every image moves
        rank_1 = sum(confusion_matrix(net(image).argmax(1), label, 3) for image, label in batches[1::2])
    everything = evaluate(net, batches, num_classes=3, progress=False)
    reduced = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: reduced.append(tensor.add_(rank_1)))
    rank_0 = evaluate(net, batches[0::2], num_classes=3, progress=False)
    assert len(reduced) == 1
    assert rank_0["miou"] == pytest.approx(everything["miou"]) and everything["miou"] < 99
    assert rank_0["iou"] == pytest.approx(everything["iou"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A train.py-format checkpoint of a toy DPT (contract: model, ema, args, step)."""
    torch.manual_seed(0)
    spec = data.DATASETS["toy"]
    net = build_model("dpt", "toy", spec.num_classes)
    path = tmp_path_factory.mktemp("run") / "last.pt"
    args = dict(dataset="toy", data_root="data/toy", arch="dpt", backbone="toy", num_classes=spec.num_classes,
                crop_size=96)
    torch.save(dict(model=net.state_dict(), ema=net.state_dict(), args=args, step=0), path)
    return path


def _run_cli(monkeypatch, *argv: str) -> None:
    """python eval.py ARGV, in this process (the interpreter start-up is the slow part of a subprocess)."""
    monkeypatch.setattr(sys, "argv", ["eval.py", *argv])
    main()


def test_cli_prints_the_per_class_table(tmp_path, monkeypatch, capsys, checkpoint):
    root = data.make_toy_world(tmp_path / "toy", counts={split: 1 for split in data.TOY_SPLITS} | {"val": 2})
    _run_cli(monkeypatch, "--checkpoint", str(checkpoint), "--data-root", str(root), "--device", "cpu",
             "--workers", "0")
    printed = capsys.readouterr().out
    for name in data.DATASETS["toy"].classes:
        assert name in printed
    miou = float(next(line for line in printed.splitlines() if line.startswith("mIoU")).split()[-1])
    assert 0 <= miou <= 100


def test_predict_writes_masks_and_overlays_for_odd_sizes(tmp_path, monkeypatch, checkpoint):
    folder = tmp_path / "photos"
    (folder / "street").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {folder / "a.png": (37, 53), folder / "street" / "b.jpg": (90, 21)}
    for path, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    _run_cli(monkeypatch, "--checkpoint", str(checkpoint), "--predict", str(folder), "--out", str(out),
             "--device", "cpu")
    palette = {tuple(c) for c in data.DATASETS["toy"].palette}
    for path, (h, w) in sizes.items():
        stem = out / path.relative_to(folder).parent / path.stem
        mask = np.asarray(Image.open(f"{stem}_mask.png"))
        overlay = np.asarray(Image.open(f"{stem}_overlay.png"))
        assert mask.shape == overlay.shape == (h, w, 3)
        assert {tuple(c) for c in mask.reshape(-1, 3)} <= palette


def test_cli_errors_are_one_line(tmp_path, monkeypatch, checkpoint):
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], "--checkpoint"),
        (["--checkpoint", str(checkpoint), "--predict", str(tmp_path)], "--out"),
        (["--checkpoint", str(checkpoint), "--predict", str(tmp_path), "--out", str(tmp_path / "o")], "no images"),
    ]
    for argv, flag in cases:
        with pytest.raises(SystemExit) as error:
            _run_cli(monkeypatch, *argv)
        assert flag in str(error.value) and "\n" not in str(error.value)
