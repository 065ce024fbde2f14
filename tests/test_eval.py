"""eval.py: mIoU against torchmetrics, the three inference modes, DDP summation, the command line, run summaries
and training curves."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

import data
from eval import confusion_matrix, evaluate, infer, main, miou_from_confusion, plot_runs, run_group, summarize
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


class QueryModel(nn.Module):
    """A Mask2Former stand-in: 3 queries with fixed class logits whose mask logits are the image channels pooled
    to stride 4, the resolution of Mask2Former's masks."""

    def __init__(self, patch_size: int = 8):
        super().__init__()
        self.arch, self.patch_size, self.num_classes = "mask2former", patch_size, 2
        self.logits = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(0))  # (1, Q, K + 1)

    def forward(self, images):
        return {"pred_logits": self.logits.expand(images.shape[0], -1, -1),
                "pred_masks": 4 * nn.functional.avg_pool2d(images, 4), "aux_outputs": []}


@pytest.mark.parametrize("arch", ["dpt", "mask2former"])
def test_single_mode_resizes_as_the_reference(arch):
    """sense_dpt.py / sense_mask2former.py 'original' evaluation: the image resized to int(side / p + 0.5) · p,
    bilinear with align_corners True (DPT) or False (Mask2Former, its configs); Mask2Former's scores summed at
    stride 4 and resized once to the image."""
    net = PixelModel() if arch == "dpt" else QueryModel()
    images = torch.randn(2, 3, 20, 27, generator=torch.Generator().manual_seed(0))  # 20 / 8 = 2.5: rounds up to 24
    align = arch == "dpt"
    x = nn.functional.interpolate(images, (24, 24), mode="bilinear", align_corners=align)
    if arch == "dpt":
        scores = net(x)
    else:
        out = net(x)
        scores = torch.einsum("bqc,bqhw->bchw", out["pred_logits"].softmax(-1)[..., :-1], out["pred_masks"].sigmoid())
    expected = nn.functional.interpolate(scores, (20, 27), mode="bilinear", align_corners=align)
    with torch.no_grad():
        torch.testing.assert_close(infer(net, images, mode="single"), expected)


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


# ----------------------------------------------------------------------------------------------------
# Run folders: --summarize and --plot on hand-written metrics.jsonl files

CLASSES = ["sky", "grass", "ball", "crate"]
THINGS = ["ball", "crate"]


