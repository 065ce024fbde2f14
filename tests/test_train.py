"""train.py: the pure helpers (poly lr, EMA, CutMix, OHEM, step sampler), two-step runs of every method and arch on a
tiny toy world, kill-and-resume, SIGTERM, DDP with 2 gloo processes against one process, one-line errors.

    pytest tests/test_train.py -q --durations=10     # CPU, about 100 s on 2 cores

Runs use a 32×32 crop of a toy world with a handful of images (made once per session). Each script is started as a
real subprocess at least once per arch; the other cases call train.main in-process, which runs the same code
without paying the ~6 s import of torch + timm again.
"""
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import data
import model
import ot
import train
from model import build_model
from ot import soft_cross_entropy as ot_soft_cross_entropy  # the real one, for nan_at

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2-core machine: processes must not oversubscribe
for _key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # a plain run is one process
    ENV.pop(_key, None)
K = data.get_spec("toy").num_classes
CROP = 32  # 4×4 patches of the toy ViT (patch 8)
# per split: enough real images for a supervised batch of 2B = 4, two val images (one per DDP rank)
TOY_COUNTS = {split: 1 for split in data.TOY_SPLITS} | {"train": 4, "val": 2, data.TOY_DEFAULT_SYNTHETIC: 4}


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    return data.make_toy_world(tmp_path_factory.mktemp("toy") / "toy", counts=TOY_COUNTS)


def flags(root: Path, out: Path, *extra: str, iters: int = 2) -> list[str]:
    """A tiny run; the toy backbone's weights are the session's stand-in file (tests/conftest.py), named explicitly
    so that subprocesses, which do not see the patched model.PRETRAINED_DIR, never make the real one."""
    return ["--data-root", str(root), "--out", str(out), "--iters", str(iters), "--batch-size", "2", "--workers", "0",
            "--eval-every", "2", "--crop-size", str(CROP), "--device", "cpu",
            "--pretrained", str(model.PRETRAINED_DIR / model.TOY_WEIGHTS), *extra]


