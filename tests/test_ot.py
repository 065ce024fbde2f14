"""Tests of ot.py: math properties, logits and log-probabilities giving one plan, the defaults being the DPT
recipe, POT as an independent reference, the reference code's exp-domain form (its start included) and the
textbook form, the docstring examples, hard inputs, argument errors, and collectives across two gloo processes
(only with an explicit group).

POT is imported as `ot` too, so it runs in a subprocess started outside the repository root (our
ot.py would shadow it here)."""
import doctest
import inspect
import json
import math
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ot as sense_ot
from ot import ot_pseudo_labels, sinkhorn, sinkhorn_textbook, soft_cross_entropy

ROOT = Path(__file__).resolve().parents[1]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def random_log_p(B, K, N, scale=2.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, K, N, generator=g, dtype=torch.float64) * scale).log_softmax(1).to(dtype)


def segmentation_like(K, N, present, seed):
    """Log-probabilities where most pixels are confident (p_max > 0.9) in one of a few present classes
    and every other class stays below p = 0.001 (clear of the reference's underflow boundary, where
    float32 denormals decide whether a class takes part)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randperm(K, generator=g)[:present]
    label = classes[torch.randint(present, (N,), generator=g)]  # (N,)
    logits = torch.randn(K, N, generator=g)
    logits[label, torch.arange(N)] += 13.0 + 4.0 * torch.rand(N, generator=g)
    mixed = torch.rand(N, generator=g) < 0.1  # a few ambiguous pixels between two present classes
    other = classes[torch.randint(present, (N,), generator=g)]
    logits[other[mixed], torch.arange(N)[mixed]] += 13.0
    return logits.log_softmax(0)[None]  # (1, K, N)


# ---------------------------------------------------------------------------------------------------
# POT in a subprocess

POT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import ot  # POT: this process runs outside the repository root
    assert "site-packages" in ot.__file__ or "dist-packages" in ot.__file__, ot.__file__
    data = np.load(sys.argv[1])
    out = {}
    for name in json.loads(data["names"].tobytes().decode()):
        s, b, beta, solver = data[name + "_s"], data[name + "_b"], float(data[name + "_beta"]), str(data[name + "_solver"])
        a = np.full(s.shape[0], 1.0 / s.shape[0])
        fn = ot.sinkhorn if solver == "sinkhorn" else ot.bregman.sinkhorn_log
        out[name] = fn(a, b, -s, beta, numItermax=100000, stopThr=1e-11)
    np.savez(sys.argv[2], **out)
    """
)


def pot_plans(problems: dict, tmp_path: Path) -> dict:
    """problems: name -> (s (N, K) float64, b (K,), beta, solver). Returns name -> POT plan (N, K)."""
    arrays = {"names": np.frombuffer(json.dumps(list(problems)).encode(), dtype=np.uint8)}
    for name, (s, b, beta, solver) in problems.items():
        arrays.update({name + "_s": s, name + "_b": b, name + "_beta": beta, name + "_solver": solver})
    np.savez(tmp_path / "in.npz", **arrays)
    (tmp_path / "pot_run.py").write_text(POT_SCRIPT)
    subprocess.run([sys.executable, "pot_run.py", "in.npz", "out.npz"], cwd=tmp_path, env=clean_env(), check=True)
    out = np.load(tmp_path / "out.npz")
    return {name: out[name] for name in problems}


def test_pot_is_not_shadowed_here():
    assert Path(sense_ot.__file__).resolve() == ROOT / "ot.py"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_converged_plans_match_pot(tmp_path, dtype):
    torch.manual_seed(0)
    problems, ours = {}, {}
    cases = [(K, beta, marg) for K in (5, 19, 150, 171) for beta, marg in ((0.1, "uniform"), (1.0, "uniform"), (0.3, "user"))]
    for i, (K, beta, marg) in enumerate(cases):
        N = 64
        log_p = random_log_p(1, K, N, scale=1.5, seed=i, dtype=dtype)
        if marg == "uniform":
            b = torch.full((K,), 1.0 / K, dtype=torch.float64)
        else:
            b = torch.distributions.Dirichlet(torch.ones(K, dtype=torch.float64) * 2).sample()
        tol = 1e-7 if dtype == torch.float32 else 1e-12
        plan, stats = sinkhorn(log_p, beta=beta, iters=20000, tol=tol, class_marginal=b.to(dtype))
        assert stats["marginal_error"] < (1e-5 if dtype == torch.float32 else 1e-9), (K, beta, marg, stats)
        solver = "sinkhorn" if i % 2 == 0 else "sinkhorn_log"
        name = f"p{i}"
        problems[name] = (log_p[0].T.double().numpy(), b.numpy(), beta, solver)
        ours[name] = plan[0].T.double().numpy()  # (N, K), rows sum to 1
    ref = pot_plans(problems, tmp_path)
    for name, plan in ours.items():
        ref_rows = ref[name] * ref[name].shape[0]  # POT rows sum to a_n = 1/N
        assert np.abs(plan - ref_rows).max() < 1e-5, name


def test_marginal_error_after_convergence():
    for dtype, bound in ((torch.float32, 1e-5), (torch.float64, 1e-9)):
        log_p = random_log_p(3, 19, 400, scale=3.0, dtype=dtype)
        plan, stats = sinkhorn(log_p, beta=0.3, iters=50000, tol=bound / 10, scope="image", class_marginal="uniform")
        assert stats["marginal_error"] < bound
        col = plan.double().mean(2)  # (B, K): class marginal of the plan with a_n = 1/N
        assert (col - 1 / 19).abs().sum(1).max() < bound
        assert plan.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_and_log_probabilities_give_the_same_plan(dtype):
    # sinkhorn normalises with log_softmax over the classes, so a per-pixel constant (logits vs log-probabilities,
    # or an offset of ~1000) leaves the plan unchanged, for both starts and both marginals. Largest difference
    # measured: 3e-7 in float32 (the log-probabilities are rounded, and 1/β = 20 amplifies it), 6e-16 in float64.
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 19, 300, generator=g, dtype=torch.float64) * 3).to(dtype)  # (B, K, N)
    offset = (torch.randn(2, 1, 300, generator=g, dtype=torch.float64) * 1000).to(dtype)  # (B, 1, N) per pixel
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for x in (logits, logits + offset):
        for start in ("reference", "uniform"):
            for marginal in ("present", "uniform"):
                kw = dict(start=start, class_marginal=marginal)
                p_logits, _ = sinkhorn(x, **kw)
                p_log_probs, _ = sinkhorn(x.log_softmax(1), **kw)
                assert (p_logits - p_log_probs).abs().max() < tol, (start, marginal, float((p_logits - p_log_probs).abs().max()))
    # the textbook form and ot_pseudo_labels normalise too
    x = logits + offset
    textbook = sinkhorn_textbook(x[:1].double())
    assert (textbook - sinkhorn_textbook(x[:1].double().log_softmax(1))).abs().max() < 1e-9
    targets, gate, _ = ot_pseudo_labels(x)
    targets_lp, gate_lp, _ = ot_pseudo_labels(x.log_softmax(1))
    assert (targets - targets_lp).abs().max() < tol and torch.equal(gate, gate_lp)