def _fake_run(root, name: str, evaluations, training=(), named: bool = True):
    """A run folder as train.py leaves it: args.json and metrics.jsonl (training lines, then evaluations).

    evaluations: (step, miou, iou) triples; named: the lines carry "classes" and "things" (newer files).
    """
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"method": "sense", "seed": 0, "dataset": "toy", "arch": "dpt",
                                                  "out": str(folder)}))
    lines = list(training)
    for step, miou, iou in evaluations:
        line = {"step": step, "miou": miou, "iou": iou}
        if named:
            line |= {"classes": CLASSES, "things": THINGS}
        lines.append(line)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def _table_rows(text: str) -> list[list[str]]:
    """Cells of the markdown table at the top of a summary, header first, separator row dropped."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    return [rows[0]] + rows[2:]


def _expected(values, spec: str = ".2f") -> str:
    """'mean ± std' of values by numpy, sample std."""
    return f"{np.mean(values):{spec}} ± {np.std(values, ddof=1):{spec}}"


def test_run_group_strips_only_a_trailing_seed_suffix():
    assert run_group(Path("runs/study/sense_s0")) == "sense"
    assert run_group(Path("runs/sense_s12")) == "sense"
    assert run_group(Path("runs/toy_dpt_supervised")) == "toy_dpt_supervised"
    assert run_group(Path("runs/sense_s0_long")) == "sense_s0_long"
    assert run_group(Path("runs/sense_sx")) == "sense_sx"


def test_summarize_groups_seeds_and_reports_mean_and_sample_std(tmp_path):
    iou = [90.0, 80.0, 40.0, 50.0]
    runs = [_fake_run(tmp_path, "supervised_s0", [(150, 55.5, iou)])]
    for seed, miou in enumerate([60.0, 62.0, 64.0]):
        # an earlier evaluation with another number: only the last one counts
        runs.append(_fake_run(tmp_path, f"sense_s{seed}", [(75, 10.0 + seed, iou), (150, miou, iou)]))
    text = summarize(runs, keys=())
    rows = _table_rows(text)
    assert rows[0] == ["run", "seeds", "mIoU", "things"]
    assert rows[1] == ["supervised", "1", "55.50", "45.00"]  # one run: the mean alone
    assert rows[2] == ["sense", "3", "62.00 ± 2.00", "45.00 ± 0.00"]
    assert rows[2][2] == _expected([60.0, 62.0, 64.0])
    assert len(rows) == 3
    assert text.splitlines()[-1].startswith("4 runs read in 2 groups.")


def test_summarize_things_ignore_nulls_and_old_files_have_generic_names(tmp_path):
    runs = [
        _fake_run(tmp_path, "sense_s0", [(100, 61.0, [90.0, 80.0, 40.0, None])]),  # things: 40
        _fake_run(tmp_path, "sense_s1", [(100, 63.5, [91.0, None, 30.0, 60.0])]),  # things: 45
        _fake_run(tmp_path, "sense_s2", [(100, 62.0, [92.0, 81.0, None, None])]),  # no thing present: left out
        _fake_run(tmp_path, "old_s0", [(100, 50.0, [70.0, 30.0])], named=False),
    ]
    rows = _table_rows(summarize(runs, keys=(), per_class=True))
    assert rows[0] == ["run", "seeds", "mIoU", "things", *CLASSES, "class0", "class1"]
    sense, old = rows[1], rows[2]
    assert sense[:4] == ["sense", "3", _expected([61.0, 63.5, 62.0]), _expected([40.0, 45.0])]
    assert sense[3] == "42.50 ± 3.54"
    assert sense[4:] == [_expected([90.0, 91.0, 92.0]), _expected([80.0, 81.0]), _expected([40.0, 30.0]), "60.00",
                         "–", "–"]
    assert old == ["old", "1", "50.00", "–", "–", "–", "–", "–", "70.00", "30.00"]


def test_summarize_averages_keys_over_log_lines_then_runs(tmp_path):
    def training(mask_ratios, ot_changed=None):
        lines = []
        for i, ratio in enumerate(mask_ratios):
            line = {"step": 10 * (i + 1), "loss_x": 1.0, "mask_ratio": ratio, "lr": 1e-4}
            if ot_changed is not None:
                line["ot_changed"] = ot_changed[i]
            lines.append(line)
        lines.append({"step": 10 * (len(mask_ratios) + 1), "loss_x": 1.0, "mask_ratio": None})  # null: left out
        return lines

    evaluation = [(50, 60.0, [1.0, 2.0, 3.0, 4.0])]
    runs = [
        _fake_run(tmp_path, "sense_s0", evaluation, training([0.2, 0.4], [0.01, 0.03])),  # means 0.3, 0.02
        _fake_run(tmp_path, "sense_s1", evaluation, training([0.5, 0.6, 0.7])),  # 0.6, no ot_changed
        _fake_run(tmp_path, "fixmatch_s0", evaluation, training([0.9])),
    ]
    rows = _table_rows(summarize(runs))  # default keys: acc_trained is in no run, so no column
    assert rows[0] == ["run", "seeds", "mIoU", "things", "mask_ratio", "ot_changed"]
    assert rows[1][4:] == [_expected([0.3, 0.6], ".3f"), "0.0200"]  # 3 significant digits of the mean
    assert rows[1][4] == "0.450 ± 0.212"
    assert rows[2][4:] == ["0.900", "–"]
    assert _table_rows(summarize(runs, keys=["lr", "loss_u"]))[0][4:] == ["lr"]


def test_summarize_errors_name_the_folder_or_group(tmp_path):
    iou = [1.0, 2.0, 3.0, 4.0]
    empty = tmp_path / "sense_s9"
    empty.mkdir()
    with pytest.raises(ValueError, match="sense_s9: no metrics.jsonl"):
        summarize([empty])
    training_only = _fake_run(tmp_path, "running_s0", [], [{"step": 10, "loss_x": 1.0}])
    with pytest.raises(ValueError, match="running_s0: metrics.jsonl has no evaluation line"):
        summarize([training_only])
    runs = [_fake_run(tmp_path, "sense_s0", [(150, 60.0, iou), (300, 61.0, iou)]),
            _fake_run(tmp_path, "sense_s1", [(150, 60.0, iou)]),
            _fake_run(tmp_path, "sense_s2", [(300, 60.0, iou)])]
    with pytest.raises(ValueError) as error:
        summarize(runs)
    assert str(error.value) == "group sense: runs end at different steps (300, 150)"


def test_cli_summarize_writes_out_and_modes_exclude_each_other(tmp_path, capsys):
    runs = [_fake_run(tmp_path / "methods", f"sense_s{seed}", [(100, 60.0 + seed, [1.0, 2.0, 3.0, 4.0])],
                      [{"step": 10, "mask_ratio": 0.5}]) for seed in range(2)]
    out = tmp_path / "study" / "methods.md"
    main(["--summarize", *map(str, runs), "--out", str(out), "--keys", "mask_ratio"])
    expected = summarize(runs, keys=["mask_ratio"])
    assert out.read_text() == expected + "\n"
    assert expected in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["methods.md"]  # no temporary file left behind
    with pytest.raises(SystemExit) as error:
        main(["--summarize", str(tmp_path / "nothing_s0")])
    assert str(error.value) == f"eval.py: {tmp_path / 'nothing_s0'}: no metrics.jsonl (not a train.py run folder)"
    for argv, message in [([], "one of the arguments --checkpoint --summarize --plot is required"),
                          (["--summarize", str(runs[0]), "--plot", str(runs[0])], "not allowed with argument")]:
        with pytest.raises(SystemExit) as error:
            main(argv)
        assert error.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--out: needed with --plot"):
        main(["--plot", str(runs[0])])


def test_cli_as_a_subprocess_does_not_load_matplotlib_for_a_summary(tmp_path):
    run = _fake_run(tmp_path, "sense_s0", [(100, 60.0, [1.0, 2.0, 3.0, 4.0])])
    out = tmp_path / "table.md"
    code = "import sys, eval; eval.main(sys.argv[1:]); print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code, "--summarize", str(run), "--out", str(out)],
                            capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"
    assert out.read_text().startswith("| run ")


def test_plot_runs_writes_a_small_png_also_without_loss_u(tmp_path):
    def training(steps, with_u: bool):
        lines = []
        for step in steps:
            line = {"step": step, "loss_x": 1.0 / step, "s_per_step": 0.1}
            if with_u:
                line |= {"loss_u": 0.5 / step, "mask_ratio": step / 100}
            lines.append(line)
        return lines

    iou = [1.0, 2.0, 3.0, 4.0]
    runs = [_fake_run(tmp_path, f"sense_s{seed}", [(20, 40.0 + seed, iou), (40, 50.0 + seed, iou)],
                      training(range(10, 41, 10), with_u=True)) for seed in range(2)]
    supervised = _fake_run(tmp_path, "supervised_s0", [(40, 45.0, iou)], training(range(10, 41, 10), with_u=False))
    out = tmp_path / "plots" / "curves.png"
    assert plot_runs([*runs, supervised], out) == out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1000, 700)
    assert out.stat().st_size < 300_000
    # no run with loss_u or mask_ratio, and one without any evaluation yet: those panels say "no data"
    fresh = _fake_run(tmp_path, "fresh", [], training([10], with_u=False))
    main(["--plot", str(supervised), str(fresh), "--out", str(out)])
    with Image.open(out) as image:
        assert image.size == (1000, 700)
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]
