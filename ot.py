"""Optimal-transport pseudo-labels for semantic segmentation (SENSE, ICML 2026, method:
"OT assignment for stable synthetic pseudo-labels").

This file imports torch and math only: copy it into any project. (POT, the optimal-transport library,
is also imported as `ot`: next to POT, rename this file, e.g. to `sense_ot.py`.)

    from ot import ot_pseudo_labels, soft_cross_entropy
    targets, gate, stats = ot_pseudo_labels(teacher_logits)          # (B, K, H, W), (B, H, W)
    loss_u = soft_cross_entropy(student_logits, targets, gate)

    python -c "import ot; print(ot.sinkhorn(torch.randn(2, 19, 64, 64).log_softmax(1))[1])"

The problem
-----------
One problem holds N valid pixels (one image, or the whole batch) and K classes. With teacher
log-probabilities s[n, k] the cost is c = -s, and the plan solves

    min_π  <π, c> - β H(π)      s.t.   π 1_K = a   (a_n = 1/N: every valid pixel carries equal mass)
                                       π^T 1_N = b (class marginal, Σ_k b_k = 1)

with H(π) = -Σ π log π. Its solution is π = diag(u) exp(s/β) diag(v) (Sinkhorn, Cuturi 2013); the
scalings u (N,) and v (K,) are found by alternating the two marginal constraints:

    v = b / (E^T u)        (class step)
    u = a / (E v)          (pixel step)

The pseudo-label of pixel n is row n of π renormalised to sum 1: target[n, k] = E[n,k] v_k / (E v)_n.

Symbols and shapes: B images, K classes, N pixels of one problem, spatial dims flattened to N.
  log_p  (B, K, *spatial)  teacher log-probabilities, classes on dim 1 like F.cross_entropy
  valid  (B, *spatial)     bool, False = padding / ignore
  E      (B, K, N)         kernel exp(s/β + f + g) with log-potentials f (B, N) and g (P, K)
  u, v   (B, N), (P, K)    scalings on top of E; P = B for scope="image", P = 1 for scope="batch"

The algorithm (stable and fast)
-------------------------------
1. E = exp((s - max_k s)/β - max_n(...)): every row and every column of E has an entry equal to 1, so
   no class or pixel starts with an all-zero kernel. Exponents below -80 are clamped to -80 (an entry of
   1.8e-35 next to the maxima of 1): on CPU `torch.exp` is 8-12x slower for arguments below about -87,
   which most entries are at β = 0.05.
2. Alternate class and pixel steps as matrix-vector products (two reads of E per iteration, no
   allocation of size B*K*N inside the loop). The class sums are pooled over the batch, and over all
   ranks of an initialised torch.distributed process group, when scope="batch".
3. If a scaling leaves [1e-30, 1e30] (a class or pixel whose kernel entries all underflowed, or a very
   unbalanced marginal), that step is redone exactly in the log domain (logsumexp over the original
   s) and the scalings are absorbed into the potentials f, g (Schmitzer's stabilised scaling). This
   is rare; it is what keeps the solver finite for any finite input and lets it converge on problems
   whose plan spans hundreds of orders of magnitude.
4. Stop after `iters` iterations or once the class-marginal L1 error Σ_k |π^T 1 - b| < tol. Rows of
   the plan always meet their marginal exactly (the last step is a pixel step).

Everything runs in float32 (float64 for float64 input) whatever the input or autocast dtype. Pixels
with a non-finite entry are made invalid and counted; invalid pixels get an all-zero row.

Relation to the exp-domain form of the reference code ("SwAV" form)
-------------------------------------------------------------------
The reference computes Q = exp(s/τ)^T (K x N, τ = β = 0.05) in float32 over all pixels of the batch,
divides by its total, then runs 3 sweeps of [divide each class row by its sum and by K; divide each
pixel column by its sum and by N] and returns N Q^T. That is the same Sinkhorn iteration (class step
first, uniform b) without stabilisation: exp(log p / 0.05) = p^20 leaves float32's normal range once p < 0.0126
and is 0 once p < 0.0057, so every class whose probability stays below that at all pixels drops out of
the marginal, and for K >= 178 a near-uniform pixel underflows entirely and loses all its mass (for
79 <= K < 178 it survives only through denormal numbers, on hardware that keeps them). class_marginal="present"
(b uniform over the classes whose largest probability reaches min_prob = 0.01) reproduces what the
reference effectively computes, without the underflow. Our iteration starts from the row-max
normalised kernel (all pixels weighted equally in the first class step) where the reference
starts from exp(s/τ) (pixels weighted by p_max^(1/τ)); this makes the plan invariant to adding a per-pixel
constant to s at every iteration count, and on confident pixels the two agree (tests/test_ot.py).
Note that 3 iterations are far from convergence (class-marginal error 0.06-1.6 on segmentation
outputs) and that this is the method as published; `iters` and `tol` are yours to change.

Worked example (K = 2 classes, N = 2 pixels, β = 1, uniform a and b, run to convergence)
------------------------------------------------------------------------------------------
    p = [[0.9, 0.1],      pixel 0 is confident in class 0
         [0.6, 0.4]]      pixel 1 leans to class 0 as well
With β = 1 the kernel is p itself. A 2x2 plan with marginals (1/2, 1/2) is [[x, 1/2-x], [1/2-x, x]],
and the entropic optimum keeps the kernel's cross ratio: x^2 / (1/2-x)^2 = (0.9*0.4)/(0.1*0.6) = 6,
so x = √6 / (2(1+√6)) = 0.35505. Renormalised rows:
    target = [[0.7101, 0.2899],
              [0.2899, 0.7101]]
Balancing the classes moves pixel 1, the less confident one, to class 1.

Reference: M. Cuturi, "Sinkhorn Distances", NeurIPS 2013; B. Schmitzer, "Stabilized Sparse Scaling
Algorithms for Entropy Regularized Transport Problems", SIAM J. Sci. Comput. 2019.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

SAFE = 1e30  # scalings outside [1/SAFE, SAFE] are absorbed into the log-potentials (step 3 above)
# Exponents are clamped here before exp: the result (1.8e-35, 5e-305) is negligible next to the row and
# column maxima of 1, and below about -87 torch.exp on CPU takes a slow path (denormal results).
LOG_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _pool(t: torch.Tensor, pooled: bool, op: str) -> torch.Tensor:
    """Reduce per-image class quantities (B, K) to per-problem ones (P, K); all-reduce across ranks
    when pooled. Every rank calls this at the same points, whatever its data."""
    if not pooled:
        return t
    t = t.sum(0, keepdim=True) if op == "sum" else t.amax(0, keepdim=True)  # (1, K)
    if _dist_on():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def _log_kernel(s: torch.Tensor, mask: torch.Tensor, beta: float, dtype: torch.dtype) -> torch.Tensor:
    """s/β in `dtype` with invalid pixels set to -inf.  (B, K, N)"""
    x = s.to(dtype) * (1.0 / beta)
    return x.masked_fill_(~mask[:, None, :], -math.inf)


def _class_sums(x: torch.Tensor, u: torch.Tensor, pooled: bool) -> torch.Tensor:
    """E^T u per problem: (B, K, N), (B, N) -> (P, K). One matrix-vector product per image: on CPU
    torch.mv reads E once, where a batched bmm against a (B, N, 1) operand is ~3x slower."""
    c = torch.stack([torch.mv(x[i], u[i]) for i in range(x.shape[0])])  # (B, K)
    return _pool(c, pooled, "sum")


def _lse(x: torch.Tensor, dim: int, pooled: bool, log_floor: float) -> torch.Tensor:
    """In-place x <- exp(x - max) along dim; returns the max (finite) so that the caller can rescale.
    For dim = 2 (pixels) the max is pooled over the problem."""
    m = x.amax(dim, keepdim=True)  # (B, K, 1) or (B, 1, N)
    if dim == 2:
        m = _pool(m[..., 0], pooled, "max")[..., None].expand(x.shape[0], -1, 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf: nothing valid, keep 0
    x.sub_(m).clamp_(min=log_floor).exp_()
    return m


def sinkhorn(
    log_p: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    beta: float = 0.05,
    iters: int = 3,
    tol: float | None = None,
    class_marginal: str | torch.Tensor = "uniform",
    min_prob: float = 0.01,
    scope: str = "image",
) -> tuple[torch.Tensor, dict]:
    """Entropy-regularised OT between pixels and classes; returns the plan renormalised per pixel.

    Args:
        log_p: (B, K, *spatial) teacher log-probabilities, any float dtype.
        valid: (B, *spatial) bool, False for padded/ignored pixels (default: all valid).
        beta: entropic regularisation β (paper: 0.05).
        iters: maximum number of Sinkhorn iterations (reference code: 3).
        tol: stop early once the class-marginal L1 error is below tol (default: never).
        class_marginal: "uniform" over K, "present" (uniform over classes whose largest probability
            over the problem's valid pixels is >= min_prob; uniform over all if none is), or a
            non-negative (K,) or (B, K) tensor (normalised per problem).
        min_prob: threshold of "present".
        scope: "image" (one problem per image) or "batch" (one problem over every valid pixel of the
            batch, and of all ranks when a torch.distributed process group is initialised).

    Returns:
        plan: (B, K, *spatial) float32 (float64 for float64 input); rows of valid pixels sum to 1,
            invalid pixels are all 0.
        stats: dict with "iters" (iterations run), "marginal_error" (class-marginal L1 error of the
            final plan, max over problems), "invalid" (invalid pixels, non-finite ones included) and
            "nonfinite" (pixels with a non-finite entry).
    """
    if log_p.dim() < 2 or not log_p.is_floating_point():
        raise ValueError(f"sinkhorn: log_p must be a float tensor (B, K, *spatial), got {tuple(log_p.shape)} {log_p.dtype}")
    if scope not in ("image", "batch"):
        raise ValueError(f"sinkhorn: scope must be 'image' or 'batch', got {scope!r}")
    if beta <= 0 or iters < 1:
        raise ValueError(f"sinkhorn: need beta > 0 and iters >= 1, got beta={beta}, iters={iters}")
    B, K = log_p.shape[:2]
    dtype = torch.float64 if log_p.dtype == torch.float64 else torch.float32
    tiny = torch.finfo(dtype).tiny
    log_floor = LOG_FLOOR[dtype]
    pooled = scope == "batch"
    s = log_p.detach().reshape(B, K, -1)  # (B, K, N) view
    N = s.shape[-1]

    # Validity: user mask and finite rows. NaN propagates through amax and ±inf shows in amax/amin.
    if valid is not None and tuple(valid.shape) != (B,) + tuple(log_p.shape[2:]):
        raise ValueError(f"sinkhorn: valid must have shape {(B,) + tuple(log_p.shape[2:])}, got {tuple(valid.shape)}")
    row_max = s.amax(1).to(dtype)  # (B, N)
    finite = torch.isfinite(row_max) & torch.isfinite(s.amin(1))  # (B, N)
    mask = finite if valid is None else finite & valid.reshape(B, -1).to(finite.device, torch.bool)
    any_invalid = not bool(mask.all())
    row_max = torch.where(mask, row_max, torch.zeros_like(row_max))

    # Pixel marginal a: uniform over the problem's valid pixels.
    count = _pool(mask.sum(1, keepdim=True).to(dtype), pooled, "sum")  # (P, 1)
    a = mask.to(dtype) / count.clamp_min(1).expand(B, 1)  # (B, N)
    b = _class_marginal(class_marginal, s, mask, min_prob, pooled, B, K, dtype)  # (P, K)
    b = b * (count > 0)  # a problem without valid pixels carries no mass at all

    # 1. Kernel with row max 1 (per-pixel constants drop out) and column max 1 (no empty class).
    x = torch.add(row_max[:, None, :] * (-1.0 / beta), s, alpha=1.0 / beta)  # (B, K, N) float32
    if any_invalid:
        x.masked_fill_(~mask[:, None, :], -math.inf)
    f = -row_max / beta  # (B, N) log-potential of the pixels, in units of s/β
    g = -_lse(x, 2, pooled, log_floor)[:, :, 0]  # (B, K); x is now E = exp(s/β + f + g)
    g = g[:1] if pooled else g  # (P, K): one class potential per problem

    u = mask.to(dtype)  # (B, N) start: every valid pixel weighted 1
    v = torch.zeros_like(b)
    err = None
    it = 0
    for it in range(1, iters + 1):
        # 2a. class step: v = b / (E^T u)
        c = _class_sums(x, u, pooled)  # (P, K)
        if it > 1:
            err = (v * c - b).abs().sum(1)  # (P,) class-marginal error of the current plan
            if tol is not None and float(err.max()) < tol:
                it -= 1
                break
        v = b / c.clamp_min(tiny)
        if not _in_range(v, b, False):  # v is the same on every rank: no collective needed
            f = f + torch.log(u)  # absorb u, redo the class step in the log domain (3.)
            x = _log_kernel(s, mask, beta, dtype).add_(f[:, None, :])
            m = _lse(x, 2, pooled, log_floor)[:, :, 0]  # (B, K)
            c = _pool(x.sum(2), pooled, "sum")  # (P, K)
            g = torch.log(b) - m[: g.shape[0]] - torch.log(c.clamp_min(tiny))
            x.mul_((b / c.clamp_min(tiny)).expand(B, K)[:, :, None])  # E = exp(s/β + f + g)
            u, v = torch.ones_like(u), torch.ones_like(b)
        # 2b. pixel step: u = a / (E v)
        r = torch.bmm(v.expand(B, K)[:, None, :], x)[:, 0, :]  # (B, N)
        u = a / r.clamp_min(tiny)
        if not _in_range(u, a, pooled):  # u is per pixel: every rank of a problem decides together
            g = g + torch.log(v)  # absorb v, redo the pixel step in the log domain (3.)
            x = _log_kernel(s, mask, beta, dtype).add_(g.expand(B, K)[:, :, None])
            m = _lse(x, 1, pooled, log_floor)[:, 0, :]  # (B, N)
            r = x.sum(1)  # (B, N)
            f = torch.log(a) - m - torch.log(r.clamp_min(tiny))
            x.mul_((a / r.clamp_min(tiny))[:, None, :])
            u, v = torch.ones_like(u), torch.ones_like(b)
            r = a.clone()  # rows of E v now sum to a
    if err is None or it == iters:
        c = _class_sums(x, u, pooled)  # (P, K)
        err = (v * c - b).abs().sum(1)

    # 4. Plan renormalised per pixel, computed in place: target[n, k] = E[n, k] v_k / (E v)_n.
    plan = x.mul_(v.expand(B, K)[:, :, None]).div_(r.clamp_min(tiny)[:, None, :])
    if any_invalid:
        # Clamping before exp turned the -inf of invalid pixels into exp(LOG_FLOOR) (u = 0 kept them
        # out of every sum); their rows are zero by contract.
        plan.masked_fill_(~mask[:, None, :], 0.0)
    n_invalid = int((~mask).sum())
    stats = {
        "iters": it,
        "marginal_error": float(err.max()) if err.numel() else 0.0,
        "invalid": n_invalid,
        "nonfinite": int((~finite).sum()),
    }
    return plan.reshape(log_p.shape), stats


def _in_range(scale: torch.Tensor, target: torch.Tensor, pooled: bool) -> bool:
    """Scalings are usable in the exp domain when <= SAFE, and >= 1/SAFE where mass is due (NaN fails both).
    When pooled, the answer is shared across ranks (an all-reduce every rank calls), so that all of them take
    the log-domain step together and keep one class potential g."""
    lowest = torch.where(target > 0, scale, SAFE).amin()
    bad = ~((scale.amax() <= SAFE) & (lowest >= 1.0 / SAFE))
    return not bool(_pool(bad.to(scale.dtype).reshape(1, 1), pooled, "max") > 0)


def _class_marginal(spec, s, mask, min_prob, pooled, B, K, dtype) -> torch.Tensor:
    """The class marginal b (P, K), each row summing to 1."""
    P = 1 if pooled else B
    if isinstance(spec, torch.Tensor):
        b = spec.detach().to(s.device, dtype)
        if b.shape == (K,):
            b = b.expand(P, K)
        elif b.shape != (B, K) or pooled:
            raise ValueError(f"sinkhorn: class_marginal tensor must be (K,) = ({K},) or, for scope='image', (B, K) = ({B}, {K}); got {tuple(b.shape)}")
        if not torch.isfinite(b).all() or (b < 0).any() or (b.sum(1) <= 0).any():
            raise ValueError("sinkhorn: class_marginal must be finite, non-negative and not all zero")
        return b / b.sum(1, keepdim=True)
    if spec == "uniform":
        return torch.full((P, K), 1.0 / K, dtype=dtype, device=s.device)
    if spec != "present":
        raise ValueError(f"sinkhorn: class_marginal must be 'uniform', 'present' or a tensor, got {spec!r}")
    # Largest probability of each class over the problem's valid pixels, from the normalised
    # log-probabilities log_softmax(s) (one image at a time to keep memory at one image).
    best = torch.full((B, K), -math.inf, dtype=dtype, device=s.device)
    for i in range(B):
        si = s[i].to(dtype)  # (K, N)
        log_pi = si - torch.logsumexp(si, 0, keepdim=True)
        log_pi = log_pi.masked_fill(~mask[i][None, :], -math.inf)
        best[i] = log_pi.amax(1) if si.shape[1] else best[i]
    best = _pool(best, pooled, "max")  # (P, K)
    present = (best >= math.log(min_prob)).to(dtype)
    present = torch.where(present.sum(1, keepdim=True) > 0, present, torch.ones_like(present))
    return present / present.sum(1, keepdim=True)


def ot_pseudo_labels(
    teacher_logits: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    conf_thresh: float = 0.95,
    gate_on: str = "teacher",
    **sinkhorn_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Soft OT targets and the confidence gate of SENSE's synthetic branch.

    Args:
        teacher_logits: (B, K, *spatial) teacher logits (any float dtype).
        valid: (B, *spatial) bool, False for padding (default: all valid).
        conf_thresh: γ; a pixel is supervised when the teacher's softmax maximum is >= γ (paper: 0.95).
        gate_on: "teacher" (the paper: γ on the teacher's softmax, before OT) or "plan" (γ on the maximum
            of the pixel's renormalised OT plan row, so that OT decides which pixels are trained on).
        **sinkhorn_kwargs: beta, iters, tol, class_marginal, min_prob, scope (see `sinkhorn`).

    Returns:
        targets: (B, K, *spatial) float32 OT plan rows (sum 1 on valid pixels).
        gate: (B, *spatial) bool, confident and valid pixels.
        stats: sinkhorn's stats plus "mask_ratio" (gated share of all pixels).
    """
    dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    log_p = F.log_softmax(teacher_logits.detach().to(dtype), dim=1)  # (B, K, *spatial)
    conf = log_p.amax(1).exp()  # (B, *spatial); NaN for non-finite rows, which fails the gate
    if gate_on not in ("teacher", "plan"):
        raise ValueError(f"ot_pseudo_labels: gate_on must be 'teacher' or 'plan', got {gate_on!r}")
    targets, stats = sinkhorn(log_p, valid, **sinkhorn_kwargs)
    gate = (conf if gate_on == "teacher" else targets.amax(1)) >= conf_thresh
    if valid is not None:
        gate &= valid.to(torch.bool)
    gate &= targets.sum(1) > 0  # pixels that sinkhorn made invalid (non-finite) are never supervised
    stats["mask_ratio"] = float(gate.float().mean()) if gate.numel() else 0.0
    return targets, gate, stats


def soft_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Mean over gated pixels of -Σ_k target_k log softmax(student)_k.

    Args:
        student_logits: (B, K, *spatial) logits of the strong view.
        targets: (B, K, *spatial) soft targets (rows sum to 1 where gated).
        gate: (B, *spatial) bool.

    Returns:
        Scalar tensor; 0 with a gradient path to student_logits when nothing is gated.
    """
    log_q = F.log_softmax(student_logits.float(), dim=1)  # (B, K, *spatial)
    per_pixel = -(targets.to(log_q.dtype) * log_q).sum(1)  # (B, *spatial)
    # torch.where, not a product: an ungated pixel may hold 0 * -inf = NaN, which must not leak.
    per_pixel = torch.where(gate, per_pixel, torch.zeros_like(per_pixel))
    return per_pixel.sum() / gate.sum().clamp_min(1)