def test_scope_image_equals_each_image_alone():
    log_p = random_log_p(4, 19, 16 * 16).reshape(4, 19, 16, 16)
    valid = torch.rand(4, 16, 16) > 0.2
    plan, _ = sinkhorn(log_p, valid, class_marginal="present", scope="image")
    for i in range(4):
        alone, _ = sinkhorn(log_p[i : i + 1], valid[i : i + 1], class_marginal="present", scope="image")
        assert torch.allclose(plan[i : i + 1], alone, atol=1e-6)


def test_scope_batch_is_one_problem_over_the_batch():
    log_p = random_log_p(3, 7, 50)
    plan, _ = sinkhorn(log_p, scope="batch", iters=4)
    joined, _ = sinkhorn(log_p.permute(1, 0, 2).reshape(1, 7, 150), iters=4)
    assert torch.allclose(plan.permute(1, 0, 2).reshape(1, 7, 150), joined, atol=1e-6)


def test_worked_example_from_docstring():
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4]]).T[None]  # (B=1, K=2, N=2)
    plan, _ = sinkhorn(p.log(), beta=1.0, iters=1000, tol=1e-9, class_marginal="uniform")
    x = math.sqrt(6) / (1 + math.sqrt(6))
    expected = torch.tensor([[x, 1 - x], [1 - x, x]]).T[None]
    assert torch.allclose(plan, expected, atol=1e-5)
    assert abs(x - 0.7101) < 1e-4  # the number printed in the docstring