def run_script(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def run_main(argv: list[str]) -> None:
    """train.main in-process on one thread (as the subprocesses: two threads on a busy 2-core machine run ~20× slower);
    its SIGTERM handler is removed afterwards so it cannot outlive the run."""
    handler, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(argv)
    finally:
        signal.signal(signal.SIGTERM, handler)
        torch.set_num_threads(threads)


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    """(training log lines, evaluation lines) of a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss_x" in line], [line for line in lines if "miou" in line]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------
# Pure helpers


def test_poly_lr_starts_at_base_and_decays_to_zero():
    assert train.poly_lr(2.0, 0, 10, 0.9) == 2.0
    assert train.poly_lr(2.0, 5, 10, 0.9) == pytest.approx(2.0 * 0.5 ** 0.9, rel=1e-12)
    assert train.poly_lr(2.0, 10, 10, 0.9) == 0.0
    values = [train.poly_lr(1.0, step, 10, 0.9) for step in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))


def _bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net[1].running_mean.normal_()
    net[1].num_batches_tracked.fill_(seed)
    return net


@pytest.mark.parametrize("step, decay, lam", [(0, 0.996, 0.0), (1, 0.996, 0.5), (3, 0.996, 0.75),
                                              (3, 0.6, 0.6), (100_000, 0.996, 0.996)])
def test_ema_update_uses_min_of_warmup_and_decay(step, decay, lam):
    teacher, student = _bn_net(1), _bn_net(2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    train.ema_update(teacher, student, step, decay)
    for key, value in teacher.state_dict().items():
        s = student.state_dict()[key]
        if value.is_floating_point():  # parameters and float buffers (running mean/var) are averaged
            torch.testing.assert_close(value, lam * before[key] + (1 - lam) * s, rtol=1e-6, atol=1e-7)
        else:  # integer buffers are copied
            assert torch.equal(value, s)
    assert int(teacher[1].num_batches_tracked) == 2
    if step > 0:  # the average actually kept part of the old teacher
        assert not torch.equal(teacher[0].weight, student[0].weight)


@pytest.mark.parametrize("shape", [(3, 5, 7), (3, 2, 5, 7), (3, 4, 2, 5, 7)])
def test_cutmix_takes_sample_b_minus_1_minus_b_inside_the_box(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    box = torch.rand(shape[0], *shape[-2:], generator=g) < 0.4  # (B, H, W)
    mixed = train.cutmix(x, box)
    assert mixed.shape == x.shape
    B = shape[0]
    for b in range(B):
        inside, outside = box[b], ~box[b]
        assert torch.equal(mixed[b][..., inside], x[B - 1 - b][..., inside])
        assert torch.equal(mixed[b][..., outside], x[b][..., outside])
    assert not torch.equal(mixed, x)
    assert torch.equal(train.cutmix(x, torch.zeros_like(box)), x)  # no box: unchanged
    labels = torch.randint(0, K, (B, *shape[-2:]), generator=g)
    assert torch.equal(train.cutmix(labels, box)[0][box[0]], labels[B - 1][box[0]])  # integer maps too


def unimatch_ohem(logits: torch.Tensor, label: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    """UniMatch's ProbOhemCrossEntropy2d (util/ohem.py), written out: when fewer than min_kept valid pixels exist
    (or min_kept = 0) every valid pixel is kept; else pixels whose true-class probability is <= max(thresh, the
    min_kept-th smallest such probability)."""
    valid = label != data.IGNORE_INDEX
    prob = logits.softmax(1).gather(1, label.clamp_max(logits.shape[1] - 1)[:, None])[:, 0]  # (B, H, W)
    n = int(valid.sum())
    keep = valid.clone()
    if 0 < min_kept <= n:
        kth = prob[valid].sort().values[min_kept - 1]
        keep &= prob <= max(thresh, float(kth))
    ce = -logits.log_softmax(1).gather(1, label.clamp_max(logits.shape[1] - 1)[:, None])[:, 0]  # (B, H, W)
    return ce[keep].mean()


def _ohem_batch():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 5, 9, 11, generator=g, dtype=torch.float64)
    label = torch.randint(0, 5, (2, 9, 11), generator=g)
    label[:, :2] = data.IGNORE_INDEX  # 44 of 198 pixels ignored: 154 valid
    return logits, label


@pytest.mark.parametrize("thresh, min_kept", [(0.7, 20), (0.7, 120), (0.05, 30), (0.999, 10), (0.7, 153)])
def test_ohem_cross_entropy_matches_a_direct_computation(thresh, min_kept):
    logits, label = _ohem_batch()
    loss, kept = train.ohem_cross_entropy(logits, label, thresh, min_kept)
    assert loss.item() == pytest.approx(unimatch_ohem(logits, label, thresh, min_kept).item(), rel=1e-5)
    prob = logits.softmax(1).gather(1, label.clamp_max(4)[:, None])[:, 0][label != 255]
    threshold = max(thresh, float(prob.sort().values[min_kept - 1]))
    assert kept == int((prob <= threshold).sum()) >= min_kept  # at least min_kept hard pixels are kept
    assert kept < 154 or thresh >= 0.999


@pytest.mark.parametrize("min_kept", [154, 10_000])
def test_ohem_keeps_every_pixel_when_fewer_than_min_kept(min_kept):
    # Cityscapes uses min_kept = 200 000: a small crop or batch (or mostly ignored labels) has fewer valid pixels
    logits, label = _ohem_batch()
    loss, kept = train.ohem_cross_entropy(logits, label, 0.7, min_kept)
    assert kept == 154
    assert loss.item() == pytest.approx(unimatch_ohem(logits, label, 0.7, min_kept).item(), rel=1e-5)


def test_teacher_probabilities_without_ot_gate_confident_mask2former_pixels():
    from model import mask2former_scores
    # One query sure of class 2 with a mask covering the image, the others sure of "no object"
    Q = 3
    pred_logits = torch.full((1, Q, K + 1), -10.0)
    pred_logits[0, 0, 2], pred_logits[0, 1:, K] = 10.0, 10.0
    pred_masks = torch.full((1, Q, 4, 4), -10.0)
    pred_masks[0, 0] = 10.0
    scores = mask2former_scores({"pred_logits": pred_logits, "pred_masks": pred_masks}, (8, 8))  # (1, K, 8, 8)
    probs = train.teacher_probabilities(scores, "mask2former")
    assert (probs.argmax(1) == 2).all() and (probs.amax(1) >= 0.95).all()  # a softmax over scores gives < 0.4
    logits = torch.randn(2, K, 5, 5)
    assert torch.equal(train.teacher_probabilities(logits, "dpt"), logits.softmax(1))


def _sampler_items(**kwargs) -> list[tuple[int, int]]:
    sampler = train.StepSampler(7, seed=3, **kwargs)
    items = list(sampler)
    assert len(items) == len(sampler)
    return items


def test_step_sampler_ranks_split_the_single_process_order():
    steps, batch, world = 6, 2, 2  # 6 steps × 4 samples over a dataset of 7: several (partial) epochs
    single = _sampler_items(batch=batch * world, start=0, steps=steps, rank=0, world=1)
    ranks = [_sampler_items(batch=batch, start=0, steps=steps, rank=r, world=world) for r in range(world)]
    for step in range(steps):  # step t of the combined batch = rank 0's batch, then rank 1's
        assert single[step * 4:(step + 1) * 4] == ranks[0][step * 2:(step + 1) * 2] + ranks[1][step * 2:(step + 1) * 2]
    seeds = [seed for items in ranks for _, seed in items]  # one seed per global position: disjoint slices
    assert len(set(seeds)) == len(seeds) == steps * batch * world
    indices = [index for index, _ in single]
    for epoch in range(len(indices) // 7):  # each full epoch is a permutation of the dataset
        assert sorted(indices[epoch * 7:(epoch + 1) * 7]) == list(range(7))
    assert indices[:7] != indices[7:14]  # reshuffled per epoch


def test_step_sampler_resumes_with_the_same_tail():
    full = _sampler_items(batch=2, start=0, steps=9, rank=1, world=2)
    tail = _sampler_items(batch=2, start=4, steps=9, rank=1, world=2)
    assert tail == full[4 * 2:]


# ----------------------------------------------------------------------------------------------------
# Two-step runs of every method and arch


def check_run(out: Path, arch: str, method: str, steps: int = 2) -> dict:
    """Run folder contents after `steps` steps; returns the checkpoint."""
    args = json.loads((out / "args.json").read_text())
    assert (args["arch"], args["method"], args["crop_size"], args["num_classes"]) == (arch, method, CROP, K)
    logs, evals = read_metrics(out)
    expected = {"step", "loss_x", "loss_u", "skipped", "lr", "s_per_step"}
    if method != "supervised":
        expected |= {"mask_ratio", "ot_changed", "acc_all", "acc_teacher"}
        if "acc_trained" in logs[-1]:  # only when some pixel with a true class passed the gate
            expected |= {"acc_trained"}
        if "things_gated" in logs[-1]:  # only when the crops held a thing pixel
            expected |= {"things_gated"}
    if method == "sense":
        expected |= {"ot_err"}
    if method != "supervised" and arch == "mask2former":
        expected |= {"image_ratio"}  # share of synthetic images the query-confidence gate keeps
    assert set(logs[-1]) == expected and logs[-1]["step"] == steps
    assert all(np.isfinite(logs[-1][key]) for key in expected) and logs[-1]["skipped"] == 0
    assert logs[-1]["lr"] == pytest.approx(train.poly_lr(args["lr"], steps - 1, steps, args["poly_power"]))
    assert evals[-1]["step"] == steps and len(evals[-1]["iou"]) == K and 0 <= evals[-1]["miou"] <= 100
    assert evals[-1]["classes"] == list(data.TOY_CLASSES) and evals[-1]["things"] == list(data.TOY_CLASSES[3:])
    state = load(out / "last.pt")
    assert {"model", "ema", "optimizer", "scaler", "step", "args", "best_miou", "rng_cpu"} <= set(state)
    assert state["step"] == steps and state["args"]["method"] == method
    assert state["best_miou"] == pytest.approx(evals[-1]["miou"])
    groups = state["optimizer"]["param_groups"]
    bases = [args["lr"], args["lr"] * args["head_lr_mult"]]
    bases += bases[1:] if arch == "mask2former" else []  # queries and level embeddings: a group without weight decay
    assert [g["base"] for g in groups] == pytest.approx(bases)
    assert all(int(s["step"]) == steps for s in state["optimizer"]["state"].values())
    net = build_model(arch, "toy", K)
    net.load_state_dict(state["model"])  # strict: the unwrapped model's keys
    net.load_state_dict(state["ema"])
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in state["model"])  # EMA lags the student
    panels = sorted((out / "panels").glob("*.png"))
    if method == "supervised":
        assert panels == []
    else:  # 2 samples × (weak view | truth | teacher | OT changed | trained-on label | student), 3× enlarged
        assert [p.name for p in panels] == [f"step{steps:07d}.png"]
        width, height = Image.open(panels[0]).size
        cell = train.PANEL_SCALE * CROP + 2
        assert width == 6 * cell and height >= 2 * train.PANEL_LINE + 2 * cell + train.PANEL_LINE
    return state


@pytest.mark.parametrize("arch", ["dpt", "mask2former"])
def test_subprocess_run_then_eval_py(arch, toy_root, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", *flags(toy_root, out, "--arch", arch))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "EMA teacher mIoU" in result.stdout
    check_run(out, arch, "sense")
    result = run_script("eval.py", "--checkpoint", str(out / "last.pt"), "--data-root", str(toy_root),
                        "--workers", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    miou = float(re.search(r"^mIoU\s+([\d.]+)$", result.stdout, re.M).group(1))
    assert miou == pytest.approx(read_metrics(out)[1][-1]["miou"], abs=0.006)  # the EMA teacher, as in training


def test_first_run_on_a_fresh_clone_makes_the_toy_backbone_then_loads_it(toy_root, tmp_path, monkeypatch):
    """The README's first command on a machine with no pretrained/ folder: no --pretrained flag, so the toy backbone's
    official file is made by its own pretraining (shortened through TOY_PRETRAIN, not handed a pre-made file),
    written, loaded and named in the checkpoint."""
    folder = tmp_path / "pretrained"  # does not exist yet, as on a fresh clone
    monkeypatch.setattr(model, "PRETRAINED_DIR", folder)
    monkeypatch.setitem(model.TOY_PRETRAIN, "steps", 2)
    monkeypatch.setitem(model.TOY_PRETRAIN, "batch", 2)
    made = []
    pretrain = model.pretrain_toy_backbone
    monkeypatch.setattr(model, "pretrain_toy_backbone", lambda path, **kw: made.append(path) or pretrain(path, **kw))
    def argv(out: Path, *extra: str) -> list[str]:  # flags() without its --pretrained pair
        given = flags(toy_root, out, *extra)
        at = given.index("--pretrained")
        return given[:at] + given[at + 2:]

    run_main(argv(tmp_path / "run"))
    path = folder / model.TOY_WEIGHTS
    assert made == [path] and path.is_file() and not list(folder.glob("*.tmp"))
    assert load(tmp_path / "run" / "last.pt")["pretrained_file"] == str(path)
    fresh = build_model("dpt", "toy", K)  # found now, not made again
    assert fresh.pretrained_file == str(path) and len(made) == 1
    assert torch.equal(fresh.backbone.pos_embed, model.load_pretrained("toy", path).pos_embed)
    # an explicit file that does not exist is still an error, and 'none' still random init
    with pytest.raises(ValueError, match="is not a file"):
        run_main(argv(tmp_path / "run2", "--pretrained", str(tmp_path / "absent.pth")))
    run_main(argv(tmp_path / "run3", "--pretrained", "none"))
    assert load(tmp_path / "run3" / "last.pt")["pretrained_file"] is None


@pytest.mark.parametrize("arch, method", [("dpt", "supervised"), ("dpt", "pseudo"),
                                          ("mask2former", "supervised"), ("mask2former", "pseudo")])
def test_in_process_run(arch, method, toy_root, tmp_path):
    out = tmp_path / "run"
    run_main(flags(toy_root, out, "--arch", arch, "--method", method))
    check_run(out, arch, method)


# ----------------------------------------------------------------------------------------------------
# Kill and resume


def interrupted_and_uninterrupted(root: Path, folder: Path, arch: str) -> tuple[dict, dict]:
    """last.pt of a 4-step run, and of the same run stopped by SIGTERM in step 2 and continued with --resume auto."""
    argv = ["--arch", arch, "--save-every", "1", "--conf-thresh", "0"]  # the random teacher is never sure: gate all
    run_main(flags(root, folder / "a", *argv, iters=4))
    ema_update = train.ema_update

    def terminated_in_step_2(teacher, student, step, decay):
        ema_update(teacher, student, step, decay)
        if step == 1:  # a scheduler's SIGTERM arrives while step 2 (done = 2) runs
            os.kill(os.getpid(), signal.SIGTERM)

    train.ema_update = terminated_in_step_2
    try:
        run_main(flags(root, folder / "b", *argv, iters=4))
    finally:
        train.ema_update = ema_update
    assert load(folder / "b" / "last.pt")["step"] == 2  # the step it stopped at: saved, then left the loop
    assert read_metrics(folder / "b")[1][-1]["step"] == 2
    run_main(flags(root, folder / "b", *argv, "--resume", "auto", iters=4))
    assert read_metrics(folder / "a")[0][-1]["loss_u"] > 0  # the synthetic branch did contribute
    return load(folder / "a" / "last.pt"), load(folder / "b" / "last.pt")


@pytest.fixture(scope="module")
def dpt_resume(toy_root, tmp_path_factory) -> tuple[dict, dict]:
    return interrupted_and_uninterrupted(toy_root, tmp_path_factory.mktemp("resume"), "dpt")


def assert_same_training_state(uninterrupted: dict, resumed: dict) -> None:
    """Bit-identical: same data, augmentation and arithmetic in the same order on the CPU (tolerance 0)."""
    assert resumed["step"] == uninterrupted["step"] == 4
    assert resumed["best_miou"] == uninterrupted["best_miou"]
    for key in ("model", "ema"):
        for name, value in uninterrupted[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name}"
    states_a, states_b = uninterrupted["optimizer"]["state"], resumed["optimizer"]["state"]
    assert states_a.keys() == states_b.keys()
    for index, state in states_a.items():
        for name, value in state.items():
            assert torch.equal(states_b[index][name], value), f"optimizer {index}.{name}"


def test_sigterm_then_resume_equals_an_uninterrupted_run(dpt_resume):
    assert_same_training_state(*dpt_resume)


def test_resume_continues_the_rng_stream(dpt_resume):
    uninterrupted, resumed = dpt_resume
    assert torch.equal(resumed["rng_cpu"], uninterrupted["rng_cpu"])


def test_mask2former_resume_equals_an_uninterrupted_run(toy_root, tmp_path):
    assert_same_training_state(*interrupted_and_uninterrupted(toy_root, tmp_path, "mask2former"))


def test_sigterm_saves_and_exits_cleanly(toy_root, tmp_path):
    out = tmp_path / "run"
    argv = flags(toy_root, out, "--log-every", "1", "--save-every", "10000", "--eval-every", "10000",
                 "--panel-every", "0", iters=500)
    process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "metrics.jsonl").exists():  # the first step is logged: the handler is installed
            assert process.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-2000:]
    stopped = int(re.search(r"SIGTERM: saved \S+ at step (\d+)", stdout).group(1))
    assert 1 <= stopped < 500
    assert load(out / "last.pt")["step"] == stopped
    assert read_metrics(out)[0][-1]["step"] == stopped
    assert not (out / "last.pt.tmp").exists()


# ----------------------------------------------------------------------------------------------------
# DDP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_ranks_equal_one_process_with_the_combined_batch(toy_root, tmp_path):
    # CutMix pairs b with B-1-b and TTA covers the first half, both per rank: off, so that the two runs compute the
    # same thing. A gate of 0 lets every pixel through, so L_u and the batch-scope OT (pooled over ranks) take part.
    common = ["--iters", "1", "--no-cutmix", "--tta", "none", "--conf-thresh", "0"]
    argv = flags(toy_root, tmp_path / "ddp", "--batch-size", "2", *common)
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(free_port()), "train.py", *argv, timeout=240)
    # the whole tail: a rank killed by a signal (gloo aborts on a lost peer) names its cause only in its own lines
    assert result.returncode == 0, result.stderr[-6000:]
    assert "x 2 rank(s)" in result.stdout
    run_main(flags(toy_root, tmp_path / "one", "--batch-size", "4", *common))
    ddp, one = load(tmp_path / "ddp" / "last.pt"), load(tmp_path / "one" / "last.pt")
    assert ddp["step"] == one["step"] == 1
    assert read_metrics(tmp_path / "one")[0][-1]["loss_u"] > 0
    # After one AdamW step exp_avg = (1 − β1)·g and exp_avg_sq = (1 − β2)·g², g the gradient of the global mean loss:
    # equal up to float32 summation order (rtol 1e-4 on every element, atol 1e-4 of the tensor's largest value).
    states_ddp, states_one = ddp["optimizer"]["state"], one["optimizer"]["state"]
    assert states_ddp.keys() == states_one.keys()
    for index in states_one:
        for name in ("exp_avg", "exp_avg_sq"):
            a, b = states_ddp[index][name], states_one[index][name]
            assert b.abs().max() > 0
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()), msg=f"{index}.{name}")


# ----------------------------------------------------------------------------------------------------
# Bad flags and paths: one line, non-zero exit, no traceback


@pytest.mark.parametrize("extra, message", [
    (["--crop-size", "36"], "--crop-size 36: must be a positive multiple of the backbone patch size 8"),
    (["--resume", "nowhere/last.pt"], "--resume nowhere/last.pt: checkpoint not found"),
])
def test_subprocess_errors_are_one_line(extra, message, toy_root, tmp_path):
    argv = flags(toy_root, tmp_path / "run")
    argv[argv.index("--crop-size"):argv.index("--crop-size") + 2] = []
    result = run_script("train.py", *argv, *extra)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"train.py: {message}"
    assert len([line for line in result.stderr.splitlines() if line.startswith("train.py:")]) == 1


def in_process_error(argv: list[str]) -> str:
    """The message train.py's entry point prints for argv: the caught exception types, one line."""
    with pytest.raises((data.DataError, ValueError)) as error:
        run_main(argv)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_cityscapes_without_data_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default root data/cityscapes does not exist here
    message = in_process_error(["--dataset", "cityscapes", "--backbone", "toy", "--crop-size", "32", "--device", "cpu",
                                "--out", str(tmp_path / "run")])
    assert message.startswith("data/cityscapes: cityscapes root not found")


def test_synthetic_pointing_nowhere(toy_root, tmp_path):
    message = in_process_error(flags(toy_root, tmp_path / "run", "--synthetic", str(tmp_path / "missing.txt")))
    assert message.startswith(f"--synthetic {tmp_path / 'missing.txt'}: not found")


def test_resume_from_another_arch(toy_root, tmp_path):
    run_main(flags(toy_root, tmp_path / "a", "--method", "supervised", iters=1))
    message = in_process_error(flags(toy_root, tmp_path / "b", "--method", "supervised", "--arch", "mask2former",
                                     "--resume", str(tmp_path / "a" / "last.pt")))
    assert "checkpoint has arch='dpt'" in message


def test_unknown_backbone_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as error:
        train.parse_args(["--backbone", "dinov2_xxl"])
    assert error.value.code == 2
    assert "argument --backbone: invalid choice: 'dinov2_xxl'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# The synthetic branch's targets by method, the OT variants, the toy world's pseudo-label diagnostics


def method_args(method: str, **changes) -> object:
    args = train.resolve_presets(train.parse_args(["--method", method]))
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def test_soft_trains_on_the_teacher_probabilities_and_pseudo_on_its_argmax():
    logits = torch.randn(2, K, 6, 6) * 4
    valid = torch.ones(2, 6, 6, dtype=torch.bool)
    valid[0, 0] = False
    probabilities = logits.softmax(1)
    gate = (probabilities.amax(1) >= 0.95) & valid
    soft, soft_gate, _ = train.pseudo_targets(logits, valid, method_args("soft"), "present")
    assert torch.allclose(soft, probabilities) and torch.equal(soft_gate, gate)
    assert (soft.amax(1) < 1 - 1e-4).any()  # really soft targets, not one-hot
    hard, hard_gate, _ = train.pseudo_targets(logits, valid, method_args("pseudo"), "present")
    assert torch.equal(hard, torch.nn.functional.one_hot(logits.argmax(1), K).movedim(-1, 1).float())
    assert torch.equal(hard_gate, gate)


def test_mask2former_scores_that_sum_to_one_go_through_ot():
    # A sure Mask2Former teacher: one query per pixel with class probability 1 and a sharp mask, so its scores are
    # in [0, 1] and sum to 1 at every pixel, as probabilities do; ot.py refuses probabilities, train.py's shift by 1
    # (which log-softmax ignores) keeps them logits
    torch.manual_seed(0)
    scores = torch.nn.functional.one_hot(torch.randint(K, (2, 8, 8)), K).movedim(-1, 1).float()  # (2, K, 8, 8)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    args = method_args("sense", arch="mask2former", ot_marginal="uniform")
    targets, _, _ = train.pseudo_targets(scores, valid, args, "uniform")
    reference, _, _ = ot.ot_pseudo_labels(scores.log_softmax(1), valid, beta=args.ot_beta, iters=args.ot_iters,
                                          class_marginal="uniform", scope=args.ot_scope, tol=None, start="reference")
    torch.testing.assert_close(targets, reference)
    with pytest.raises(ValueError, match="look like probabilities"):  # what the shift avoids
        ot.ot_pseudo_labels(scores, valid)


def test_mask2former_ot_gate_reads_the_plan_by_default_and_the_teacher_scores_when_asked():
    assert train.resolve_presets(train.parse_args(["--arch", "mask2former"])).ot_gate == "plan"  # reference code
    assert train.resolve_presets(train.parse_args([])).ot_gate == "teacher"  # the paper's text, DPT
    torch.manual_seed(0)
    scores = (torch.randn(2, K, 8, 8) * 4).softmax(1) * 0.99  # a Mask2Former teacher's scores, in [0, 1)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[1, :2] = False
    gates = {}
    for on in ("plan", "teacher"):
        args = train.resolve_presets(train.parse_args(["--arch", "mask2former", "--ot-gate", on]))
        targets, gates[on], _ = train.pseudo_targets(scores, valid, args, "uniform")
        confidence = targets if on == "plan" else scores  # the teacher's confidence is its score, not a softmax of it
        assert torch.equal(gates[on], (confidence.amax(1) >= 0.95) & valid), on
        label, trained = train.synthetic_labels(targets, gates[on], torch.ones(2), args)
        assert torch.equal(trained, gates[on]) and (label[~trained] == 255).all()
    assert not torch.equal(gates["plan"], gates["teacher"])  # the flag acts
    assert gates["teacher"].any()


def test_truth_control_runs_for_mask2former_and_ignores_its_image_gate():
    args = train.resolve_presets(train.parse_args(["--arch", "mask2former", "--method", "truth"]))
    truth = torch.randint(K, (2, 8, 8))
    truth[0, 0] = 255
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    targets, gate, _ = train.pseudo_targets(torch.rand(2, K, 8, 8) * 0.5, valid, args, "uniform", truth)
    label, trained = train.synthetic_labels(targets, gate, torch.zeros(2), args)  # an unsure teacher: kept anyway
    assert torch.equal(label, truth) and torch.equal(trained, truth != 255)
    args.method = "truth_gated"
    _, gate, _ = train.pseudo_targets(torch.rand(2, K, 8, 8) * 0.5, valid, args, "uniform", truth)
    assert not train.synthetic_labels(targets, gate | True, torch.zeros(2), args)[1].any()  # image gate applies


def test_plan_gate_gates_on_the_ot_rows_not_on_the_teacher():
    torch.manual_seed(0)
    logits = torch.randn(2, K, 8, 8) * 6
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    args = method_args("sense", ot_beta=0.5)  # a soft plan: its rows differ clearly from the teacher's softmax
    targets, teacher_gate, _ = train.pseudo_targets(logits, valid, args, "uniform")
    plan_targets, plan_gate, _ = train.pseudo_targets(logits, valid, method_args("sense", ot_beta=0.5, ot_gate="plan"),
                                                      "uniform")
    assert torch.allclose(targets, plan_targets)  # the same plan ...
    assert torch.equal(teacher_gate, logits.softmax(1).amax(1) >= 0.95)
    assert torch.equal(plan_gate, targets.amax(1) >= 0.95)  # ... gated by its own rows
    assert not torch.equal(plan_gate, teacher_gate)


def test_prior_marginal_is_the_labelled_split_class_frequencies(toy_root, tmp_path, capsys):
    counts = np.zeros(K)
    for _, label_file in data.read_split(toy_root / "train.txt"):
        label = np.asarray(Image.open(label_file))
        counts += np.bincount(label[label != 255].ravel(), minlength=K)[:K]
    frequencies = data.class_frequencies("toy", toy_root, "train", K)
    np.testing.assert_allclose(frequencies, counts / counts.sum())
    run_main(flags(toy_root, tmp_path / "run", "--ot-marginal", "prior", iters=1))
    printed = re.search(r"^class marginal \(prior\): (.*)$", capsys.readouterr().out, re.M).group(1).split()
    np.testing.assert_allclose([float(v) for v in printed[1::2]], frequencies, atol=5e-4)  # what the run used


def test_label_stats_count_ot_changes_on_trained_pixels_and_accuracy_on_the_truth():
    teacher = torch.tensor([[[0, 1, 2, 3]]])
    target = torch.tensor([[[0, 2, 2, 1]]])
    gate = torch.tensor([[[True, True, False, False]]])
    truth = torch.tensor([[[0, 2, 255, 3]]])
    stats = train.label_stats(teacher, target, gate, truth)
    assert stats["ot_changed"] == 0.5  # of the 2 trained pixels, 1 was relabelled
    assert stats["acc_trained"] == 1.0 and stats["acc_all"] == pytest.approx(2 / 3)
    assert stats["acc_teacher"] == pytest.approx(2 / 3)
    assert "acc_trained" not in train.label_stats(teacher, target, torch.zeros_like(gate), truth)  # none trained
    assert set(train.label_stats(teacher, target, gate, None)) == {"ot_changed"}


def test_truth_controls_train_the_true_layouts_on_every_pixel_or_on_the_teachers_gate():
    torch.manual_seed(0)
    logits = torch.randn(2, K, 6, 6) * 4
    valid = torch.ones(2, 6, 6, dtype=torch.bool)
    valid[0, 0] = False  # padding
    truth = torch.randint(0, K, (2, 6, 6))
    truth[1, 2] = data.IGNORE_INDEX  # a pixel with no true class
    known = valid & (truth != data.IGNORE_INDEX)
    teacher_gate = (logits.softmax(1).amax(1) >= 0.95) & valid
    assert 0 < int(teacher_gate.sum()) < int(known.sum())
    one_hot = torch.nn.functional.one_hot(torch.where(known, truth, 0), K).movedim(-1, 1).float()
    targets, gate, _ = train.pseudo_targets(logits, valid, method_args("truth"), "present", truth)
    assert torch.equal(gate, known) and torch.equal(targets[known.unsqueeze(1).expand_as(targets)],
                                                    one_hot[known.unsqueeze(1).expand_as(one_hot)])
    targets, gate, _ = train.pseudo_targets(logits, valid, method_args("truth_gated"), "present", truth)
    assert torch.equal(gate, teacher_gate & known)
    assert torch.equal(targets.argmax(1)[gate], truth[gate])  # the truth, not the teacher, on the gate
    assert (targets.argmax(1)[gate] != logits.argmax(1)[gate]).any()


def test_truth_controls_need_the_toy_world():
    args = train.parse_args(["--method", "truth", "--dataset", "cityscapes"])
    given = train.given_flags(args)
    with pytest.raises(ValueError, match="--method truth: a control of the toy world"):
        train.check_flags(train.resolve_presets(args), given)


def test_gate_counts_per_true_class_and_things_gated():
    truth = torch.tensor([[[0, 0, 3, 3, 4, 255]]])
    label = torch.tensor([[[0, 1, 3, 0, 4, 4]]])
    gate = torch.tensor([[[True, True, True, False, False, True]]])
    counts = train.gate_counts(label, gate, truth, K)
    expected = np.zeros((K, 3), np.int64)
    expected[0] = (2, 2, 1)  # two sky pixels, both gated, one labelled right
    expected[3] = (2, 1, 1)
    expected[4] = (1, 0, 0)
    np.testing.assert_array_equal(counts.numpy(), expected)
    stats = train.label_stats(label, label, gate, truth, things=torch.tensor([3, 4, 5, 6]))
    assert stats["things_gated"] == pytest.approx(1 / 3)  # of the three thing pixels, one is trained on


def test_truth_gated_run_logs_the_gate_per_class_at_each_evaluation(toy_root, tmp_path):
    out = tmp_path / "run"
    run_main(flags(toy_root, out, "--method", "truth_gated", "--conf-thresh", "0"))  # the gate passes every pixel
    train_lines, eval_lines = read_metrics(out)
    assert all(line["acc_trained"] == 1.0 for line in train_lines)  # trained on the true layouts
    gated, right = eval_lines[-1]["gated"], eval_lines[-1]["gated_right"]
    assert len(gated) == K and all(g == 100.0 for g in gated if g is not None)
    assert all(r == 100.0 for r in right if r is not None)
    assert all(line.get("things_gated", 1.0) == 1.0 for line in train_lines)


def test_panel_has_a_header_over_every_column_and_a_legend(tmp_path):
    pictures = np.full((2, 8, 8, 3), 128, np.uint8)
    columns = [(f"column {j}", pictures) for j in range(3)]
    legend = [("sky", (70, 130, 180)), ("grass", (107, 142, 35))]
    train.save_panel(tmp_path / "panel.png", columns, legend=legend, caption="caption", scale=4)
    panel = np.asarray(Image.open(tmp_path / "panel.png"))
    cell = 4 * 8 + 2
    assert panel.shape[1] == 3 * cell
    header = panel[train.PANEL_LINE:2 * train.PANEL_LINE]
    assert all(header[:, j * cell:(j + 1) * cell].any() for j in range(3))  # text over each column
    grid_bottom = 2 * train.PANEL_LINE + 2 * cell
    assert (panel[2 * train.PANEL_LINE:2 * train.PANEL_LINE + 32, :32] == 128).all()  # pictures enlarged 4×
    legend_band = panel[grid_bottom:]
    assert (legend_band == (70, 130, 180)).all(-1).any() and (legend_band == (107, 142, 35)).all(-1).any()


def test_confusion_picture_and_table(tmp_path):
    confusion = torch.tensor([[8, 2], [0, 5]])
    table = train.save_confusion(tmp_path / "confusion.png", confusion, ("sky", "ball"))
    assert Image.open(tmp_path / "confusion.png").size[0] > 100
    rows = table.splitlines()
    assert rows[1].split()[:3] == ["sky", "80.0", "20.0"] and rows[2].split()[:3] == ["ball", "0.0", "100.0"]


def test_real_dataset_evaluates_every_epoch_and_keeps_the_best(tmp_path):
    # The reference code evaluates the EMA teacher after every epoch and reports the best: on a real dataset (here a
    # tiny Cityscapes tree, synthetic set = its 3 images, B = 1: an epoch is 3 steps) the default is one evaluation
    # per epoch, and best.pt holds the teacher of the best one.
    from tests.test_data import make_cityscapes
    root = tmp_path / "cityscapes"
    make_cityscapes(root)
    data.prepare_root("cityscapes", root)
    out = tmp_path / "run"
    run_main(["--dataset", "cityscapes", "--data-root", str(root), "--synthetic", str(root / "leftImg8bit"),
              "--backbone", "toy", "--pretrained", str(model.PRETRAINED_DIR / model.TOY_WEIGHTS), "--crop-size", "16",
              "--batch-size", "1", "--iters", "6", "--workers", "0", "--device", "cpu", "--panel-every", "0",
              "--out", str(out)])
    evals = read_metrics(out)[1]
    assert [line["step"] for line in evals] == [3, 6]
    best = max(evals, key=lambda line: line["miou"])  # the first of equal ones: the reference keeps strict gains
    state = load(out / "best.pt")
    assert state["step"] == state["best_step"] == best["step"] and state["best_miou"] == best["miou"]
    assert load(out / "last.pt")["best_step"] == best["step"]


# ----------------------------------------------------------------------------------------------------
# Faults in the middle of a run: a sample that cannot be decoded, non-finite losses; flags quietly ignored


def eight_synthetic_images(root: Path, folder: Path) -> list[Path]:
    """A synthetic folder of 8 images (the toy world's 4, twice), so that an epoch lasts 4 steps of 2: an image
    can be met after the first steps (files sorted by name, as data.synthetic_images lists a folder)."""
    folder.mkdir()
    sources = data.read_split(root / "synthetic.txt")
    for index in range(8):
        (folder / f"{index:06d}.jpg").write_bytes(sources[index % len(sources)][0].read_bytes())
    return sorted(folder.iterdir())


def met_in_step_3(images: list[Path]) -> Path:
    """The first synthetic image of step 3 (index 2) of a seed-0 run with B = 2 (the synthetic loader's seed is 1)."""
    order = list(train.StepSampler(len(images), batch=2, start=0, steps=4, seed=1, rank=0, world=1))
    return images[order[2 * 2][0]]


def test_corrupt_image_mid_run_stops_after_saving_the_last_step_then_resumes_exactly(toy_root, tmp_path):
    images = eight_synthetic_images(toy_root, tmp_path / "syn")
    argv = ["--synthetic", str(tmp_path / "syn"), "--save-every", "100", "--conf-thresh", "0"]
    run_main(flags(toy_root, tmp_path / "a", *argv, iters=4))
    bad = met_in_step_3(images)
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:len(good_bytes) // 2])  # a truncated JPEG: its header reads, its pixels do not
    with pytest.raises(data.DataError) as error:  # in the main process (--workers 0)
        run_main(flags(toy_root, tmp_path / "b", *argv, iters=4))
    message = str(error.value)
    assert message.startswith(f"{bad}: unreadable image") and "\n" not in message
    assert message.endswith(f"saved {tmp_path / 'b' / 'last.pt'} at step 2: fix or remove the file, then continue "
                            "with --resume auto")
    assert load(tmp_path / "b" / "last.pt")["step"] == 2  # --save-every 100: only the fault saved it
    bad.write_bytes(good_bytes)
    run_main(flags(toy_root, tmp_path / "b", *argv, "--resume", "auto", iters=4))
    assert_same_training_state(load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt"))


def test_corrupt_image_in_a_loader_worker_is_one_line_and_exit_1(toy_root, tmp_path):
    images = eight_synthetic_images(toy_root, tmp_path / "syn")
    bad = met_in_step_3(images)
    bad.write_bytes(b"\xff\xd8 not a JPEG after all")
    argv = flags(toy_root, tmp_path / "run", "--synthetic", str(tmp_path / "syn"), "--save-every", "100", iters=4)
    argv[argv.index("--workers") + 1] = "1"
    result = run_script("train.py", *argv)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert len(lines) == 1 and lines[0].startswith(f"train.py: {bad}: unreadable image")
    assert lines[0] == result.stderr.strip().splitlines()[-1]
    assert load(tmp_path / "run" / "last.pt")["step"] == 2


def test_corrupt_validation_image_met_at_evaluation_stops_after_saving_the_step(toy_root, tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    sources = data.read_split(toy_root / "val.txt")
    lines = []
    for index in range(10):  # train.py's quick check decodes 8 of 10, spread: positions 2 and 7 only at evaluation
        image, label = sources[index % len(sources)]
        (val / f"{index}.jpg").write_bytes(image.read_bytes())
        (val / f"{index}.png").write_bytes(label.read_bytes())
        lines.append(f"{index}.jpg {index}.png")
    (val / "val.txt").write_text("\n".join(lines) + "\n")
    (val / "2.png").write_bytes(b"not a PNG")
    with pytest.raises(data.DataError) as error:
        run_main(flags(toy_root, tmp_path / "run", "--method", "supervised", "--val-split", str(val / "val.txt"),
                       "--save-every", "100", iters=4))
    assert str(error.value) == (f"{val / '2.png'}: unreadable label (cannot identify image file '{val / '2.png'}'); "
                                f"saved {tmp_path / 'run' / 'last.pt'} at step 2: fix or remove the file, then "
                                "continue with --resume auto")
    assert load(tmp_path / "run" / "last.pt")["step"] == 2  # the step whose evaluation met it


def log_lines(out: Path) -> list[dict]:
    """Every training line of metrics.jsonl (read_metrics keeps those with a loss: a skipped step has none)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "miou" not in line]


def nan_at(calls: set[int]):
    """A stand-in for train.soft_cross_entropy whose loss is NaN at the given 1-based calls; the graph stays, so
    the NaN reaches every gradient."""
    count = {"calls": 0}

    def loss(*args, **kwargs):
        count["calls"] += 1
        value = ot_soft_cross_entropy(*args, **kwargs)
        return value * float("nan") if count["calls"] in calls else value

    return loss


def test_non_finite_loss_skips_the_step_without_any_update(toy_root, tmp_path, monkeypatch):
    saved, ema_steps = {}, []
    save_checkpoint, ema_update = train.save_checkpoint, train.ema_update

    def keep(path, state):
        saved[state["step"]] = copy.deepcopy(state)
        save_checkpoint(path, state)

    def record(teacher, student, step, decay):
        ema_steps.append(step)
        ema_update(teacher, student, step, decay)

    monkeypatch.setattr(train, "save_checkpoint", keep)
    monkeypatch.setattr(train, "ema_update", record)
    monkeypatch.setattr(train, "soft_cross_entropy", nan_at({3, 4}))  # steps 3 and 4 (one micro-batch per step)
    out = tmp_path / "run"
    run_main(flags(toy_root, out, "--save-every", "1", "--log-every", "1", "--eval-every", "100",
                   "--conf-thresh", "0", iters=6))
    assert ema_steps == [0, 1, 4, 5]  # step index: the EMA skipped steps 3 and 4 too

    def same(a: dict, b: dict) -> bool:
        tensors = [(a[key], b[key]) for key in ("model", "ema")]
        tensors += [(a["optimizer"]["state"][i][name], b["optimizer"]["state"][i][name])
                    for i in a["optimizer"]["state"] for name in a["optimizer"]["state"][i]]
        return all(torch.equal(x[k], y[k]) for x, y in tensors[:2] for k in x) and \
            all(torch.equal(x, y) for x, y in tensors[2:]) and a["scaler"] == b["scaler"]

    assert same(saved[2], saved[3]) and same(saved[2], saved[4])  # nothing moved over the skipped steps
    assert not same(saved[1], saved[2]) and not same(saved[4], saved[5])  # the others did train
    assert all(int(state["step"]) == 4 for state in saved[6]["optimizer"]["state"].values())  # 6 steps - 2 skipped
    logs = log_lines(out)
    assert [line["skipped"] for line in logs] == [0, 0, 1, 1, 0, 0]
    assert "loss_u" not in logs[2] and all(np.isfinite(line["loss_u"]) for line in logs if not line["skipped"])


def test_ten_non_finite_steps_in_a_row_stop_with_one_line_and_the_last_good_checkpoint(toy_root, tmp_path):
    out = tmp_path / "run"
    argv = flags(toy_root, out, "--save-every", "1", "--eval-every", "100", "--conf-thresh", "0", iters=30)
    code = ("import ot, runpy, sys\n"  # the loss of step 3 on is NaN, as train.py's own name for it
            "real, calls = ot.soft_cross_entropy, [0]\n"
            "def nan_from_3(*args, **kwargs):\n"
            "    calls[0] += 1\n"
            "    return real(*args, **kwargs) * (float('nan') if calls[0] >= 3 else 1.0)\n"
            "ot.soft_cross_entropy = nan_from_3\n"
            f"sys.argv = ['train.py', *{argv!r}]\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    result = run_script("-c", code)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("train.py: loss_x ") and "loss_u nan: a non-finite loss in 10 steps in a row (3..12)" \
        in lines[-1] and lines[-1].endswith(f"{out / 'last.pt'} holds step 2, the last good one (a lower --lr, "
                                            "--clip-grad or --amp off, then --resume auto)")
    state = load(out / "last.pt")
    assert state["step"] == 2
    assert all(int(s["step"]) == 2 for s in state["optimizer"]["state"].values())  # no update after step 2
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert [(line["step"], line["skipped"]) for line in log_lines(out)] == [(10, 8)]  # steps 3..10 of that interval


@pytest.mark.parametrize("extra, message", [
    (["--iters", "0"], "--iters 0: must be at least 1"),  # was: the preset's steps
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),  # was: the preset's 8
    (["--crop-size", "0"], "--crop-size 0: must be at least 1"),  # was: the preset's 64
    (["--log-every", "0"], "--log-every 0: must be at least 1"),  # was: ZeroDivisionError after the first step
    (["--clip-grad", "-1"], "--clip-grad -1.0: must be at least 0"),  # was: clipping off
    (["--conf-thresh", "1.5"], "--conf-thresh 1.5: must be in [0, 1]"),  # was: no pixel ever trained on
    (["--ot-beta", "0"], "--ot-beta 0.0: must be positive"),
])
def test_values_that_were_replaced_or_ignored_are_refused(extra, message, toy_root, tmp_path):
    assert in_process_error(flags(toy_root, tmp_path / "run", *extra)) == message
    assert not (tmp_path / "run").exists()  # refused before any work


def warnings_of(*argv: str) -> list[str]:
    args = train.parse_args(list(argv))
    given = train.given_flags(args)
    return train.check_flags(train.resolve_presets(args), given)


def test_flags_without_effect_are_named_once():
    assert warnings_of() == [] and warnings_of("--arch", "mask2former", "--dataset", "ade20k", "--ade-reduced") == []
    assert warnings_of("--method", "supervised", "--ot-beta", "0.1", "--tta", "none") == [
        "--tta has no effect: --method supervised trains on no synthetic image.",
        "--ot-beta has no effect: --method supervised trains on no synthetic image."]
    assert warnings_of("--method", "pseudo", "--ot-iters", "5") == [
        "--ot-iters has no effect: --method pseudo uses no OT."]
    assert warnings_of("--ot-marginal", "uniform", "--ot-min-prob", "0.1") == [
        "--ot-min-prob has no effect: it sets which classes are present, and --ot-marginal uniform does not read "
        "them."]
    assert warnings_of("--arch", "mask2former", "--ohem", "on", "--ade-reduced") == [
        "--ohem has no effect: with --arch mask2former L_x is the set loss.",
        "--ade-reduced has no effect: only ADE20K masks have a zero label to reduce, and this is --dataset toy."]
    assert warnings_of("--m2f-ignore-as-negative") == [
        "--m2f-ignore-as-negative has no effect: --arch dpt has no mask loss."]
    assert warnings_of("--arch", "mask2former", "--method", "soft")[0].startswith(
        "--method soft with --arch mask2former trains as --method pseudo")
    # the Cityscapes OHEM preset is for DPT: the resolved config no longer says "on" where it is not used
    assert train.resolve_presets(train.parse_args(["--dataset", "cityscapes", "--arch", "mask2former"])).ohem == "off"
    assert train.resolve_presets(train.parse_args(["--dataset", "cityscapes"])).ohem == "on"


def test_run_folders_are_neither_overwritten_nor_resumed_silently(toy_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 7, "loss_x": 1.0}\n')  # an attempt that died before a checkpoint
    run_main(flags(toy_root, out, "--method", "supervised", "--resume", "auto", iters=1))
    printed = capsys.readouterr().out
    assert f"--resume auto: no {out / 'last.pt'} yet, starting at step 0" in printed
    assert [line["step"] for line in read_metrics(out)[0]] == [1]  # the stale line is gone
    message = in_process_error(flags(toy_root, out, "--method", "supervised", iters=1))
    assert message == f"--out {out}: holds a run (last.pt); continue it with --resume auto, or choose another --out"
    run_main(flags(toy_root, out, "--method", "supervised", "--resume", "auto", "--lr", "1e-4", iters=1))
    printed = capsys.readouterr().out
    assert f"train.py: warning: --resume {out / 'last.pt'}: continuing with settings other than the checkpoint's: " \
           "lr 0.0005 -> 0.0001" in printed
    assert f"resumed from {out / 'last.pt'} at step 1 of 1: nothing left to train" in printed
