"""Optimal-transport pseudo-labels for semantic segmentation (SENSE, ICML 2026, method:
"OT assignment for stable synthetic pseudo-labels").

This file imports torch and math only (Python >= 3.10): copy it into any project. (POT, the optimal-transport
library, is also imported as `ot`: next to POT, rename this file, e.g. to `sense_ot.py`.)

    >>> import torch
    >>> from ot import ot_pseudo_labels, soft_cross_entropy
    >>> teacher_logits = torch.randn(2, 19, 64, 64) * 5           # (B, K, H, W)
    >>> student_logits = torch.randn(2, 19, 64, 64, requires_grad=True)
    >>> targets, gate, stats = ot_pseudo_labels(teacher_logits, beta=0.05, iters=3, class_marginal="present",
    ...                                         scope="batch")    # train.py's DPT recipe
    >>> loss_u = soft_cross_entropy(student_logits, targets, gate)  # mean over gated pixels
    >>> loss_u.backward()

    python -c "import torch, ot; print(ot.sinkhorn(torch.randn(2, 19, 64, 64).log_softmax(1))[1])"

The problem
-----------
One problem holds N valid pixels (one image, or the whole batch) and K classes. With teacher
log-probabilities s[n, k] the cost is c = -s, and the plan solves

    min_π  <π, c> - β H(π)      s.t.   π 1_K = a   (a_n = 1/N: every valid pixel carries equal mass)
                                       π^T 1_N = b (class marginal, Σ_k b_k = 1)

with H(π) = -Σ π log π. Its solution is π = diag(u) kernel diag(v) with kernel = exp(s/β) (Sinkhorn, Cuturi
2013); the scalings u (N,) and v (K,) are found by alternating the two marginal constraints:

    v = b / (kernelᵀ u)        (class step)
    u = a / (kernel v)         (pixel step)

The pseudo-label of pixel n is row n of π renormalised to sum 1: target[n, k] = kernel[n,k] v_k / (kernel v)_n.
`sinkhorn_textbook` below is exactly these lines; `sinkhorn` is the same iteration made stable and fast.

Paper symbols -> code: c_ij = -log p_θ(j | x_i) -> -log_p; β -> beta; π -> the plan (returned with rows
renormalised); the paper's kernel K = exp(-c/β) -> `kernel` (here K is the class count); u, v -> u, v; the
uniform marginals 1/n, 1/k -> a, b (class_marginal); the confidence threshold γ -> conf_thresh; the n × k
matrix -> (B, K, N) tensors, classes on dim 1.

Shapes: B images, K classes, N pixels of one image (spatial dims flattened), P problems (P = B for
scope="image", P = 1 for scope="batch").
  log_p   (B, K, *spatial)  teacher log-probabilities (log_softmax over dim 1), like F.cross_entropy's input
  valid   (B, *spatial)     bool, False = padding / ignore
  kernel  (B, K, N)         exp(s/β + f + g), with log-potentials f (B, N) and g (P, K) that keep it in range
  u, v    (B, N), (P, K)    scalings on top of the kernel

The algorithm (stable and fast)
-------------------------------
1. kernel = exp((s - max_k s)/β - max_n(...)): every row and every column has an entry equal to 1, so no
   class or pixel starts with an all-zero kernel. Exponents below -80 are clamped to -80 (an entry of 1.8e-35
   next to the maxima of 1): on CPU `torch.exp` is 8-12x slower for arguments below about -87, which most
   entries are at β = 0.05.
2. Start (start="reference", the default): the first class step weights pixel n by u_n = exp((max_k s[n, k] -
   max over the problem of the same)/β), i.e. by p_max^(1/β) relative to the most confident pixel: on this
   kernel that is the reference code's start exp(s/β), computed without leaving float32's range.
   start="uniform" weights every pixel 1 (kept for convergence runs; with a "uniform" or tensor marginal the
   plan is then invariant to adding a per-pixel constant to s at every iteration count). Both starts converge to the same plan; at 3
   iterations they do not agree.
3. Alternate class and pixel steps as matrix-vector products (two reads of the kernel per iteration, no
   allocation of size B*K*N inside the loop). The class sums are pooled over the batch, and over all ranks of
   the process group, when scope="batch".
4. If a scaling leaves [1e-30, 1e30] (a class or pixel whose kernel entries all underflowed, or a very
   unbalanced marginal), or a class sum of the first step is below exp(LOG_FLOOR/2) = 4e-18 in float32 (start
   weights span hundreds of orders of magnitude on flat teachers, and entries at the floor could decide such a
   sum), that step is redone exactly in the log domain (logsumexp over the original s) and the scalings are
   absorbed into the potentials f, g (Schmitzer's stabilised scaling); a log-domain class step is followed by a
   log-domain pixel step. This is rare on confident teachers; it is what keeps the solver finite for any
   finite input and lets it converge on problems whose plan spans hundreds of orders of magnitude.
5. Stop after `iters` iterations or once the class-marginal L1 error Σ_k |π^T 1 - b| < tol. Rows of the plan
   always meet their marginal exactly (the last step is a pixel step).

Everything runs in float32 (float64 for float64 input) whatever the input or autocast dtype. Pixels
with a non-finite entry are made invalid and counted; invalid pixels get an all-zero row. The start and
class_marginal="present" read log_p as given (normalise it: ot_pseudo_labels does).

Distributed: with scope="batch" and an initialised torch.distributed process group, sinkhorn all-reduces
per-class sums and maxima (and one flag per step) over `group` (default: the default group), so every rank
must call it at the same point; each rank passes its own pixels and gets its own rows of the joint plan.

Relation to the exp-domain form of the reference code ("SwAV" form)
-------------------------------------------------------------------
The reference (github.com/zhang0jhon/SENSE) computes Q = exp(s/τ)^T (K x N, τ = β = 0.05) in float32 over
all pixels of the batch, divides by its total, then runs 3 sweeps of [divide each class row by its sum and by
K; divide each pixel column by its sum and by N] and returns N Q^T. That is the same Sinkhorn iteration (class
step first, uniform b) with the same start as our default, without stabilisation: exp(log p / 0.05) = p^20
leaves float32's normal range once p < 0.0126 and is 0 once p < 0.0057, so every class whose probability
stays below that at all pixels drops out of the marginal, and for K >= 178 a near-uniform pixel underflows
entirely and loses all its mass (for 79 <= K < 178 it survives only through denormal numbers, on hardware
that keeps them). class_marginal="present" (b uniform over the classes whose largest probability reaches
min_prob = 0.01) reproduces what the reference effectively computes on DPT logits, without the underflow.
With the same marginal our plan equals the reference's computed in float64 to ~1e-6 at 3 iterations, on
teachers with classes peaking at 1-10 % and on Mask2Former-like bounded scores up to K = 150
(tests/test_ot.py); start="uniform" moves rows by 0.07-0.9 there. Three iterations are far from convergence
(class-marginal error 0.06-1.6 on segmentation outputs); this is the method as published, and `iters` and
`tol` are yours to change.

What OT changes at 3 iterations
-------------------------------
With the gate on the teacher (γ = 0.95, before OT) and the DPT recipe (scope "batch", "present", β 0.05,
3 iterations), a gated pixel keeps a one-hot target on its argmax only while every class is either
confidently present somewhere in the problem or below ~1 % everywhere (as on the toy world, K = 7, where OT
changed no trained label in the toy study's runs of this recipe (docs/toy_study.md), and the gated targets
are one-hot to four decimals). A class whose largest probability over the problem lies at ~1-10 % is "present", so it is
owed a full share of the marginal, but its kernel mass is tiny: its scaling v grows by up to ~1e30 and it
takes gated pixels where its own probability is at least about half its maximum. Simulated (tests/test_ot.py
`confuser_teacher`: 4 images x 2048 pixels, 5 confident classes, 3 classes peaking at 1-10 % on a share of
the pixels; 5 seeds), the share of gated pixels whose label OT changes is 1.1-1.9 % at K = 19 and 0.7-2.3 %
at K = 150 when those classes reach 2 % of the pixels, 3.5-6.1 % and 1.5-7.0 % at 10 %, 6.2-9.6 % and
1.2-12.9 % at 30 % (start="uniform": slightly less).

Worked example (K = 2 classes, N = 2 pixels, β = 1, uniform a and b, run to convergence)
------------------------------------------------------------------------------------------
    p = [[0.9, 0.1],      pixel 0 is confident in class 0
         [0.6, 0.4]]      pixel 1 leans to class 0 as well
With β = 1 the kernel is p itself. A 2x2 plan with marginals (1/2, 1/2) is [[x, 1/2-x], [1/2-x, x]],
and the entropic optimum keeps the kernel's cross ratio: x^2 / (1/2-x)^2 = (0.9*0.4)/(0.1*0.6) = 6,
so x = √6 / (2(1+√6)) = 0.35505. Renormalised rows:

    >>> from ot import sinkhorn
    >>> p = torch.tensor([[0.9, 0.1], [0.6, 0.4]]).T[None]  # (B=1, K=2, N=2)
    >>> plan, stats = sinkhorn(p.log(), beta=1.0, iters=1000, tol=1e-9)
    >>> print(plan[0].T)  # rows = pixels
    tensor([[0.7101, 0.2899],
            [0.2899, 0.7101]])

Balancing the classes moves pixel 1, the less confident one, to class 1.

Reference: M. Cuturi, "Sinkhorn Distances", NeurIPS 2013; B. Schmitzer, "Stabilized Sparse Scaling
Algorithms for Entropy Regularized Transport Problems", SIAM J. Sci. Comput. 2019.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

SAFE = 1e30  # scalings outside [1/SAFE, SAFE] are absorbed into the log-potentials (step 4 above)
# Exponents are clamped here before exp: the result (1.8e-35, 5e-305) is negligible next to the row and
# column maxima of 1, and below about -87 torch.exp on CPU takes a slow path (denormal results).
LOG_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
# On CPU, "present" with invalid pixels reads the input in blocks of this many elements through one reused buffer.
PRESENT_BLOCK = 1 << 18


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _pool(t: torch.Tensor, pooled: bool, op: str, group=None) -> torch.Tensor:
    """Reduce per-image class quantities (B, K) to per-problem ones (P, K); all-reduce over `group` when pooled.
    Every rank calls this at the same points, whatever its data."""
    if not pooled:
        return t
    t = t.sum(0, keepdim=True) if op == "sum" else t.amax(0, keepdim=True)  # (1, K)
    if _dist_on():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return t


def _log_kernel(s: torch.Tensor, mask: torch.Tensor, beta: float, dtype: torch.dtype) -> torch.Tensor:
    """s/β in `dtype` with invalid pixels set to -inf.  (B, K, N)"""
    log_kernel = s.to(dtype) * (1.0 / beta)
    return log_kernel.masked_fill_(~mask[:, None, :], -math.inf)


def _class_sums(kernel: torch.Tensor, u: torch.Tensor, pooled: bool, group=None) -> torch.Tensor:
    """kernelᵀ u per problem: (B, K, N), (B, N) -> (P, K). One matrix-vector product per image: on CPU
    torch.mv reads the kernel once, where a batched bmm against a (B, N, 1) operand is ~3x slower."""
    c = torch.stack([torch.mv(kernel[i], u[i]) for i in range(kernel.shape[0])])  # (B, K)
    return _pool(c, pooled, "sum", group)


def _exp_minus_max_(x: torch.Tensor, dim: int, pooled: bool, log_floor: float, group=None) -> torch.Tensor:
    """In place x <- exp(max(x - max, log_floor)) along dim; returns the max (0 where nothing is finite) so that
    the caller can put it into a potential. For dim = 2 (pixels) the max is taken over the whole problem."""
    m = x.amax(dim, keepdim=True)  # (B, K, 1) or (B, 1, N)
    if dim == 2:
        m = _pool(m[..., 0], pooled, "max", group)[..., None].expand(x.shape[0], -1, 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf: nothing valid, keep 0
    x.sub_(m).clamp_(min=log_floor).exp_()
    return m


def _log_start(row_max: torch.Tensor, mask: torch.Tensor, beta: float, start: str, pooled: bool,
               group=None) -> torch.Tensor:
    """log u of the first class step, (B, N); -inf on invalid pixels, at most 0.

    "reference": (max_k s[n, k] - its maximum over the problem)/β, i.e. pixel weights p_max^(1/β) relative to
    the most confident pixel: on the row-max kernel this is the reference code's start Q = exp(s/β)/ΣQ.
    "uniform": 0, every valid pixel weighs 1."""
    if start == "uniform":
        return torch.zeros_like(row_max).masked_fill_(~mask, -math.inf)
    top = torch.where(mask, row_max, -math.inf).amax(1, keepdim=True)  # (B, 1)
    top = _pool(top, pooled, "max", group)  # (P, 1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a problem without valid pixels
    return ((row_max - top.expand(row_max.shape[0], 1)) * (1.0 / beta)).masked_fill_(~mask, -math.inf)


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
    start: str = "reference",
    group=None,
) -> tuple[torch.Tensor, dict]:
    """Entropy-regularised OT between pixels and classes; returns the plan renormalised per pixel.

    Args:
        log_p: (B, K, *spatial) teacher log-probabilities (log_softmax over dim 1), any float dtype.
        valid: (B, *spatial) bool, False for padded/ignored pixels (default: all valid).
        beta: entropic regularisation β (paper: 0.05).
        iters: maximum number of Sinkhorn iterations (reference code: 3).
        tol: stop early once the class-marginal L1 error is below tol (default: never).
        class_marginal: "uniform" over K, "present" (uniform over classes whose largest probability
            exp(log_p) over the problem's valid pixels is >= min_prob; uniform over all if none is), or a
            non-negative (K,) or (B, K) tensor (normalised per problem).
        min_prob: threshold of "present".
        scope: "image" (one problem per image) or "batch" (one problem over every valid pixel of the
            batch, and of all ranks of `group` when a torch.distributed process group is initialised: then
            every rank must call sinkhorn at the same point with the same arguments).
        start: "reference" (default: the reference code's start exp(log_p/β), pixels weighted by
            p_max^(1/β) in the first class step) or "uniform" (every valid pixel weighs 1: the start kept for
            convergence runs; with a "uniform" or tensor marginal the plan is then invariant to adding a
            per-pixel constant to log_p at any iteration count). Both converge to the same plan.
        group: torch.distributed process group of the all-reduces of scope="batch" (default: the default group).

    Returns:
        plan: (B, K, *spatial) float32 (float64 for float64 input); rows of valid pixels sum to 1,
            invalid pixels are all 0.
        stats: dict with "iters" (iterations run), "marginal_error" (class-marginal L1 error of the
            final plan, max over problems), "invalid" (invalid pixels, non-finite ones included) and
            "nonfinite" (pixels with a non-finite entry).
    """
    _check_arguments(log_p, valid, beta, iters, scope, start)
    B, K = log_p.shape[:2]
    dtype = torch.float64 if log_p.dtype == torch.float64 else torch.float32
    tiny = torch.finfo(dtype).tiny
    log_floor = LOG_FLOOR[dtype]
    pooled = scope == "batch"
    s = log_p.detach().reshape(B, K, -1)  # (B, K, N) view, N pixels of one image

    # Validity: user mask and finite rows. NaN propagates through amax and ±inf shows in amax/amin.
    row_max = s.amax(1).to(dtype)  # (B, N)
    finite = torch.ones_like(row_max, dtype=torch.bool)  # (B, N)
    if not bool(torch.isfinite(s.sum(dtype=dtype))):  # one contiguous read; only then the per-pixel test
        finite = torch.isfinite(row_max) & torch.isfinite(s.amin(1))
    mask = finite if valid is None else finite & valid.reshape(B, -1).to(finite.device, torch.bool)
    any_invalid = not bool(mask.all())
    row_max = torch.where(mask, row_max, torch.zeros_like(row_max))

    # Pixel marginal a: uniform over the problem's valid pixels.
    count = _pool(mask.sum(1, keepdim=True).to(dtype), pooled, "sum", group)  # (P, 1)
    a = mask.to(dtype) / count.clamp_min(1).expand(B, 1)  # (B, N)
    b = _class_marginal(class_marginal, s, mask, min_prob, pooled, dtype, group)  # (P, K)
    b = b * (count > 0)  # a problem without valid pixels carries no mass at all

    # 1. Kernel with row max 1 (per-pixel constants drop out) and column max 1 (no empty class).
    kernel = torch.add(row_max[:, None, :] * (-1.0 / beta), s, alpha=1.0 / beta)  # (B, K, N) log, for now
    if any_invalid:
        kernel.masked_fill_(~mask[:, None, :], -math.inf)
    f = -row_max / beta  # (B, N) log-potential of the pixels, in units of s/β
    g = -_exp_minus_max_(kernel, 2, pooled, log_floor, group)[:, :, 0]  # (B, K); kernel = exp(s/β + f + g)
    g = g[:1] if pooled else g  # (P, K): one class potential per problem

    # 2. Start: the pixel weights of the first class step.
    log_u = _log_start(row_max, mask, beta, start, pooled, group)  # (B, N)
    u = log_u.exp()  # weights below ~1e-38 may round to 0: the accuracy check of the first class step covers it
    v = torch.zeros_like(b)
    err = None
    it = 0
    for it in range(1, iters + 1):
        # 3a. class step: v = b / (kernelᵀ u)
        c = _class_sums(kernel, u, pooled, group)  # (P, K)
        if it > 1:
            err = (v * c - b).abs().sum(1)  # (P,) class-marginal error of the current plan
            if tol is not None and float(err.max()) < tol:
                it -= 1
                break
        v = b / c.clamp_min(tiny)
        # The start weights span many orders of magnitude: a class sum below exp(log_floor/2) could be decided by
        # kernel entries clamped at the floor or by weights that underflowed, so it is redone exactly (4.).
        # c and b are the same on every rank, so is this decision: no collective is needed for it.
        accurate = it > 1 or bool((torch.where(b > 0, c, 1.0) >= math.exp(log_floor / 2)).all())
        log_step = not accurate or not _in_range(v, b, False, group)
        if log_step:
            f = f + (log_u if it == 1 else torch.log(u))  # absorb u, redo the class step in the log domain (4.)
            kernel, g = _log_class_step(s, mask, f, b, beta, pooled, log_floor, group)
            u, v = torch.ones_like(u), torch.ones_like(b)
        # 3b. pixel step: u = a / (kernel v)
        r = torch.bmm(v.expand(B, K)[:, None, :], kernel)[:, 0, :]  # (B, N)
        u = a / r.clamp_min(tiny)
        # After a log-domain class step the kernel's rows are not normalised and a row may lie entirely at the
        # exponent floor, so its pixel step is taken in the log domain too (every rank alike, as log_step is).
        if log_step or not _in_range(u, a, pooled, group):
            g = g + torch.log(v)  # absorb v, redo the pixel step in the log domain (4.)
            kernel, f = _log_pixel_step(s, mask, g, a, beta, pooled, log_floor, group)
            u, v = torch.ones_like(u), torch.ones_like(b)
            r = a.clone()  # rows of kernel v now sum to a
    if err is None or it == iters:
        c = _class_sums(kernel, u, pooled, group)  # (P, K)
        err = (v * c - b).abs().sum(1)

    # Plan renormalised per pixel, computed in place: target[n, k] = kernel[n, k] v_k / (kernel v)_n.
    plan = kernel.mul_(v.expand(B, K)[:, :, None]).div_(r.clamp_min(tiny)[:, None, :])
    if any_invalid:
        # Clamping before exp turned the -inf of invalid pixels into exp(LOG_FLOOR) (u = 0 kept them
        # out of every sum); their rows are zero by contract.
        plan.masked_fill_(~mask[:, None, :], 0.0)
    stats = {"iters": it, "marginal_error": float(err.max()) if err.numel() else 0.0,
             "invalid": int((~mask).sum()), "nonfinite": int((~finite).sum())}
    return plan.reshape(log_p.shape), stats


def _check_arguments(log_p, valid, beta, iters, scope, start) -> None:
    """sinkhorn's one-line errors for arguments it cannot use."""
    if log_p.dim() < 2 or not log_p.is_floating_point():
        raise ValueError(f"sinkhorn: log_p must be a float tensor (B, K, *spatial), got {tuple(log_p.shape)} {log_p.dtype}")
    if scope not in ("image", "batch"):
        raise ValueError(f"sinkhorn: scope must be 'image' or 'batch', got {scope!r}")
    if start not in ("reference", "uniform"):
        raise ValueError(f"sinkhorn: start must be 'reference' or 'uniform', got {start!r}")
    if beta <= 0 or iters < 1:
        raise ValueError(f"sinkhorn: need beta > 0 and iters >= 1, got beta={beta}, iters={iters}")
    expected = (log_p.shape[0],) + tuple(log_p.shape[2:])
    if valid is not None and tuple(valid.shape) != expected:
        raise ValueError(f"sinkhorn: valid must have shape {expected}, got {tuple(valid.shape)}")


def _log_class_step(s, mask, f, b, beta, pooled, log_floor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The class step taken exactly in the log domain (step 4 of the algorithm), the pixel scalings already
    absorbed into f: returns the kernel exp(s/β + f + g), whose class sums are now b, and the new g (P, K)."""
    B, K = s.shape[:2]
    tiny = torch.finfo(f.dtype).tiny
    kernel = _log_kernel(s, mask, beta, f.dtype).add_(f[:, None, :])  # (B, K, N) log
    m = _exp_minus_max_(kernel, 2, pooled, log_floor, group)[:, :, 0]  # (B, K); kernel exponentiated
    c = _pool(kernel.sum(2), pooled, "sum", group)  # (P, K)
    g = torch.log(b) - m[: b.shape[0]] - torch.log(c.clamp_min(tiny))
    kernel.mul_((b / c.clamp_min(tiny)).expand(B, K)[:, :, None])
    return kernel, g


def _log_pixel_step(s, mask, g, a, beta, pooled, log_floor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel step taken exactly in the log domain, the class scalings already absorbed into g: returns the
    kernel exp(s/β + f + g), whose rows now sum to a, and the new f (B, N)."""
    B, K = s.shape[:2]
    tiny = torch.finfo(a.dtype).tiny
    kernel = _log_kernel(s, mask, beta, a.dtype).add_(g.expand(B, K)[:, :, None])  # (B, K, N) log
    m = _exp_minus_max_(kernel, 1, pooled, log_floor, group)[:, 0, :]  # (B, N); kernel exponentiated
    r = kernel.sum(1)  # (B, N)
    f = torch.log(a) - m - torch.log(r.clamp_min(tiny))
    kernel.mul_((a / r.clamp_min(tiny))[:, None, :])
    return kernel, f


def _in_range(scale: torch.Tensor, target: torch.Tensor, pooled: bool, group=None) -> bool:
    """Scalings are usable in the exp domain when <= SAFE, and >= 1/SAFE where mass is due (NaN fails both).
    When pooled, the answer is shared across ranks (an all-reduce every rank calls), so that all of them take
    the log-domain step together and keep one class potential g."""
    lowest = torch.where(target > 0, scale, SAFE).amin()
    bad = ~((scale.amax() <= SAFE) & (lowest >= 1.0 / SAFE))
    return not bool(_pool(bad.to(scale.dtype).reshape(1, 1), pooled, "max", group) > 0)


def _class_marginal(spec, s, mask, min_prob, pooled, dtype, group=None) -> torch.Tensor:
    """The class marginal b (P, K), each row summing to 1."""
    B, K = s.shape[:2]
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
    # Largest log-probability of each class over the problem's valid pixels, read from log_p as given (no
    # renormalisation: an extra exp pass would cost about a fifth of the whole call).
    best = _pool(_largest_log_prob(s, mask, dtype), pooled, "max", group)  # (P, K)
    present = (best >= (math.log(min_prob) if min_prob > 0 else -math.inf)).to(dtype)
    present = torch.where(present.sum(1, keepdim=True) > 0, present, torch.ones_like(present))
    return present / present.sum(1, keepdim=True)


def _largest_log_prob(s: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest s of each class over the valid pixels of each image, (B, K, N) -> (B, K); -inf without any.
    With invalid pixels, s is read in blocks through one reused buffer (one image at a time off the CPU):
    a fresh masked copy would cost more in page faults than the maximum itself."""
    B, K, N = s.shape
    if N and bool(mask.all()):
        return s.amax(2).to(dtype)
    best = torch.full((B, K), -math.inf, dtype=dtype, device=s.device)
    step = max(1, PRESENT_BLOCK // K) if s.device.type == "cpu" else max(1, N)
    buffer = torch.empty(K, min(step, N), dtype=s.dtype, device=s.device)  # (K, step)
    minus_inf = torch.tensor(-math.inf, dtype=s.dtype, device=s.device)
    for i in range(B):
        for j in range(0, N, step):
            cols = slice(j, j + step)
            block = buffer[:, : min(step, N - j)]  # (K, n) view
            torch.where(mask[i, None, cols], s[i, :, cols], minus_inf, out=block)  # NaN of invalid pixels too
            best[i] = torch.maximum(best[i], block.amax(1).to(dtype))
    return best


def sinkhorn_textbook(log_p: torch.Tensor, b: torch.Tensor | None = None, *, beta: float = 0.05,
                      iters: int = 3) -> torch.Tensor:
    """The same iteration as `sinkhorn` (start="reference") written as in a textbook: exp domain, one problem,
    no stabilisation. Read this one; run `sinkhorn`. In float32 at β = 0.05 its kernel underflows to 0 for
    p < 0.0057 and a pixel or class whose entries all underflow turns into NaN.

    Args:
        log_p: (K, N) log-probabilities of one problem (all pixels valid).
        b: (K,) class marginal summing to 1 (default: uniform).
        beta, iters: as in `sinkhorn`.

    Returns:
        (K, N) plan with each pixel's column renormalised to sum 1.
    """
    K, N = log_p.shape
    kernel = torch.exp(log_p / beta)  # (K, N): the paper's K = exp(-c/β) with c = -log p
    a = torch.full((N,), 1.0 / N, dtype=kernel.dtype, device=kernel.device)  # pixel marginal
    b = torch.full((K,), 1.0 / K, dtype=kernel.dtype, device=kernel.device) if b is None else b
    u = torch.ones(N, dtype=kernel.dtype, device=kernel.device)  # start: the kernel itself
    for _ in range(iters):
        v = b / (kernel @ u)  # class step: the plan's class sums become b
        u = a / (kernel.T @ v)  # pixel step: the plan's pixel sums become a
    plan = u[None, :] * kernel * v[:, None]  # (K, N): diag(v) kernel diag(u), classes first
    return plan / plan.sum(0, keepdim=True)


def ot_pseudo_labels(
    teacher_logits: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    beta: float = 0.05,
    iters: int = 3,
    class_marginal: str | torch.Tensor = "uniform",
    scope: str = "image",
    min_prob: float = 0.01,
    tol: float | None = None,
    start: str = "reference",
    conf_thresh: float = 0.95,
    gate_on: str = "teacher",
    group=None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Soft OT targets and the confidence gate of SENSE's synthetic branch.

    The defaults follow the paper's text (one problem per image, uniform marginal). train.py runs the reference
    code's recipe instead, every value passed explicitly (train.py: pseudo_targets):
      DPT:         logits of the EMA teacher; beta 0.05, iters 3, class_marginal "present", scope "batch",
                   min_prob 0.01, tol None, start "reference", conf_thresh γ = 0.95, gate_on "teacher".
      Mask2Former: its scores Σ_q softmax(class_q)[:K] · sigmoid(mask_q) passed as the logits (the reference code
                   takes their log-softmax too); the same values but class_marginal "uniform". train.py then trains
                   on hard argmax labels where the plan row's maximum is >= δ = 0.95, in images whose mean query
                   confidence is >= δ; the gate returned here is not used there.

    Args:
        teacher_logits: (B, K, *spatial) teacher logits (any float dtype).
        valid: (B, *spatial) bool, False for padding (default: all valid).
        beta, iters, class_marginal, scope, min_prob, tol, start, group: see `sinkhorn`. With scope="batch"
            and an initialised process group this runs all-reduces over `group`: every rank must call it at
            the same point.
        conf_thresh: γ; a pixel is supervised when the teacher's softmax maximum is >= γ (paper: 0.95).
        gate_on: "teacher" (the paper: γ on the teacher's softmax, before OT) or "plan" (γ on the maximum
            of the pixel's renormalised OT plan row, so that OT decides which pixels are trained on).

    Returns:
        targets: (B, K, *spatial) float32 OT plan rows (sum 1 on valid pixels).
        gate: (B, *spatial) bool, confident and valid pixels.
        stats: sinkhorn's stats plus "mask_ratio" (gated share of all pixels).
    """
    if gate_on not in ("teacher", "plan"):
        raise ValueError(f"ot_pseudo_labels: gate_on must be 'teacher' or 'plan', got {gate_on!r}")
    dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    log_p = F.log_softmax(teacher_logits.detach().to(dtype), dim=1)  # (B, K, *spatial)
    conf = log_p.amax(1).exp()  # (B, *spatial); NaN for non-finite rows, which fails the gate
    targets, stats = sinkhorn(log_p, valid, beta=beta, iters=iters, tol=tol, class_marginal=class_marginal,
                              min_prob=min_prob, scope=scope, start=start, group=group)
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
