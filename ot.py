"""Optimal-transport pseudo-labels for semantic segmentation (SENSE, ICML 2026, method:
"OT assignment for stable synthetic pseudo-labels").

This file imports torch and math only (Python >= 3.10): copy it into any project. POT, the optimal-transport
library, is also imported as `ot`: next to POT, copy this file under another name, e.g. `sense_ot.py`. The examples
below use the module's own names (doctest runs them in the module), so `python -m doctest -v sense_ot.py` checks
such a copy.

The defaults are one recipe: the DPT recipe of the reference code (github.com/zhang0jhon/SENSE), which produced the
paper's numbers — one problem over the batch (scope="batch"), a uniform marginal over the classes the teacher sees
(class_marginal="present"), β = 0.05, 3 iterations from the reference code's start, the gate γ = 0.95 on the
teacher. The paper's text (one problem per image, uniform marginal) is scope="image", class_marginal="uniform".
The input `logits` may be logits or log-probabilities: log_softmax over the classes is taken inside, and it leaves
log-probabilities unchanged, so both give the same plan; -inf in log-probabilities (softmax().log() where a class
underflows) is probability 0. Probabilities are refused with a one-line error (pass their log). The solver and the
loss run in float32 (float64 for float64 input) with autocast disabled inside, whatever the caller's autocast.

    >>> # in your code first: from ot import ot_pseudo_labels, sinkhorn, soft_cross_entropy (or from sense_ot ...)
    >>> teacher_logits = torch.randn(2, 19, 64, 64) * 5           # (B, K, H, W)
    >>> student_logits = torch.randn(2, 19, 64, 64, requires_grad=True)
    >>> targets, gate, stats = ot_pseudo_labels(teacher_logits)   # the DPT recipe
    >>> loss_u = soft_cross_entropy(student_logits, targets, gate)  # mean over gated pixels
    >>> loss_u.backward()
    >>> paper, _, _ = ot_pseudo_labels(teacher_logits, scope="image", class_marginal="uniform")  # the paper's text
    >>> plan, stats = sinkhorn(teacher_logits)                    # (B, K, H, W), the same as targets
    >>> log_p = teacher_logits.softmax(1).log()                   # log-probabilities, -inf where p underflows
    >>> bool((plan - sinkhorn(log_p)[0]).abs().max() < 1e-4)     # logits or log-probabilities: one plan
    True

No collective happens unless you pass a process group. Under torch.distributed, for one problem over every rank's
pixels and a loss averaged over every rank's gated pixels, pass the group to both calls, on every rank of it at the
same point (they all-reduce):

    group = torch.distributed.group.WORLD  # the default group (None before init_process_group: no collective)
    targets, gate, stats = ot_pseudo_labels(teacher_logits, valid, group=group)
    loss_u = soft_cross_entropy(student_logits, targets, gate, group=group)

With group=None (the default) each process solves and averages its own pixels, even under a process group.

    python -c "import torch, ot; print(ot.sinkhorn(torch.randn(2, 19, 64, 64))[1])"
    python -m doctest -v ot.py      # the examples of this file (a copy: python -m doctest -v sense_ot.py)

The problem
-----------
One problem holds N valid pixels (one image, or the whole batch) and K classes. Classes come first, as in
F.cross_entropy's input: a problem's matrices are (K, N). From the input x (logits or log-probabilities),
s = log_softmax(x) over the classes are the teacher's log-probabilities, the cost is c = -s, and the plan
π (K, N) solves

    min_π  <π, c> - β H(π)    s.t.   πᵀ 1_K = a   (pixel sums; a_n = 1/N: every valid pixel carries equal mass)
                                     π 1_N = b    (class sums: the class marginal, Σ_k b_k = 1)

with H(π) = -Σ π log π. Its solution is π = diag(v) kernel diag(u) with the (K, N) matrix kernel = exp(s/β)
(Sinkhorn; Cuturi 2013); the scalings v (K,) and u (N,) are found by alternating the two constraints:

    v = b / (kernel u)         (class step: the class sums become b)
    u = a / (kernelᵀ v)        (pixel step: the pixel sums become a)

The pseudo-label of pixel n is column n of π renormalised to sum 1:
target[k, n] = kernel[k, n] v_k / (kernelᵀ v)_n.
`sinkhorn_textbook` below is exactly these lines; `sinkhorn` is the same iteration made stable and fast.

Paper -> code: the paper writes the plan n × k (pixels × classes) and calls its kernel K = exp(-c/β), so it has
π = diag(u) K diag(v); here the plan is its transpose, (K, N), K is the class count and the kernel is `kernel`.
Otherwise the symbols are the paper's: c_ij = -log p_θ(j | x_i) -> c = -s; β -> beta; u (pixels), v (classes) ->
u, v; the uniform marginals 1/n, 1/k -> a, b (class_marginal); the confidence threshold γ -> conf_thresh.

Shapes in the code: B images, K classes, N pixels of one image (spatial dims flattened), P problems (P = B for
scope="image", P = 1 for scope="batch"); a problem's (K, N) matrix is the images' (K, N) slices side by side.
  x          (B, K, *spatial)  the input `logits`: logits or log-probabilities, any float dtype
  valid      (B, *spatial)     bool, True = a pixel that takes part (False: padding, ignore)
  a          (B, N)            pixel marginal: 1/(valid pixels of the problem) on valid pixels, 0 elsewhere
  b          (P, K)            class marginal
  kernel_fg  (B, K, N)         what the solver stores: exp(d/β + f + g) with d = s - max_k s
  f, g       (B, N), (P, K)    log-potentials of the pixels and classes, absorbed into kernel_fg (step 4)
  u, v       (B, N), (P, K)    the scalings on top of kernel_fg: π = diag(v) kernel_fg diag(u)
As d/β and s/β differ by a constant per pixel, kernel_fg = diag(e^g) kernel diag(e^(f - max_k s/β)): the same plan.

The algorithm (stable and fast)
-------------------------------
1. One pass over column blocks of x (each block read once from memory, then worked on in cache): max_k x,
   d = x - max_k x = s - max_k s (exact near each pixel's maximum, whatever constant the pixel's logits carry) into
   the one (B, K, N) buffer, log z = log Σ_k exp(d) per pixel (so s = d - log z where probabilities are read: the
   start, "present"), and the largest d and s of each class. A second pass over the same blocks makes the kernel
   in place, kernel_fg = exp(d/β + g) with g_k = -max_n d[k, n]/β, and takes the first class step's sums while
   each block is in cache: every column (pixel) and every row (class) of kernel_fg has an entry equal to 1, so no
   pixel or class starts with an all-zero kernel. Exponents below -80 are clamped to -80 (an entry of 1.8e-35 next
   to the maxima of 1): on CPU `torch.exp` is 8-12x slower for arguments below about -87, which most entries are
   at β = 0.05.
2. Start (start="reference", the default): the first class step weights pixel n by u_n = exp((max_k s[k, n] -
   max over the problem of the same)/β), i.e. by p_max^(1/β) relative to the most confident pixel: on kernel_fg
   that is the reference code's start exp(s/β), computed without leaving float32's range. start="uniform" weights
   every pixel 1 (kept for convergence runs). Both starts converge to the same plan; at 3 iterations they do not
   agree.
3. Alternate class and pixel steps as matrix-vector products (two reads of kernel_fg per iteration, no allocation
   of size B*K*N inside the loop). With scope="batch" the class sums are pooled over the batch, and over the ranks
   of `group` when one is passed.
4. If a scaling leaves [1e-30, 1e30] (a class or pixel whose kernel_fg entries all underflowed, or a very
   unbalanced marginal), or a class sum of the first step is below exp(LOG_FLOOR/2) = 4e-18 in float32 (start
   weights span hundreds of orders of magnitude on flat teachers, and entries at the floor could decide such a
   sum), that step is redone exactly in the log domain (logsumexp over d) and the scalings are absorbed into the
   potentials f, g (Schmitzer's stabilised scaling); a log-domain class step is followed by a log-domain pixel
   step. This is rare on confident teachers; it is what keeps the solver finite for any finite input and lets it
   converge on problems whose plan spans hundreds of orders of magnitude.
5. `iters` always stops the loop: it runs `iters` iterations, or fewer when `tol` is given and the class-marginal
   L1 error Σ_k |π 1_N - b|_k falls below it first (tol never adds iterations: for convergence pass both, e.g.
   iters=10000, tol=1e-6, and read stats["converged"]). The pixel sums of the plan always meet a exactly (the last
   step is a pixel step). A last pass over the blocks renormalises the plan per pixel and takes its class sums.

Everything runs in float32 (float64 for float64 input) with autocast disabled, whatever the input or autocast
dtype. An entry of -inf is probability 0. A pixel with a NaN or +inf entry, or without any finite entry, is made
invalid and counted; invalid pixels get an all-zero column. A class that is -inf at every valid pixel of a problem
can hold no mass: its share of the class marginal is 0 (the others are renormalised).

Distributed: no collective unless `group` is passed. With scope="batch" and a process group (e.g.
torch.distributed.group.WORLD), sinkhorn all-reduces per-class sums and maxima (and one flag per step) over
`group`, so every rank of the group must call it at the same point with the same arguments; each rank passes its
own pixels and gets its own columns of the joint plan. With group=None it solves this process's pixels alone, also
when a process group is initialised.

Relation to the exp-domain form of the reference code ("SwAV" form)
-------------------------------------------------------------------
The reference (github.com/zhang0jhon/SENSE) computes Q = exp(s/τ) (K x N, τ = β = 0.05) in float32 over all pixels
of the batch, divides by its total, then runs 3 sweeps of [divide each class row by its sum and by K; divide each
pixel column by its sum and by N] and returns N Q. That is the same Sinkhorn iteration (class step first, uniform b)
with the same start as our default, without stabilisation: exp(log p / 0.05) = p^20 leaves float32's normal range
once p < 0.0126 and is 0 once p < 0.0057, so every class whose probability stays below that at all pixels drops out
of the marginal, and for K >= 178 a near-uniform pixel underflows entirely and loses all its mass (for 79 <= K < 178
it survives only through denormal numbers, on hardware that keeps them). class_marginal="present" (b uniform over
the classes whose largest probability reaches min_prob = 0.01) reproduces what the reference effectively computes on
DPT logits, without the underflow. With the same marginal our plan agrees with the reference's computed in float64
at 3 iterations, on teachers with classes peaking at 1-10 % and on Mask2Former-like bounded scores, K = 19, 81 and
150 (the teachers of tests/test_ot.py): the largest difference of a plan entry measured there is 5e-6 (once, on this
version; 8e-6 on the previous one); the tests hold it below 1e-3. start="uniform" moves entries by 0.12-0.92 there.
Three iterations are far from convergence (class-marginal error 0.06-1.6 on segmentation outputs); this is the
method as published, and `iters` and `tol` are yours to change.

What OT changes at 3 iterations
-------------------------------
With the DPT recipe (the defaults: the gate on the teacher at γ = 0.95, before OT; scope "batch", "present",
β 0.05, 3 iterations), a gated pixel keeps a one-hot target on its argmax only while every class is either
confidently present somewhere in the problem or below ~1 % everywhere: on a simulated teacher of that kind
(tests/test_ot.py `segmentation_like`: K = 19, 5 classes present, every other class below 0.1 %) OT changes no
gated pixel's label. A class whose largest probability over the problem lies at ~1-10 % is "present", so it is
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
so x = √6 / (2(1+√6)) = 0.35505. Renormalised per pixel:

    >>> p = torch.tensor([[0.9, 0.1], [0.6, 0.4]]).T[None]  # (B=1, K=2, N=2)
    >>> plan, stats = sinkhorn(p.log(), beta=1.0, iters=1000, tol=1e-9, class_marginal="uniform")
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
# Exponents are clamped here before exp: the result (1.8e-35, 5e-305) is negligible next to each pixel's and each
# class's maximum of 1, and below about -87 torch.exp on CPU takes a slow path (denormal results).
LOG_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
# exp(y) is computed as exp2(y · LOG2E) in the passes over the whole kernel: on CPU torch.exp2 is 2-3x faster than
# torch.exp, and the one extra rounding of the argument is of the size of the rounding in d/β itself.
LOG2E = 1.0 / math.log(2.0)
# On CPU, steps 1, 2 and the final renormalisation work on blocks of about this many elements (4 MiB in float32,
# well inside the L3 cache of the machine the benchmarks ran on), so that each block is read from memory once per
# pass; larger blocks mean fewer small operations.
BLOCK = 1 << 20
# Probabilities passed as logits: every entry in [0, 1] and each pixel summing to 1 within this (bf16 rounding).
PROB_SUM_TOL = 4e-3


def _pool(t: torch.Tensor, pooled: bool, op: str, group=None) -> torch.Tensor:
    """Reduce per-image class quantities (B, K) to per-problem ones (P, K); all-reduce over `group` when pooled and
    a group is given (never otherwise). Every rank of the group calls this at the same points, whatever its data."""
    if not pooled:
        return t
    t = t.sum(0, keepdim=True) if op == "sum" else t.amax(0, keepdim=True)  # (1, K)
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return t


def _no_autocast(t: torch.Tensor):
    """A context that disables autocast on t's device (CPU's, a no-op there, where the device has no autocast)."""
    device = t.device.type if torch.amp.is_autocast_available(t.device.type) else "cpu"
    return torch.autocast(device, enabled=False)


def _blocks(B: int, K: int, N: int, device: torch.device):
    """(image, column slice) pairs covering (B, K, N) in blocks of about BLOCK elements (one per image off the CPU)."""
    step = max(1, BLOCK // max(K, 1)) if device.type == "cpu" else max(1, N)
    step = -(-N // -(-N // step)) if N else 1  # blocks of equal width
    return [(i, slice(j, j + step)) for i in range(B) for j in range(0, N, step)]


def _log_kernel(x: torch.Tensor, pixel_max: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """d/β = (x - max_k x)/β, the log of kernel_fg at f = g = 0, in pixel_max's dtype; -inf on invalid pixels.
    (B, K, N)"""
    log_kernel = torch.sub(x, pixel_max[:, None, :]).mul_(1.0 / beta)  # (B, K, N)
    return log_kernel.masked_fill_(~mask[:, None, :], -math.inf)


def _class_sums(kernel_fg: torch.Tensor, u: torch.Tensor, pooled: bool, group=None) -> torch.Tensor:
    """kernel_fg u per problem: (B, K, N), (B, N) -> (P, K). One matrix-vector product per image: on CPU
    torch.mv reads kernel_fg once, where a batched bmm against a (B, N, 1) operand is ~3x slower."""
    c = torch.stack([torch.mv(kernel_fg[i], u[i]) for i in range(kernel_fg.shape[0])])  # (B, K)
    return _pool(c, pooled, "sum", group)


def _pixel_sums(kernel_fg: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """kernel_fgᵀ v per image: (B, K, N), (P, K) -> (B, N). With one problem, one matmul of v (K,) against the whole
    batch (~10-20 % faster on CPU than bmm with v repeated per image)."""
    if v.shape[0] == 1:
        return torch.matmul(v[0], kernel_fg)
    return torch.bmm(v[:, None, :], kernel_fg)[:, 0, :]


def _exp_minus_max_(x: torch.Tensor, dim: int, pooled: bool, log_floor: float, group=None) -> torch.Tensor:
    """In place x <- exp(max(x - max, log_floor)) along dim; returns the max (0 where nothing is finite) so that
    the caller can put it into a potential. For dim = 2 (pixels) the max is taken over the whole problem."""
    m = x.amax(dim, keepdim=True)  # (B, K, 1) or (B, 1, N)
    if dim == 2:
        m = _pool(m[..., 0], pooled, "max", group)[..., None].expand(x.shape[0], -1, 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf: nothing valid, keep 0
    x.sub_(m).clamp_(min=log_floor).exp_()
    return m


def _first_pass(x: torch.Tensor, valid: torch.Tensor | None, dtype: torch.dtype, log_floor: float, present: bool):
    """Step 1: max_k x (B, N), 0 on invalid pixels; the masks of valid and of finite pixels (B, N) (NaN propagates
    through amax, +inf shows in it, a pixel without a finite entry has max -inf); then, in one pass over blocks,
    d = x - max_k x (B, K, N) in dtype (-inf on invalid pixels), log z = log Σ_k exp(d) (B, N) and the largest d of
    each class over each image's valid pixels (B, K) (-inf without any), and for "present" (present=True) the
    largest s = d - log z the same way (else that of d)."""
    B, K, N = x.shape
    pixel_max = x.amax(1).to(dtype)  # (B, N)
    finite = torch.isfinite(pixel_max)
    mask = finite if valid is None else finite & valid
    any_invalid = not bool(mask.all())
    if any_invalid:
        pixel_max = torch.where(mask, pixel_max, 0.0)
    d = torch.empty(B, K, N, dtype=dtype, device=x.device)
    log_z = torch.empty_like(pixel_max)
    best_d = torch.empty(B, K, dtype=dtype, device=x.device)
    best_s = torch.empty_like(best_d) if present else best_d
    blocks = _blocks(B, K, N, x.device)
    work = torch.empty(K, min(N, blocks[0][1].stop), dtype=dtype, device=x.device)  # (K, n) reused buffer
    for i, cols in blocks:
        out = torch.sub(x[i, :, cols], pixel_max[i, None, cols], out=d[i, :, cols])  # (K, n) d
        if any_invalid:
            out.masked_fill_(~mask[i, None, cols], -math.inf)
        # Terms below exp(log_floor) move log z by < K exp(log_floor) next to the maximum's exp(0) = 1; the clamp
        # keeps exp on its fast path (and gives invalid pixels a finite log z, unused).
        w = torch.mul(out, LOG2E, out=work[:, : out.shape[1]]).clamp_(min=log_floor * LOG2E).exp2_()  # exp(d)
        z = torch.log(w.sum(0), out=log_z[i, cols])  # (n,)
        block_max = out.amax(1)  # (K,)
        best_d[i] = block_max if cols.start == 0 else torch.maximum(best_d[i], block_max)
        if present:
            block_max = torch.sub(out, z, out=w).amax(1)  # (K,) largest s in the block; invalid pixels: -inf
            best_s[i] = block_max if cols.start == 0 else torch.maximum(best_s[i], block_max)
    return d, pixel_max, mask, finite, log_z, best_d, best_s


def _kernel_pass_(d: torch.Tensor, g: torch.Tensor, u: torch.Tensor, beta: float, log_floor: float) -> torch.Tensor:
    """Step 2 in place on d (B, K, N): kernel_fg = exp(max(d/β + g, log_floor)) block by block with g (P, K), and
    the first class step's per-image sums kernel_fg u (B, K) while each block is in cache."""
    B, K, N = d.shape
    c = torch.zeros(B, K, dtype=d.dtype, device=d.device)
    for i, cols in _blocks(B, K, N, d.device):
        block = d[i, :, cols]  # (K, n) view
        torch.add(g[min(i, g.shape[0] - 1), :, None] * LOG2E, block, alpha=LOG2E / beta, out=block)
        block.clamp_(min=log_floor * LOG2E).exp2_()  # exp(d/β + g) through exp2 (LOG2E)
        c[i].addmv_(block, u[i, cols])
    return c