def test_valid_mask_and_row_sums():
    log_p = random_log_p(2, 5, 64).reshape(2, 5, 8, 8)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[:, :2] = False
    plan, stats = sinkhorn(log_p, valid)
    assert stats["invalid"] == 32 and stats["nonfinite"] == 0
    assert (plan[:, :, :2] == 0).all()
    assert torch.allclose(plan.sum(1)[valid], torch.ones(int(valid.sum())), atol=1e-5)
    # padded pixels do not enter the marginals: the plan on valid pixels equals solving them alone
    alone, _ = sinkhorn(log_p[:, :, 2:].contiguous())
    assert torch.allclose(plan[:, :, 2:], alone, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# The reference code's exp-domain float32 form, transcribed for comparison


def reference_exp_domain(log_p: torch.Tensor, tau: float = 0.05, iters: int = 3, b: torch.Tensor | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log_p (B, K, N) -> (B, K, N): Q = exp(s/τ)^T over all pixels of the batch, divided by its total, then
    `iters` x [class rows / sum (0 -> 1e-5) / K; pixel columns / sum (0 -> 1e-5) / N]. The reference code runs
    it in float32 with b = 1/K; b (K,) replaces 1/K (rows with b_k = 0 end at 0), dtype=float64 removes the
    underflow of p^(1/τ) (p < 0.0126 leaves float32's normal range at τ = 0.05)."""
    B, K, N = log_p.shape
    Q = torch.exp(log_p.permute(1, 0, 2).reshape(K, B * N).to(dtype) / tau)  # (K, B*N)
    Q /= Q.sum()
    share = torch.full((K, 1), 1.0 / K, dtype=dtype) if b is None else b.to(dtype)[:, None]  # (K, 1)
    for _ in range(iters):
        rows = Q.sum(1, keepdim=True)
        rows[rows == 0] = 1e-5
        Q /= rows
        Q *= share
        cols = Q.sum(0, keepdim=True)
        cols[cols == 0] = 1e-5
        Q /= cols
        Q /= B * N
    return (Q * B * N).reshape(K, B, N).permute(1, 0, 2)


def present_marginal(log_p: torch.Tensor, min_prob: float = 0.01) -> torch.Tensor:
    """(B, K, N) -> (K,): uniform over the classes whose largest probability over the batch is >= min_prob."""
    present = (log_p.double().exp().amax(2).amax(0) >= min_prob).double()
    return present / present.sum()


def confuser_teacher(B: int, K: int, N: int, seed: int, present: int = 5, confusers: int = 3,
                     peak: tuple = (0.01, 0.10), cover: float = 0.3) -> torch.Tensor:
    """(B, K, N) log-probabilities of a DPT-like teacher: pixels confident (p > 0.9) in one of `present`
    classes, 10 % of them split between two; `confusers` classes that reach a largest probability drawn in
    `peak` on a share `cover` of the pixels (their probability there: that maximum times U(0, 1)); every other
    class stays below p = 0.001."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randperm(K, generator=g)
    own, confusing = classes[:present], classes[present:present + confusers]
    label = own[torch.randint(present, (B, N), generator=g)]  # (B, N)
    logits = torch.randn(B, K, N, generator=g)
    top = 13.0 + 4.0 * torch.rand(B, N, generator=g)  # (B, N) logit of the label
    logits.scatter_(1, label[:, None], top[:, None])
    mixed = torch.rand(B, N, generator=g) < 0.1
    other = own[torch.randint(present, (B, N), generator=g)][:, None]  # (B, 1, N)
    logits.scatter_(1, other, torch.where(mixed[:, None], top[:, None], logits.gather(1, other)))
    for k in confusing.tolist():
        largest = peak[0] + (peak[1] - peak[0]) * float(torch.rand((), generator=g))
        reached = torch.rand(B, N, generator=g) < cover
        p_k = (largest * torch.rand(B, N, generator=g)).clamp_min(1e-6)  # (B, N) its probability (label ~ 1)
        logits[:, k] = torch.where(reached, top + torch.log(p_k / (1 - p_k)), logits[:, k])
    return logits.log_softmax(1)


def mask2former_like(B: int, K: int, side: int = 32, queries: int = 100, seed: int = 0) -> torch.Tensor:
    """(B, K, side*side) log-probabilities from Mask2Former-like bounded scores: per pixel
    Σ_q softmax(class_logits_q)[:K] · sigmoid(mask_logits_q) of random queries (most of them "no object", masks
    smooth: bilinear from a side/4 grid), normalised to a distribution over the K classes."""
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(B, queries, K + 1, generator=g) * 3  # (B, Q, K+1), the last is "no object"
    class_logits[..., K] += 6.0 * (torch.rand(B, queries, generator=g) < 0.9)
    low = torch.randn(B, queries, side // 4, side // 4, generator=g) * 6
    mask_logits = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False).flatten(2)  # (B, Q, N)
    scores = torch.einsum("bqk,bqn->bkn", class_logits.softmax(-1)[..., :K], mask_logits.sigmoid())  # (B, K, N)
    return (scores / scores.sum(1, keepdim=True)).log()


def relabelled_share(log_p: torch.Tensor, start: str = "reference") -> float:
    """Share of the teacher-gated pixels (p_max >= 0.95) whose argmax the DPT recipe's OT plan changes."""
    plan, _ = sinkhorn(log_p, beta=0.05, iters=3, class_marginal="present", scope="batch", start=start)
    gate = log_p.amax(1).exp() >= 0.95
    return float((plan.argmax(1) != log_p.argmax(1))[gate].double().mean())


@pytest.mark.parametrize("K", [19, 150])
def test_present_reproduces_reference_code(K):
    log_p = torch.cat([segmentation_like(K, 900, present=5, seed=K + i) for i in range(3)])  # (3, K, 900)
    ref = reference_exp_domain(log_p)
    plan, _ = sinkhorn(log_p, beta=0.05, iters=3, class_marginal="present", scope="batch")
    gated = log_p.amax(1).exp() >= 0.95  # (3, 900)
    assert gated.float().mean() > 0.7
    assert (plan - ref).abs().amax(1)[gated].max() < 1e-3


@pytest.mark.parametrize("K", [19, 81, 150])
@pytest.mark.parametrize("marginal", ["uniform", "present"])
@pytest.mark.parametrize("teacher", ["confusers", "mask2former"])
def test_default_start_reproduces_reference_code(K, marginal, teacher):
    # The regime where the two starts differ: classes peaking at 1-10 %, and flat bounded scores. The reference is
    # the exp-domain transcription in float64: in float32 its kernel p^20 underflows at K >= ~80 (absent
    # classes near 1/K), and "uniform" keeps classes below p = 0.0057 that float32 would drop.
    if teacher == "confusers":
        log_p = confuser_teacher(4, K, 2048, seed=K)
    else:
        log_p = mask2former_like(8, K, seed=K)
    b = present_marginal(log_p) if marginal == "present" else None
    ref = reference_exp_domain(log_p, b=b, dtype=torch.float64)
    share_ref = float((ref.amax(1) >= 0.95).double().mean())
    for start, reproduces in (("reference", True), ("uniform", False)):
        plan, _ = sinkhorn(log_p, beta=0.05, iters=3, class_marginal=marginal, scope="batch", start=start)
        rows = float((plan.double() - ref).abs().max())
        share = float((plan.amax(1) >= 0.95).double().mean())
        assert (rows < 1e-3 and abs(share - share_ref) < 0.005) == reproduces, (start, rows, share, share_ref)


def test_start_far_below_the_most_confident_pixel(monkeypatch):
    # Flat pixels over K = 150 (p_max 0.02-0.2) next to confident ones: their start weights p_max^20 are
    # 1e-34-1e-14 of the confident pixels', and the class sums of the classes only they hold come out at
    # 1e-32-1e-18, decided by kernel entries at the exponent floor although the scaling v stays inside
    # [1e-30, 1e30]. Without the accuracy check of the first class step the plan is off by 0.25-0.5 here.
    K = 150
    for scale, confident in ((0.3, 2000), (1.0, 200)):
        flat = torch.randn(1, K, 200, generator=torch.Generator().manual_seed(0)).mul(scale).log_softmax(1)
        log_p = torch.cat([segmentation_like(K, confident, present=3, seed=0), flat], 2)  # (1, K, confident + 200)
        log_domain_steps = []
        real = sense_ot._log_kernel
        monkeypatch.setattr(sense_ot, "_log_kernel", lambda *a: log_domain_steps.append(1) or real(*a))
        plan, _ = sinkhorn(log_p, scope="batch", class_marginal="uniform")
        monkeypatch.undo()
        assert log_domain_steps
        ref = reference_exp_domain(log_p, dtype=torch.float64)
        assert float((plan.double() - ref).abs().max()) < 1e-3
        assert_sane(plan, torch.ones(1, confident + 200, dtype=torch.bool))


def test_gated_labels_change_when_classes_peak_at_1_to_10_percent():
    # The DPT recipe keeps a gated pixel's argmax while every other class stays below ~1 % everywhere, and
    # relabels gated pixels once classes peak at 1-10 % somewhere (ot.py docstring, "What OT changes").
    quiet = torch.cat([segmentation_like(19, 2048, present=5, seed=i) for i in range(4)])
    assert relabelled_share(quiet) == 0.0
    for K in (19, 150):
        assert relabelled_share(confuser_teacher(4, K, 2048, seed=K, cover=0.02)) > 0.005


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_textbook_sinkhorn_agrees_where_finite(dtype):
    b = torch.distributions.Dirichlet(torch.ones(19, dtype=torch.float64)).sample().to(dtype)
    checked = 0
    for beta, iters in ((0.05, 3), (0.2, 10), (1.0, 50)):
        for marginal in ("present", "uniform", b):
            log_p = random_log_p(1, 19, 300, scale=2.0, seed=iters, dtype=dtype)
            textbook = sinkhorn_textbook(log_p, beta=beta, iters=iters, class_marginal=marginal)  # (1, K, N)
            ours, _ = sinkhorn(log_p, beta=beta, iters=iters, class_marginal=marginal)
            finite = torch.isfinite(textbook).all(1)  # (1, N) pixels where the textbook form did not break down
            assert torch.allclose(ours.movedim(1, -1)[finite], textbook.movedim(1, -1)[finite],
                                  atol=1e-5 if dtype == torch.float32 else 1e-10)
            checked += int(finite.sum())
    assert checked > (300 if dtype == torch.float32 else 9 * 300 - 1)  # float64: finite everywhere
    # The textbook form is the reference code's iteration: the same numbers on one image.
    log_p = random_log_p(1, 19, 300, scale=2.0, dtype=torch.float64)
    textbook = sinkhorn_textbook(log_p, class_marginal="uniform")
    assert torch.allclose(textbook, reference_exp_domain(log_p, dtype=torch.float64), atol=1e-12)


def test_textbook_takes_sinkhorns_arguments():
    # The same positional arguments (B, K, *spatial) and valid (B, *spatial), the same keyword defaults (the DPT
    # recipe: "present"), one problem over the batch's valid pixels; invalid pixels 0.
    ours, textbook = inspect.signature(sinkhorn).parameters, inspect.signature(sinkhorn_textbook).parameters
    assert list(textbook)[:2] == list(ours)[:2] == ["logits", "valid"]
    order = [name for name in ours if name in textbook]
    assert order == list(textbook)
    for name, parameter in textbook.items():
        assert parameter.default == ours[name].default and parameter.kind == ours[name].kind, name
    log_p = random_log_p(3, 7, 36, seed=4, dtype=torch.float64).reshape(3, 7, 6, 6)
    valid = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    textbook = sinkhorn_textbook(log_p, valid)
    assert textbook.shape == log_p.shape and (textbook.movedim(1, -1)[~valid] == 0).all()
    assert torch.allclose(textbook, sinkhorn(log_p, valid)[0], atol=1e-10)
    # a class below min_prob everywhere gets no mass and no NaN (the old uniform default gave NaN here in float32)
    flat = torch.full((1, 3, 4), -200.0)
    flat[0, 0], flat[0, 1, :2] = 0.0, 0.0
    assert torch.isfinite(sinkhorn_textbook(flat)).all()


def test_docstring_examples_run():
    results = doctest.testmod(sense_ot, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.failed == 0 and results.attempted >= 10
    commands = re.findall(r'^\s*(python -c ".*")\s*$', sense_ot.__doc__, re.M)
    assert commands
    for command in commands:
        argv = shlex.split(command)
        subprocess.run([sys.executable] + argv[1:], cwd=ROOT, env=clean_env(), check=True, capture_output=True)


DPT_RECIPE = dict(beta=0.05, iters=3, tol=None, class_marginal="present", min_prob=0.01, scope="batch",
                  start="reference", group=None)


def test_defaults_are_the_dpt_recipe():
    for fn, extra in ((sinkhorn, {}), (ot_pseudo_labels, dict(conf_thresh=0.95, gate_on="teacher"))):
        parameters = inspect.signature(fn).parameters
        assert not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        for name, value in {**DPT_RECIPE, **extra}.items():
            assert parameters[name].kind == inspect.Parameter.KEYWORD_ONLY, (fn.__name__, name)
            assert parameters[name].default == value, (fn.__name__, name)
        assert "DPT recipe" in fn.__doc__.splitlines()[0]
    assert inspect.signature(soft_cross_entropy).parameters["group"].default is None
    assert "DPT recipe" in sense_ot.__doc__ and "DPT recipe" in sinkhorn_textbook.__doc__.splitlines()[0]
    assert "DPT recipe" in soft_cross_entropy.__doc__.splitlines()[0]
    logits = torch.randn(2, 19, 8, 8) * 5
    targets, gate, _ = ot_pseudo_labels(logits)
    explicit, gate_explicit, _ = ot_pseudo_labels(logits, **DPT_RECIPE, conf_thresh=0.95, gate_on="teacher")
    plan, _ = sinkhorn(logits)
    assert torch.equal(targets, explicit) and torch.equal(gate, gate_explicit) and torch.equal(targets, plan)
    assert torch.equal(gate, logits.softmax(1).amax(1) >= 0.95)
    # the paper's text stays available: one problem per image with a uniform marginal differs here
    paper, _, _ = ot_pseudo_labels(logits, scope="image", class_marginal="uniform")
    assert not torch.allclose(paper, targets, atol=1e-3)


def test_reference_form_underflows_where_ours_does_not():
    # Near-uniform pixels with K = 1000: p^20 = 1e-60 is 0 in float32, so the exp-domain form gives
    # those pixels no mass at all; ours gives each a distribution.
    K = 1000
    flat = torch.randn(1, K, 10).mul(0.01).log_softmax(1)
    both = torch.cat([segmentation_like(K, 10, present=3, seed=0), flat], 0)  # (2, K, 10)
    assert reference_exp_domain(both)[1].sum(0).max() == 0
    ours, _ = sinkhorn(both, class_marginal="present", scope="batch")
    assert torch.isfinite(ours).all() and torch.allclose(ours.sum(1), torch.ones(2, 10), atol=1e-5)


def test_present_marginal_ignores_absent_classes():
    log_p = segmentation_like(19, 500, present=3, seed=1)
    plan, _ = sinkhorn(log_p, beta=2.0, class_marginal="present", iters=2000, tol=1e-7)
    mass = plan.mean(2)[0]  # (K,)
    present = log_p.amax(2)[0].exp() >= 0.01
    assert mass[~present].max() < 1e-6
    assert torch.allclose(mass[present], torch.full((int(present.sum()),), 1 / int(present.sum())), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Hard inputs: none may give NaN or Inf


def assert_sane(plan, valid_rows=None):
    assert torch.isfinite(plan).all()
    sums = plan.sum(1)
    if valid_rows is not None:
        assert torch.allclose(sums[valid_rows], torch.ones_like(sums[valid_rows]), atol=1e-4)
        assert (sums[~valid_rows] == 0).all()


@pytest.mark.parametrize("K", [2, 19, 150, 171, 1000])
@pytest.mark.parametrize("marginal", ["uniform", "present"])
def test_hard_inputs_many_classes(K, marginal):
    cases = {
        "segmentation": segmentation_like(K, 300, present=2, seed=K),
        "near_uniform": torch.randn(1, K, 300).mul(1e-4).log_softmax(1),
        "one_minus_1e-7": torch.full((1, K, 300), math.log(1e-7 / max(K - 1, 1))).index_fill_(1, torch.tensor([0]), math.log1p(-1e-7)),
        "one_pixel": torch.randn(1, K, 1).log_softmax(1),
    }
    for name, log_p in cases.items():
        for iters in (3, 300):
            plan, stats = sinkhorn(log_p, iters=iters, class_marginal=marginal)
            assert_sane(plan, torch.ones(plan.shape[0], plan.shape[2], dtype=torch.bool))
            assert math.isfinite(stats["marginal_error"]), name


def test_all_pixels_invalid_and_empty_problems():
    log_p = random_log_p(2, 19, 64)
    for scope in ("image", "batch"):
        plan, stats = sinkhorn(log_p, torch.zeros(2, 64, dtype=torch.bool), scope=scope, class_marginal="present")
        assert (plan == 0).all() and stats["invalid"] == 128
    valid = torch.zeros(2, 64, dtype=torch.bool)
    valid[1] = True  # image 0 has no valid pixel, image 1 is fine
    plan, _ = sinkhorn(log_p, valid)
    assert (plan[0] == 0).all()
    assert_sane(plan, valid)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    log_p = random_log_p(2, 150, 256, scale=4.0)
    plan, _ = sinkhorn(log_p.to(dtype), class_marginal="present")
    assert plan.dtype == torch.float32
    assert_sane(plan, torch.ones(2, 256, dtype=torch.bool))
    ref, _ = sinkhorn(log_p.to(dtype).float(), class_marginal="present")
    assert torch.allclose(plan, ref, atol=1e-6)


def test_non_finite_entries_make_pixels_invalid():
    # NaN and +inf make a pixel invalid (counted), and so does a pixel without any finite entry; a single -inf is a
    # probability of 0 and the pixel takes part.
    log_p = random_log_p(1, 19, 100)
    log_p[0, 3, 10] = float("nan")
    log_p[0, 0, 20] = float("inf")
    log_p[0, 5, 30] = -float("inf")
    log_p[0, :, 40] = -float("inf")
    plan, stats = sinkhorn(log_p, iters=50)
    assert stats["nonfinite"] == 3 and stats["invalid"] == 3
    rows = torch.ones(1, 100, dtype=torch.bool)
    rows[0, [10, 20, 40]] = False
    assert_sane(plan, rows)
    assert plan[0, 5, 30] < 1e-30  # like a logit far below the others: at most the exponent floor
    targets, gate, _ = ot_pseudo_labels(log_p * 10)
    assert not gate[0, [10, 20, 40]].any() and torch.isfinite(targets).all()


def test_extreme_logits_converge_without_overflow():
    # Logits spanning thousands: the converged uniform plan must move mass to classes whose kernel
    # entries are far below float32's range, which needs the log-domain fallback.
    logits = torch.zeros(1, 4, 40)
    logits[0, 0] = 3000.0
    logits[0, 1, :20] = 1500.0
    for x in (logits.log_softmax(1), logits):  # log-probabilities and the logits themselves
        plan, stats = sinkhorn(x, iters=5000, tol=1e-6, class_marginal="uniform")
        assert_sane(plan, torch.ones(1, 40, dtype=torch.bool))
        assert stats["marginal_error"] < 1e-5
        assert torch.allclose(plan.mean(2), torch.full((1, 4), 0.25), atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    log_p = random_log_p(2, 5, 16)
    with pytest.raises(ValueError, match="scope"):
        sinkhorn(log_p, scope="global")
    with pytest.raises(ValueError, match="class_marginal"):
        sinkhorn(log_p, class_marginal="balanced")
    with pytest.raises(ValueError, match="class_marginal"):
        sinkhorn(log_p, class_marginal=torch.ones(4))
    with pytest.raises(ValueError, match="valid"):
        sinkhorn(log_p, torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="start"):
        sinkhorn(log_p, start="ones")


def test_masks_must_be_bool():
    # valid: True = a pixel that takes part; gate: True = a pixel trained on. A float or uint8 mask could point
    # either way (an ignore mask, a padding mask), so it is refused with a one-line message, not converted.
    log_p = random_log_p(2, 5, 16)
    for dtype in (torch.float32, torch.uint8, torch.int64):
        mask = torch.ones(2, 16, dtype=dtype)
        for call in (lambda: sinkhorn(log_p, mask), lambda: ot_pseudo_labels(log_p, mask)):
            with pytest.raises(ValueError, match=r"valid must be a bool tensor, True = a pixel that takes part") as e:
                call()
            assert "\n" not in str(e.value) and str(dtype) in str(e.value)
        with pytest.raises(ValueError, match=r"gate must be a bool tensor, True = a pixel trained on"):
            soft_cross_entropy(torch.randn(2, 5, 16), log_p.exp(), mask)
    ignore = torch.zeros(2, 16, dtype=torch.bool)
    ignore[:, :4] = True
    plan, stats = sinkhorn(log_p, ~ignore)  # the docstring's advice: invert an ignore mask
    assert stats["invalid"] == 8 and (plan[:, :, :4] == 0).all()


# ---------------------------------------------------------------------------------------------------
# Gate and loss


def test_ot_pseudo_labels_gate_and_targets():
    logits = torch.randn(2, 19, 12, 12) * 6
    valid = torch.rand(2, 12, 12) > 0.1
    targets, gate, stats = ot_pseudo_labels(logits, valid, conf_thresh=0.9, class_marginal="present")
    conf = logits.softmax(1).amax(1)
    assert torch.equal(gate, (conf >= 0.9) & valid)
    assert abs(stats["mask_ratio"] - gate.float().mean().item()) < 1e-7
    assert_sane(targets.flatten(2), valid.flatten(1))


def test_soft_cross_entropy():
    student = torch.randn(2, 5, 4, 4, requires_grad=True)
    targets = torch.softmax(torch.randn(2, 5, 4, 4), 1)
    gate = torch.rand(2, 4, 4) > 0.5
    loss = soft_cross_entropy(student, targets, gate)
    expected = -(targets * student.log_softmax(1)).sum(1)[gate].mean()
    assert torch.allclose(loss, expected)
    # hard one-hot targets reduce to F.cross_entropy over the gated pixels
    label = targets.argmax(1)
    hard = torch.nn.functional.one_hot(label, 5).permute(0, 3, 1, 2).float()
    ce = torch.nn.functional.cross_entropy(student, label.masked_fill(~gate, 255), ignore_index=255)
    assert torch.allclose(soft_cross_entropy(student, hard, gate), ce, atol=1e-6)
    # nothing gated: exactly 0, and backward still works
    zero = soft_cross_entropy(student, targets, torch.zeros_like(gate))
    zero.backward()
    assert zero.item() == 0 and student.grad is not None and (student.grad == 0).all()


# ---------------------------------------------------------------------------------------------------
# Distributed: collectives only with an explicit group. Two gloo ranks with group=WORLD equal one process solving
# the joined batch; with group=None each rank solves its own pixels, and no collective happens.

DIST_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, datetime, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    from ot import ot_pseudo_labels, sinkhorn, soft_cross_entropy
    from tests.test_ot import EXTREME_MARGINAL, extreme_batch, loss_inputs
    rank, store = int(sys.argv[1]), sys.argv[2]
    # a collective that one rank alone enters fails after 30 s instead of hanging
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    world = dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    log_p = (torch.randn(4, 19, 300, generator=g) * 3).log_softmax(1)
    valid = torch.rand(4, 300, generator=g) > 0.3
    mine = slice(2 * rank, 2 * rank + 2)
    for marginal in ("present", "uniform"):
        plan, stats = sinkhorn(log_p[mine], valid[mine], class_marginal=marginal, iters=5, group=world)
        torch.save(plan, f"{store}.{marginal}.{rank}.pt")
    # only rank 0's pixels need log-domain pixel steps; both ranks must take them at the same iterations
    plan, stats = sinkhorn(extreme_batch()[mine], iters=20, class_marginal=EXTREME_MARGINAL, group=world)
    torch.save(plan, f"{store}.extreme.{rank}.pt")
    # a group of its own per rank: each rank solves its own images alone (every rank creates every group)
    alone = [dist.new_group([r]) for r in range(2)]
    plan, stats = sinkhorn(log_p[mine], valid[mine], iters=5, group=alone[rank])
    torch.save(plan, f"{store}.group.{rank}.pt")
    # soft_cross_entropy with the group: a scalar weight shared by both ranks stands in for the model under DDP
    student, targets, gate = loss_inputs()
    w = torch.ones((), requires_grad=True)
    loss = soft_cross_entropy(student[mine] * w, targets[mine], gate[mine], group=world)
    loss.backward()
    torch.save(torch.stack([loss.detach(), w.grad]), f"{store}.loss.{rank}.pt")
    # group=None under an initialised process group: no collective, so rank 0 calls alone and returns while
    # rank 1 waits for its file (a collective in there would fail after 30 s, and rank 1 gives up after 60 s)
    if rank == 0:
        plan, _ = sinkhorn(log_p[mine], valid[mine], iters=5)
        targets_none, gate_none, _ = ot_pseudo_labels(log_p[mine], valid[mine])
        loss = soft_cross_entropy(student[mine], targets[mine], gate[mine])
        torch.save([plan, targets_none, gate_none, loss], f"{store}.none.tmp")
        os.rename(f"{store}.none.tmp", f"{store}.none.0.pt")
    else:
        deadline = time.time() + 60
        while not os.path.exists(f"{store}.none.0.pt"):
            assert time.time() < deadline, "rank 0 did not return from its calls with group=None"
            time.sleep(0.05)
    dist.barrier()
    dist.destroy_process_group()
    """
)


# A class marginal that is almost 0 for class 0, which only images 0 and 1 are sure of at a few pixels: the
# scalings of those pixels leave the exp domain and their pixel steps fall back to the log domain (12 times
# in 20 iterations), on the rank that holds them only.
EXTREME_MARGINAL = torch.tensor([1e-36, 1.0, 1.0, 1.0])


def extreme_batch() -> torch.Tensor:
    """(4, 4, 40) log-probabilities: images 0 and 1 hold 10 pixels each that are sure of class 0."""
    logits = torch.randn(4, 4, 40, generator=torch.Generator().manual_seed(1))
    logits[:2, 0, :10] += 50.0
    return logits.log_softmax(1)


def loss_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits (4, 19, 300), soft targets (4, 19, 300) and a gate (4, 300) that passes ~70 % of the pixels of
    images 0-1 (rank 0) and ~10 % of images 2-3 (rank 1), so that per-rank means differ from the global mean."""
    g = torch.Generator().manual_seed(2)
    student = torch.randn(4, 19, 300, generator=g)
    targets = torch.randn(4, 19, 300, generator=g).mul(3).softmax(1)
    share = torch.tensor([0.7, 0.7, 0.1, 0.1])[:, None]  # (4, 1)
    return student, targets, torch.rand(4, 300, generator=g) < share


def test_collectives_across_two_gloo_ranks(tmp_path):
    store = str(tmp_path / "store")
    script = tmp_path / "worker.py"
    script.write_text(DIST_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), store, str(ROOT)], env=clean_env()) for r in range(2)]
    try:
        assert all(p.wait(timeout=150) == 0 for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    g = torch.Generator().manual_seed(0)
    log_p = (torch.randn(4, 19, 300, generator=g) * 3).log_softmax(1)
    valid = torch.rand(4, 300, generator=g) > 0.3
    load = lambda name: torch.load(f"{store}.{name}.pt", weights_only=True)
    # group=WORLD: one problem over both ranks' pixels
    for marginal in ("present", "uniform"):
        joined, _ = sinkhorn(log_p, valid, class_marginal=marginal, iters=5)
        assert torch.allclose(torch.cat([load(f"{marginal}.{r}") for r in range(2)]), joined, atol=1e-6)
    joined, _ = sinkhorn(extreme_batch(), iters=20, class_marginal=EXTREME_MARGINAL)
    assert torch.allclose(torch.cat([load(f"extreme.{r}") for r in range(2)]), joined, atol=1e-5)
    # a group per rank, and group=None (rank 0 alone): each rank's own images solved alone
    joined, _ = sinkhorn(log_p, valid, iters=5)
    alone = [sinkhorn(log_p[2 * r : 2 * r + 2], valid[2 * r : 2 * r + 2], iters=5)[0] for r in range(2)]
    for r in range(2):
        assert torch.allclose(load(f"group.{r}"), alone[r], atol=1e-6)
        assert not torch.allclose(alone[r], joined[2 * r : 2 * r + 2], atol=1e-3)  # so the group made the difference
    plan_none, targets_none, gate_none, loss_none = torch.load(f"{store}.none.0.pt", weights_only=True)
    assert torch.allclose(plan_none, alone[0], atol=1e-6)
    targets_alone, gate_alone, _ = ot_pseudo_labels(log_p[:2], valid[:2])
    assert torch.allclose(targets_none, targets_alone, atol=1e-6) and torch.equal(gate_none, gate_alone)
    # soft_cross_entropy: the ranks' values average to the global mean, and so do the gradients (as DDP averages them)
    student, targets, gate = loss_inputs()
    w = torch.ones((), requires_grad=True)
    global_mean = soft_cross_entropy(student * w, targets, gate)
    global_mean.backward()
    loss, grad = torch.stack([load(f"loss.{r}") for r in range(2)]).mean(0)
    assert torch.allclose(loss, global_mean.detach(), atol=1e-6) and torch.allclose(grad, w.grad, atol=1e-6)
    local = [soft_cross_entropy(student[2 * r : 2 * r + 2], targets[2 * r : 2 * r + 2], gate[2 * r : 2 * r + 2]) for r in range(2)]
    assert not torch.allclose(torch.stack(local).mean(), global_mean.detach(), atol=1e-3)  # the count made the difference
    assert torch.allclose(loss_none, local[0], atol=1e-6)  # group=None: the per-rank mean


def test_gate_on_plan_gates_the_ot_rows():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 6, 6) * 5
    targets, gate_teacher, _ = ot_pseudo_labels(logits, conf_thresh=0.9, beta=0.5, class_marginal="uniform")
    _, gate_plan, _ = ot_pseudo_labels(logits, conf_thresh=0.9, gate_on="plan", beta=0.5, class_marginal="uniform")
    assert torch.equal(gate_teacher, logits.softmax(1).amax(1) >= 0.9)
    assert torch.equal(gate_plan, targets.amax(1) >= 0.9)
    assert not torch.equal(gate_plan, gate_teacher)
    with pytest.raises(ValueError, match="gate_on"):
        ot_pseudo_labels(logits, gate_on="student")


# ---------------------------------------------------------------------------------------------------
# The traps a copier falls into: each is correct or a one-line ValueError naming the argument


def one_line_error(match: str, call) -> str:
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_minus_inf_log_probabilities_give_the_logits_plan():
    # softmax().log() of a confident teacher: -inf wherever a class underflows, at the most confident pixels.
    x = torch.randn(2, 7, 16, 16, generator=torch.Generator().manual_seed(0)) * 30
    log_p = x.softmax(1).log()
    assert torch.isinf(log_p).any(1).sum() > 50
    targets, gate, stats = ot_pseudo_labels(x)
    targets_lp, gate_lp, stats_lp = ot_pseudo_labels(log_p)
    assert stats_lp["invalid"] == 0 and stats_lp["nonfinite"] == 0
    assert torch.equal(gate, gate_lp) and int(gate.sum()) > 300
    assert (targets - targets_lp).abs().max() < 1e-5
    for marginal in ("present", "uniform"):
        for start in ("reference", "uniform"):
            plan, _ = sinkhorn(x, class_marginal=marginal, start=start, iters=20)
            plan_lp, _ = sinkhorn(log_p, class_marginal=marginal, start=start, iters=20)
            assert (plan - plan_lp).abs().max() < 1e-5, (marginal, start)
    assert (sinkhorn_textbook(log_p.double()) - sinkhorn_textbook(x.double())).abs().max() < 1e-5  # log_p rounded
    # a class at -inf on every pixel has probability 0: no share of a uniform or a given marginal, no NaN
    log_p[:, 3] = -math.inf
    for marginal in ("uniform", torch.ones(7)):
        plan, stats = sinkhorn(log_p, beta=1.0, class_marginal=marginal, iters=5000, tol=1e-6)
        assert torch.isfinite(plan).all() and plan[:, 3].max() < 1e-30 and stats["converged"]
        assert torch.allclose(plan.mean((0, 2, 3))[[0, 1, 2, 4, 5, 6]], torch.full((6,), 1 / 6), atol=1e-5)


def test_probabilities_are_refused():
    logits = torch.randn(2, 19, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    for probs in (logits.softmax(1), logits.softmax(1).bfloat16(), logits.double().softmax(1)):
        for call in (lambda: sinkhorn(probs), lambda: ot_pseudo_labels(probs)):
            assert "probs.log()" in one_line_error("logits look like probabilities", call)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[0, 0, 0] = False
    probs = logits.softmax(1)
    probs[0, :, 0, 0] = 7.0  # a padded pixel does not hide them
    one_line_error("logits look like probabilities", lambda: sinkhorn(probs, valid))
    # their log is accepted, and so are logits in [0, 1] that do not sum to 1 and Mask2Former-like scores
    assert torch.allclose(sinkhorn(logits.softmax(1).log())[0], sinkhorn(logits)[0], atol=1e-5)
    sinkhorn(torch.rand(2, 19, 8, 8))
    scores = mask2former_like(2, 19, side=8).exp() * torch.rand(2, 1, 64) * 2  # (B, K, N) in [0, 2], sums vary
    sinkhorn(scores)


def test_autocast_changes_nothing():
    # Under CPU bf16 autocast the solver's matrix products, the gate and the loss stay in float32 (before: plan
    # entries moved by up to 7e-3 here, the loss by 2e-3).
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 19, 32, 32, generator=g) * 5
    student = torch.randn(4, 19, 32, 32, generator=g)
    targets, gate, _ = ot_pseudo_labels(logits)
    plain = (sinkhorn(logits, class_marginal="uniform", iters=10)[0], targets, gate,
             soft_cross_entropy(student, targets, gate))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        targets_a, gate_a, _ = ot_pseudo_labels(logits)
        under = (sinkhorn(logits, class_marginal="uniform", iters=10)[0], targets_a, gate_a,
                 soft_cross_entropy(student, targets_a, gate_a))
    for name, p, q in zip(("sinkhorn", "targets", "gate", "loss"), plain, under):
        assert p.dtype == q.dtype, name
        assert (p.double() - q.double()).abs().max() <= 1e-6, name
    textbook = sinkhorn_textbook(logits.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (sinkhorn_textbook(logits.double()) - textbook).abs().max() <= 1e-6
    loss64 = soft_cross_entropy(student.double(), targets.double(), gate)
    assert loss64.dtype == torch.float64 and abs(float(loss64) - float(plain[3])) < 1e-5


def test_soft_cross_entropy_checks_shapes_and_dtypes():
    student = torch.randn(2, 5, 4, 4)
    targets = student.softmax(1)
    gate = torch.ones(2, 4, 4, dtype=torch.bool)
    cases = {
        "gate": [torch.ones(4, 4, dtype=torch.bool), torch.ones(1, dtype=torch.bool), gate[:, :, :1], gate.float()],
        "targets": [targets[:, :, :1, :1], targets[:1], targets.argmax(1), targets.argmax(1, keepdim=True).expand_as(targets)],
        "student_logits": [student.long(), student[0, 0, 0]],
    }
    for name, bad in cases.items():
        for value in bad:
            args = {"student_logits": student, "targets": targets, "gate": gate, name: value}
            one_line_error(name, lambda: soft_cross_entropy(args["student_logits"], args["targets"], args["gate"]))
    assert torch.allclose(soft_cross_entropy(student, targets, gate), -(targets * student.log_softmax(1)).sum(1).mean())


@pytest.mark.parametrize("name, value", [("beta", -1.0), ("beta", 0.0), ("beta", math.nan), ("beta", math.inf),
                                         ("iters", 0), ("iters", 2.5), ("tol", -1.0), ("min_prob", -1.0),
                                         ("min_prob", 2.0), ("conf_thresh", 95.0), ("conf_thresh", -0.1)])
def test_ranges_are_checked(name, value):
    log_p = random_log_p(2, 5, 16)
    calls = {"ot_pseudo_labels": lambda: ot_pseudo_labels(log_p, **{name: value})}
    if name != "conf_thresh":
        calls["sinkhorn"] = lambda: sinkhorn(log_p, **{name: value})
    if name in ("beta", "iters", "min_prob"):
        calls["sinkhorn_textbook"] = lambda: sinkhorn_textbook(log_p, **{name: value})
    for caller, call in calls.items():
        assert one_line_error(f"{caller}: {name} must be", call).endswith(repr(value))


def test_tensor_arguments_are_checked():
    log_p = random_log_p(2, 5, 16)
    for fn in (sinkhorn, ot_pseudo_labels, sinkhorn_textbook):
        one_line_error("logits must be a float tensor", lambda: fn(log_p.argmax(1, keepdim=True).expand(2, 5, 16)))
        one_line_error("logits must be a torch.Tensor", lambda: fn(log_p.numpy()))
        one_line_error(r"valid must have shape \(2, 16\)", lambda: fn(log_p, torch.ones(16, dtype=torch.bool)))
        one_line_error("class_marginal tensor must be real with shape", lambda: fn(log_p, class_marginal=torch.ones(2, 5)))
        one_line_error("class_marginal must be finite", lambda: fn(log_p, class_marginal=-torch.ones(5)))
    # a (B, K) marginal with scope="image" is fine
    sinkhorn(log_p, class_marginal=torch.rand(2, 5) + 0.1, scope="image")


@pytest.mark.parametrize("shape", [(0, 5, 8, 8), (2, 5, 0, 8), (2, 5, 0)])
def test_empty_inputs_give_empty_results(shape):
    logits = torch.randn(shape)
    plan, stats = sinkhorn(logits)
    assert plan.shape == shape and plan.dtype == torch.float32 and stats["iters"] == 0
    targets, gate, stats = ot_pseudo_labels(logits)
    assert targets.shape == shape and gate.shape == shape[:1] + shape[2:] and stats["mask_ratio"] == 0.0
    assert sinkhorn_textbook(logits).shape == shape
    student = torch.randn(shape, requires_grad=True)
    loss = soft_cross_entropy(student, targets, gate)
    loss.backward()
    assert loss.item() == 0.0


def test_iters_always_stops_the_loop_and_tol_only_earlier():
    log_p = random_log_p(2, 19, 200, scale=3.0)
    _, stats = sinkhorn(log_p, tol=1e-6)  # 3 iterations, the default: tol does not lift them
    assert stats["iters"] == 3 and not stats["converged"] and stats["marginal_error"] > 1e-6
    _, stats = sinkhorn(log_p, iters=10000, tol=1e-6)
    assert stats["iters"] < 10000 and stats["converged"] and stats["marginal_error"] < 2e-6
    _, stats = sinkhorn(log_p, iters=5)
    assert stats["iters"] == 5 and not stats["converged"]


def test_one_name_per_concept():
    # The input is `logits` in every public function, the class marginal `class_marginal`, the gate `gate`.
    for fn in (sinkhorn, sinkhorn_textbook, ot_pseudo_labels):
        parameters = list(inspect.signature(fn).parameters)
        assert parameters[:2] == ["logits", "valid"] and "class_marginal" in parameters, fn.__name__
    assert list(inspect.signature(soft_cross_entropy).parameters)[:3] == ["student_logits", "targets", "gate"]
    for fn in (sinkhorn, sinkhorn_textbook, ot_pseudo_labels, soft_cross_entropy):
        assert not re.search(r"^\s+(log_p|teacher_logits|b)[:,]", fn.__doc__, re.M), fn.__name__  # the old names


def test_copy_named_sense_ot_next_to_pot_passes_its_doctests(tmp_path):
    # The README's advice next to POT: copy ot.py under another name. Its examples use the module's own names.
    (tmp_path / "sense_ot.py").write_text((ROOT / "ot.py").read_text())
    assert "from ot import" not in (ROOT / "ot.py").read_text().replace("# in your code first: from ot import", "")
    run = lambda *argv: subprocess.run([sys.executable, *argv], cwd=tmp_path, env=clean_env(), capture_output=True,
                                       text=True)
    check = run("-c", "import ot, sense_ot, torch; assert 'site-packages' in ot.__file__ or 'dist-packages' in "
                      "ot.__file__, ot.__file__; print(sense_ot.sinkhorn(torch.randn(2, 19, 8, 8))[1]['iters'])")
    assert check.returncode == 0 and check.stdout.strip() == "3", check.stderr
    doctests = run("-m", "doctest", "-v", "sense_ot.py")
    assert doctests.returncode == 0, doctests.stdout[-3000:] + doctests.stderr[-3000:]
    assert " 0 failed" in doctests.stdout and "passed" in doctests.stdout