def _plan_pass_(kernel_fg: torch.Tensor, v: torch.Tensor, r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """In place, per block: the plan renormalised per pixel, kernel_fg[k, n] v_k / r_n with r = kernel_fgᵀ v (B, N)
    (a product with 1/r: a multiplication is about half the cost of a division over the whole kernel),
    and its class sums weighted by a, Σ_n plan[k, n] a_n = v_k (kernel_fg u)_k with u = a / r: the class sums of
    the transport plan (B, K)."""
    B, K, N = kernel_fg.shape
    c = torch.zeros(B, K, dtype=kernel_fg.dtype, device=kernel_fg.device)
    inverse_r = 1.0 / r  # (B, N)
    for i, cols in _blocks(B, K, N, kernel_fg.device):
        block = kernel_fg[i, :, cols].mul_(v[min(i, v.shape[0] - 1), :, None]).mul_(inverse_r[i, cols])  # (K, n)
        c[i].addmv_(block, a[i, cols])
    return c


def _log_start(log_p_max: torch.Tensor, mask: torch.Tensor, beta: float, start: str, pooled: bool,
               group=None) -> torch.Tensor:
    """log u of the first class step from max_k s per pixel (B, N); -inf on invalid pixels, at most 0.

    "reference": (max_k s[k, n] - its maximum over the problem)/β, i.e. pixel weights p_max^(1/β) relative to
    the most confident pixel: on kernel_fg this is the reference code's start Q = exp(s/β)/ΣQ.
    "uniform": 0, every valid pixel weighs 1."""
    if start == "uniform":
        return torch.zeros_like(log_p_max).masked_fill_(~mask, -math.inf)
    top = torch.where(mask, log_p_max, -math.inf).amax(1, keepdim=True)  # (B, 1)
    top = _pool(top, pooled, "max", group)  # (P, 1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a problem without valid pixels
    return ((log_p_max - top.expand(log_p_max.shape[0], 1)) * (1.0 / beta)).masked_fill_(~mask, -math.inf)


def sinkhorn(
    logits: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    beta: float = 0.05,
    iters: int = 3,
    tol: float | None = None,
    class_marginal: str | torch.Tensor = "present",
    min_prob: float = 0.01,
    scope: str = "batch",
    start: str = "reference",
    group=None,
) -> tuple[torch.Tensor, dict]:
    """Entropic OT between pixels and classes, defaults = the DPT recipe; returns the plan renormalised per pixel.

    The defaults (one problem over the batch, "present", β 0.05, 3 iterations, the reference start) are the reference
    code's DPT recipe; the paper's text is scope="image", class_marginal="uniform". The input is normalised here with
    log_softmax over dim 1, which leaves log-probabilities unchanged, so logits and log-probabilities give the same
    plan. Runs in float32 (float64 for float64 input) with autocast disabled.

    Args:
        logits: (B, K, *spatial) teacher logits or log-probabilities, classes on dim 1, any float dtype; -inf is
            probability 0, a NaN or +inf entry makes its pixel invalid. Probabilities are a ValueError.
        valid: (B, *spatial) bool, True = a pixel that takes part, False = padding / ignore (default: all True);
            from an ignore or padding mask pass its inverse, ~mask. Any other dtype or shape is a ValueError.
        beta: entropic regularisation β > 0 (paper: 0.05).
        iters: iterations run (reference code: 3); always the most that run, with or without tol.
        tol: stop before `iters` once the class-marginal L1 error is below tol (default None: run all `iters`).
        class_marginal: "present" (default: uniform over the classes whose largest probability softmax(logits)
            over the problem's valid pixels is >= min_prob; uniform over all if none is), "uniform" over K, or a
            non-negative (K,) tensor, or for scope="image" a (B, K) one (normalised per problem).
        min_prob: threshold of "present", in [0, 1].
        scope: "batch" (default: one problem over every valid pixel of the batch, and of all ranks of `group` when
            one is passed) or "image" (one problem per image).
        start: "reference" (default: the reference code's start exp(s/β), pixels weighted by p_max^(1/β) in the
            first class step) or "uniform" (every valid pixel weighs 1: the start kept for convergence runs).
            Both converge to the same plan.
        group: torch.distributed process group (torch.distributed.group.WORLD for the default one) whose ranks
            solve one problem together with scope="batch": sinkhorn then all-reduces over it, and every rank of the
            group must call it at the same point with the same arguments. None (default): no collective, this
            process's pixels only, also when a process group is initialised. Unused with scope="image".

    Returns:
        plan: (B, K, *spatial) float32 (float64 for float64 input); for valid pixels the plan's column
            renormalised to sum 1 over the classes, invalid pixels all 0. An empty input gives an empty plan.
        stats: dict with "iters" (iterations run), "marginal_error" (class-marginal L1 error of the final plan,
            max over problems; of the joint problem with a group), "converged" (tol given and reached),
            "invalid" (this process's invalid pixels, non-finite ones included) and "nonfinite" (its pixels with a
            NaN or +inf entry or without any finite entry).
    """
    _check_arguments("sinkhorn", logits, valid, class_marginal, beta=beta, iters=iters, tol=tol, min_prob=min_prob,
                     scope=scope, start=start)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if logits.numel() == 0:  # no image or no pixel: nothing to transport
        if group is not None and scope == "batch":
            raise ValueError("sinkhorn: logits is empty, but every rank of `group` must bring pixels to the joint "
                             "problem (its collectives would wait for this rank)")
        empty = {"iters": 0, "marginal_error": 0.0, "converged": tol is not None, "invalid": 0, "nonfinite": 0}
        return torch.zeros(logits.shape, dtype=dtype, device=logits.device), empty
    with _no_autocast(logits):
        return _solve(logits, valid, dtype, beta, iters, tol, class_marginal, min_prob, scope == "batch", start,
                      group)


def _solve(logits, valid, dtype, beta, iters, tol, class_marginal, min_prob, pooled, start, group):
    """sinkhorn's algorithm (steps 1-5 of the module docstring) on checked, non-empty arguments."""
    B, K = logits.shape[:2]
    tiny = torch.finfo(dtype).tiny
    log_floor = LOG_FLOOR[dtype]
    x = logits.detach().reshape(B, K, -1)  # (B, K, N) view of the input, N pixels of one image
    valid = None if valid is None else valid.reshape(B, -1).to(x.device)  # (B, N)

    # 1. d = x - max_k x, log z, the validity mask and each class's largest d and s, in one pass over blocks.
    present = isinstance(class_marginal, str) and class_marginal == "present"
    kernel_fg, pixel_max, mask, finite, log_z, best_d, best_s = _first_pass(x, valid, dtype, log_floor, present)
    _refuse_probabilities(x, pixel_max, mask)
    any_invalid = not bool(mask.all())

    # Marginals: a uniform over the problem's valid pixels, b from class_marginal.
    count = _pool(mask.sum(1, keepdim=True).to(dtype), pooled, "sum", group)  # (P, 1)
    a = mask.to(dtype) / count.clamp_min(1).expand(B, 1)  # (B, N)
    best_d = _pool(best_d, pooled, "max", group)  # (P, K) largest d of each class over each problem
    best_s = _pool(best_s, pooled, "max", group) if present else best_d  # "present" reads s, the others finiteness
    b = _class_marginal(class_marginal, best_s, min_prob)  # (P, K)
    b = b * (count > 0)  # a problem without valid pixels carries no mass at all

    # 2. Start: the pixel weights of the first class step, from max_k s = max_k d - log z = -log z; then the kernel
    # with column and row maxima 1, kernel_fg = exp(d/β + f + g) with f = 0, and the first class sums, in one pass.
    log_u = _log_start(-log_z, mask, beta, start, pooled, group)  # (B, N)
    u = log_u.exp()  # weights below ~1e-38 may round to 0: the accuracy check of the first class step covers it
    g = -(torch.where(torch.isfinite(best_d), best_d, 0.0) * (1.0 / beta))  # (P, K); a class without finite d: 0
    c = _pool(_kernel_pass_(kernel_fg, g, u, beta, log_floor), pooled, "sum", group)  # (P, K)
    f = torch.zeros_like(pixel_max)  # (B, N) log-potential of the pixels, on top of d/β
    v = torch.zeros_like(b)
    due_u, due_v = a > 0, b > 0  # where mass is due: the scalings there must stay in range
    it, converged = 0, False
    for it in range(1, iters + 1):
        # 3a. class step: v = b / (kernel_fg u)
        if it > 1:
            c = _class_sums(kernel_fg, u, pooled, group)  # (P, K)
            if tol is not None and float((v * c - b).abs().sum(1).max()) < tol:  # the current plan's error
                it, converged = it - 1, True
                break
        v = b / c.clamp_min(tiny)
        # The start weights span many orders of magnitude: a class sum below exp(log_floor/2) could be decided by
        # entries of kernel_fg clamped at the floor or by weights that underflowed, so it is redone exactly (4.).
        # c and b are the same on every rank, so is this decision: no collective is needed for it.
        accurate = it > 1 or bool((torch.where(due_v, c, 1.0) >= math.exp(log_floor / 2)).all())
        log_step = not accurate or not _in_range(v, due_v, False, group)
        if log_step:
            f = f + log_u if it == 1 else f + torch.log(u)  # absorb u, redo the class step in the log domain (4.)
            kernel_fg, g = _log_class_step(x, pixel_max, mask, f, b, beta, pooled, log_floor, group)
            u, v = torch.ones_like(u), torch.ones_like(b)
        # 3b. pixel step: u = a / (kernel_fgᵀ v)
        r = _pixel_sums(kernel_fg, v)  # (B, N)
        u = a / r.clamp_min(tiny)
        # After a log-domain class step kernel_fg's columns are not normalised and a column may lie entirely at the
        # exponent floor, so its pixel step is taken in the log domain too (every rank alike, as log_step is).
        if log_step or not _in_range(u, due_u, pooled, group):
            g = g + torch.log(v)  # absorb v, redo the pixel step in the log domain (4.)
            kernel_fg, f = _log_pixel_step(x, pixel_max, mask, g, a, beta, pooled, log_floor, group)
            u, v = torch.ones_like(u), torch.ones_like(b)
            r = a.clone()  # kernel_fgᵀ v with v = 1: the pixel sums, now a

    # 5. The plan renormalised per pixel in place, target[k, n] = kernel_fg[k, n] v_k / (kernel_fgᵀ v)_n, and the
    # class-marginal error of the transport plan from its class sums.
    c = _pool(_plan_pass_(kernel_fg, v, r.clamp_min(tiny), a), pooled, "sum", group)  # (P, K)
    err = float((c - b).abs().sum(1).max())
    plan = kernel_fg
    if any_invalid:
        # Clamping before exp turned the -inf of invalid pixels into exp(LOG_FLOOR) (u = 0 kept them
        # out of every sum); their columns are zero by contract.
        plan.masked_fill_(~mask[:, None, :], 0.0)
    stats = {"iters": it, "marginal_error": err, "converged": converged or (tol is not None and err < tol),
             "invalid": int((~mask).sum()), "nonfinite": int((~finite).sum())}
    return plan.reshape(logits.shape), stats


def _refuse_probabilities(x: torch.Tensor, pixel_max: torch.Tensor, mask: torch.Tensor) -> None:
    """One-line ValueError when x (B, K, N) holds probabilities: every valid pixel's entries in [0, 1], summing to 1.
    The sums are read only when every valid pixel's maximum lies in [0, 1], which logits and log-probabilities
    (maximum <= 0, = 0 only at one-hot pixels) almost never do; Mask2Former scores do not sum to 1 per pixel."""
    lowest, highest = torch.aminmax(torch.where(mask, pixel_max, 0.5))
    if not (bool(mask.any()) and float(lowest) >= 0 and float(highest) <= 1):
        return
    sums = x.sum(1, dtype=pixel_max.dtype)  # (B, N)
    looks = ((sums - 1).abs() <= PROB_SUM_TOL) & (x.amin(1) >= 0)  # (B, N)
    if bool((looks | ~mask).all()):
        raise ValueError("sinkhorn: logits look like probabilities (entries in [0, 1], each pixel summing to 1); "
                         "pass logits or log-probabilities, e.g. probs.log()")


def _check_tensor(caller: str, name: str, t, shape: tuple | None, kind: str) -> None:
    """One-line ValueError unless t is a tensor of `kind` ("float" or "bool") and, when given, of `shape`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{caller}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if kind == "float" and not t.is_floating_point():
        raise ValueError(f"{caller}: {name} must be a float tensor, got {t.dtype}")
    if kind == "bool" and t.dtype != torch.bool:
        meaning = "a pixel that takes part (e.g. ~ignore_mask)" if name == "valid" else "a pixel trained on"
        raise ValueError(f"{caller}: {name} must be a bool tensor, True = {meaning}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{caller}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_arguments(caller: str, logits, valid, class_marginal, **given) -> None:
    """One-line ValueErrors for the arguments sinkhorn, sinkhorn_textbook and ot_pseudo_labels share."""
    _check_tensor(caller, "logits", logits, None, "float")
    if logits.dim() < 2 or logits.shape[1] < 1:
        raise ValueError(f"{caller}: logits must be (B, K, *spatial) with K >= 1 classes, got {tuple(logits.shape)}")
    B, K = logits.shape[:2]
    if valid is not None:
        _check_tensor(caller, "valid", valid, (B,) + tuple(logits.shape[2:]), "bool")
    ranges = {"beta": (0.0, math.inf, "a finite number > 0"), "tol": (0.0, math.inf, "None or a number >= 0"),
              "min_prob": (0.0, 1.0, "in [0, 1]"), "conf_thresh": (0.0, 1.0, "in [0, 1]")}
    for name, value in given.items():
        if name == "iters" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{caller}: iters must be an int >= 1, got {value!r}")
        if name in ranges and not (name == "tol" and value is None):
            low, high, expected = ranges[name]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
            if not ok or (name == "beta" and not 0 < value < math.inf):
                raise ValueError(f"{caller}: {name} must be {expected}, got {value!r}")
    choices = {"scope": ("image", "batch"), "start": ("reference", "uniform"), "gate_on": ("teacher", "plan")}
    for name, value in given.items():
        if name in choices and value not in choices[name]:
            raise ValueError(f"{caller}: {name} must be one of {choices[name]}, got {value!r}")
    if isinstance(class_marginal, torch.Tensor):
        shapes = [(K,)] + ([(B, K)] if given.get("scope") == "image" else [])
        b = class_marginal
        if tuple(b.shape) not in shapes or b.dtype == torch.bool or b.is_complex():
            raise ValueError(f"{caller}: class_marginal tensor must be real with shape (K,) = ({K},) or, for "
                             f"scope='image', (B, K) = ({B}, {K}); got {tuple(b.shape)} {b.dtype}")
        if not torch.isfinite(b).all() or (b < 0).any() or (b.sum(-1) <= 0).any():
            raise ValueError(f"{caller}: class_marginal must be finite, non-negative and not all zero")
    elif class_marginal not in ("present", "uniform"):
        raise ValueError(f"{caller}: class_marginal must be 'present', 'uniform' or a tensor, got {class_marginal!r}")


def _log_class_step(x, pixel_max, mask, f, b, beta, pooled, log_floor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The class step taken exactly in the log domain (step 4 of the algorithm), the pixel scalings already
    absorbed into f: returns kernel_fg = exp(d/β + f + g), whose class sums are now b, and the new g (P, K)."""
    B, K = x.shape[:2]
    tiny = torch.finfo(f.dtype).tiny
    kernel_fg = _log_kernel(x, pixel_max, mask, beta).add_(f[:, None, :])  # (B, K, N) log
    m = _exp_minus_max_(kernel_fg, 2, pooled, log_floor, group)[:, :, 0]  # (B, K); kernel_fg exponentiated
    c = _pool(kernel_fg.sum(2), pooled, "sum", group)  # (P, K)
    g = torch.log(b) - m[: b.shape[0]] - torch.log(c.clamp_min(tiny))
    kernel_fg.mul_((b / c.clamp_min(tiny)).expand(B, K)[:, :, None])
    return kernel_fg, g


def _log_pixel_step(x, pixel_max, mask, g, a, beta, pooled, log_floor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel step taken exactly in the log domain, the class scalings already absorbed into g: returns
    kernel_fg = exp(d/β + f + g), whose pixel sums are now a, and the new f (B, N)."""
    B, K = x.shape[:2]
    tiny = torch.finfo(a.dtype).tiny
    kernel_fg = _log_kernel(x, pixel_max, mask, beta).add_(g.expand(B, K)[:, :, None])  # (B, K, N) log
    m = _exp_minus_max_(kernel_fg, 1, pooled, log_floor, group)[:, 0, :]  # (B, N); kernel_fg exponentiated
    r = kernel_fg.sum(1)  # (B, N)
    f = torch.log(a) - m - torch.log(r.clamp_min(tiny))
    kernel_fg.mul_((a / r.clamp_min(tiny))[:, None, :])
    return kernel_fg, f


def _in_range(scale: torch.Tensor, due: torch.Tensor, pooled: bool, group=None) -> bool:
    """Scalings are usable in the exp domain when <= SAFE, and >= 1/SAFE where mass is due (NaN fails both).
    When pooled over a group, the answer is shared across its ranks (an all-reduce every rank calls), so that all of
    them take the log-domain step together and keep one class potential g."""
    lowest, highest = torch.aminmax(torch.where(due, scale, 1.0))  # scalings where no mass is due are 0
    bad = ~((highest <= SAFE) & (lowest >= 1.0 / SAFE))
    return not bool(_pool(bad.to(scale.dtype).reshape(1, 1), pooled, "max", group) > 0)


def _class_marginal(spec, best: torch.Tensor, min_prob: float) -> torch.Tensor:
    """The class marginal b (P, K), each row summing to 1, from the largest s of each class over each problem (P, K)
    ("present" reads it; the others only whether it is finite): a class without a finite s in a problem (-inf at
    every valid pixel: probability 0) gets no share."""
    P, K = best.shape
    if isinstance(spec, torch.Tensor):
        b = spec.detach().to(best.device, best.dtype).expand(P, K)
    elif spec == "uniform":
        b = torch.ones(P, K, dtype=best.dtype, device=best.device)
    else:  # "present"
        b = (best >= (math.log(min_prob) if min_prob > 0 else -math.inf)).to(best.dtype)
    b = torch.where(b.sum(1, keepdim=True) > 0, b, 1.0)  # "present" with no class present: uniform over all
    possible = b * torch.isfinite(best)  # (P, K)
    b = torch.where(possible.sum(1, keepdim=True) > 0, possible, b)  # a problem without valid pixels keeps b
    return b / b.sum(1, keepdim=True)


def sinkhorn_textbook(logits: torch.Tensor, valid: torch.Tensor | None = None, *, beta: float = 0.05, iters: int = 3,
                      class_marginal: str | torch.Tensor = "present", min_prob: float = 0.01) -> torch.Tensor:
    """`sinkhorn`'s iteration as in a textbook, with the DPT recipe's defaults: read this one, run `sinkhorn`.

    The same arguments, in the same order and with the same meaning and defaults, as `sinkhorn` with scope="batch"
    and start="reference": one problem over the valid pixels of the batch, started from the kernel itself. Exp
    domain, no stabilisation: in float32 at β = 0.05 the kernel p^(1/β) underflows to 0 for p < 0.0057, and a pixel
    whose entries all underflow (near-uniform pixels for K >= 178) turns into NaN; a class owed no mass gets none.

    Args:
        logits: (B, K, *spatial) logits or log-probabilities (valid pixels finite; -inf is probability 0).
        valid: (B, *spatial) bool, True = a pixel that takes part (default: all True).
        beta, iters, class_marginal, min_prob: as in `sinkhorn` (iters iterations, always).

    Returns:
        (B, K, *spatial) plan with each valid pixel's column renormalised to sum 1, invalid pixels 0; float32
        (float64 for float64 input).
    """
    _check_arguments("sinkhorn_textbook", logits, valid, class_marginal, beta=beta, iters=iters, min_prob=min_prob)
    B, K = logits.shape[:2]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if logits.numel() == 0 or (valid is not None and not valid.any()):  # no pixel: nothing to transport
        return torch.zeros(logits.shape, dtype=dtype, device=logits.device)
    with _no_autocast(logits):
        pixels = logits.detach().to(dtype).movedim(1, -1).reshape(-1, K)  # (B*H*W, K)
        keep = slice(None) if valid is None else valid.flatten()  # the problem's pixels
        s = pixels[keep].T.log_softmax(0)  # (K, N) log-probabilities of the N valid pixels
        kernel = torch.exp(s / beta)  # (K, N): the paper's K = exp(-c/β) with c = -s, transposed
        N = kernel.shape[1]
        a = torch.full((N,), 1.0 / N, dtype=dtype, device=kernel.device)  # pixel marginal
        b = _class_marginal(class_marginal, s.amax(1)[None], min_prob)[0]  # (K,) as in sinkhorn
        u = torch.ones(N, dtype=dtype, device=kernel.device)  # start: the kernel itself
        for _ in range(iters):
            v = torch.where(b > 0, b / (kernel @ u), 0.0)  # class step: the plan's class sums become b
            u = a / (kernel.T @ v)  # pixel step: the plan's pixel sums become a
        plan = v[:, None] * kernel * u[None, :]  # (K, N): diag(v) kernel diag(u)
        out = torch.zeros_like(pixels)  # (B*H*W, K); invalid pixels stay 0
        out[keep] = (plan / plan.sum(0, keepdim=True)).T
    return out.reshape(logits.movedim(1, -1).shape).movedim(-1, 1)


def ot_pseudo_labels(
    logits: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    beta: float = 0.05,
    iters: int = 3,
    class_marginal: str | torch.Tensor = "present",
    scope: str = "batch",
    min_prob: float = 0.01,
    tol: float | None = None,
    start: str = "reference",
    conf_thresh: float = 0.95,
    gate_on: str = "teacher",
    group=None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Soft OT targets and the confidence gate of SENSE's synthetic branch, with the DPT recipe's defaults.

    The defaults are the reference code's DPT recipe, which train.py runs (every value passed explicitly there):
      DPT:         logits of the EMA teacher; beta 0.05, iters 3, class_marginal "present", scope "batch",
                   min_prob 0.01, tol None, start "reference", conf_thresh γ = 0.95, gate_on "teacher".
      Mask2Former: its scores Σ_q softmax(class_q)[:K] · sigmoid(mask_q) passed as the logits (the reference code
                   takes their log-softmax too; they do not sum to 1 per pixel, so they are not taken for
                   probabilities); the same values but class_marginal "uniform". train.py then trains on hard
                   argmax labels where the plan's maximum is >= δ = 0.95, in images whose mean query confidence
                   is >= δ; the gate returned here is not used there.
      The paper's text: scope "image", class_marginal "uniform", the rest as DPT.

    Args:
        logits: (B, K, *spatial) teacher logits or log-probabilities (any float dtype; both give the same result,
            -inf is probability 0); probabilities are a ValueError, as in `sinkhorn`.
        valid: (B, *spatial) bool, True = a pixel that takes part, False = padding (default: all True); as in
            `sinkhorn`.
        beta, iters, class_marginal, scope, min_prob, tol, start: see `sinkhorn`.
        group: see `sinkhorn`. None (default): no collective. With a process group and scope="batch" this runs
            all-reduces over it: every rank of the group must call it at the same point.
        conf_thresh: γ in [0, 1]; a pixel is supervised when its confidence is >= γ (paper: 0.95).
        gate_on: "teacher" (the paper: γ on the teacher's softmax maximum, before OT) or "plan" (γ on the maximum
            of the pixel's renormalised OT plan, so that OT decides which pixels are trained on).

    Returns:
        targets: (B, K, *spatial) renormalised OT plan (sum 1 over the classes on valid pixels), float32 (float64
            for float64 input).
        gate: (B, *spatial) bool, True = a pixel trained on (confident and valid).
        stats: sinkhorn's stats plus "mask_ratio" (gated share of this process's pixels).
    """
    _check_arguments("ot_pseudo_labels", logits, valid, class_marginal, beta=beta, iters=iters, tol=tol,
                     min_prob=min_prob, scope=scope, start=start, conf_thresh=conf_thresh, gate_on=gate_on)
    targets, stats = sinkhorn(logits, valid, beta=beta, iters=iters, tol=tol, class_marginal=class_marginal,
                              min_prob=min_prob, scope=scope, start=start, group=group)
    with _no_autocast(logits):
        if gate_on == "teacher":
            conf = F.softmax(logits.detach(), 1, dtype=targets.dtype).amax(1)  # (B, *spatial); NaN fails the gate
        else:
            conf = targets.amax(1)  # (B, *spatial)
    gate = conf >= conf_thresh
    if valid is not None:
        gate &= valid.to(gate.device)
    gate &= targets.sum(1) > 0  # pixels that sinkhorn made invalid (non-finite) are never supervised
    stats["mask_ratio"] = float(gate.float().mean()) if gate.numel() else 0.0
    return targets, gate, stats


def soft_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, gate: torch.Tensor, *,
                       group=None) -> torch.Tensor:
    """L_u of the DPT recipe: the mean over gated pixels of the soft cross-entropy (default: this process's pixels).

    Per pixel: -Σ_k target_k log softmax(student)_k, in float32 (float64 for float64 logits) with autocast disabled.
    Shapes are checked, never broadcast.

    Args:
        student_logits: (B, K, *spatial) float logits of the strong view.
        targets: (B, K, *spatial) float soft targets (sum 1 over the classes where gated), the same shape.
        gate: (B, *spatial) bool, True = a pixel trained on (ot_pseudo_labels' gate). Any other dtype or shape is a
            ValueError.
        group: torch.distributed process group (torch.distributed.group.WORLD for the default one), or None
            (default: the mean over this process's gated pixels, no collective). With a group, one all-reduce of
            the gated-pixel count, so every rank of the group must call it at the same point; the value returned
            is this rank's share of the mean over all ranks' gated pixels, mean_local · count_local · world_size /
            count_total, so that DDP's gradient averaging gives the gradient of the global mean (and the mean of
            the returned values over the ranks is that global mean).

    Returns:
        Scalar tensor; 0 with a gradient path to student_logits when nothing is gated (or nothing is given).
    """
    caller = "soft_cross_entropy"
    _check_tensor(caller, "student_logits", student_logits, None, "float")
    if student_logits.dim() < 2:
        raise ValueError(f"{caller}: student_logits must be (B, K, *spatial), got {tuple(student_logits.shape)}")
    _check_tensor(caller, "targets", targets, student_logits.shape, "float")
    shape = student_logits.shape[:1] + student_logits.shape[2:]
    _check_tensor(caller, "gate", gate, shape, "bool")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    with _no_autocast(student_logits):
        log_q = F.log_softmax(student_logits.to(dtype), dim=1)  # (B, K, *spatial)
        per_pixel = -(targets.to(log_q.dtype) * log_q).sum(1)  # (B, *spatial)
        # torch.where, not a product: an ungated pixel may hold 0 * -inf = NaN, which must not leak.
        per_pixel = torch.where(gate, per_pixel, torch.zeros_like(per_pixel))
        count = gate.sum()  # () gated pixels of this process
        if group is None:
            return per_pixel.sum() / count.clamp_min(1)
        dist.all_reduce(count, group=group)  # () gated pixels of all ranks
        # per_pixel.sum() = mean_local · count_local: this rank's share of the global mean, times world_size.
        return per_pixel.sum() * dist.get_world_size(group) / count.clamp_min(1)
