"""The model's output layer and its loss, fused: cross-entropy of h @ W^T without the whole logits.

Shapes:
    N  rows (B * n tokens)       d  hidden size          V  vocabulary
    R  rows in a block (block_rows; the last block may be shorter)

Why: the logits are the largest tensor of a training step. At batch 8 x 512 tokens and V = 50,304
they are 4,096 x 50,304 float32 = 824 MB, and the unfused path (F.linear, then F.cross_entropy)
writes and reads tensors of that size five or more times (logits, log-softmax, its gradient, the
gradient of the logits). Here the rows of the hidden states go through in blocks of R: a block's
logits [R, V] are made, turned into the block's loss and, in the same pass, its gradients, and dropped.
Backward then only scales the stored gradients by grad_output. The matmuls are the unfused path's
(2NdV FLOPs forward, twice that for the two gradients), so RetroModel.flops_per_token is unchanged.

Per block (logits in the input's dtype; softmax and loss in float32, or float64 for float64 input; on
the CPU a bf16 block's softmax is computed in float32 and stored in bf16):
    logits = h @ W^T (+ b)                               [R, V]
    p      = softmax(logits)                             [R, V]
    lse    = max(logits) - log(max(p))                   [R]  (exact: p is largest at the largest
                                                               logit, where it is exp(max - lse) >= 1/V,
                                                               so no underflow; saves a logsumexp pass)
    loss  += sum over labelled rows of lse - logits[target]
             (CPU: as -log(p[target]), which needs no pass over [R, V] for the two maxima, and
              the softmax written over the logits; see _softmax_and_nll)
    g      = p - onehot(target), rows without a label zeroed (by masking h and d_hidden, not g)
    d_hidden[block] = g @ W        d_weight += g^T @ h    (d_bias += column sums of g)
A block without labelled rows adds 0 to the loss and its rows get a zero gradient. Gradients come
back in the input's dtype; d_weight (and d_bias) are summed over blocks in float32. A weight (or
hidden, or bias) that does not require grad gets no gradient and its matmul is skipped: a frozen
decoder (RETRO-fitting) saves a third of the output layer's backward.

The families in retro.py have no output bias; `bias` is supported for completeness (tested).

No grad needed (torch.no_grad, evaluation, validation): the blocks compute the loss only, with
log_softmax as F.cross_entropy does, so per-token values match the unfused path's to rounding.

Under torch.compile this Function is traced with its block loop unrolled (N is static per compiled
graph).

Other kernels of the same loss (trainer.loss_kernel, CUDA only; see loss_kernel() below): liger-kernel's
fused linear cross-entropy and Apple's cut-cross-entropy, both Triton. Each is called with this
function's contract (sum over labelled rows, float32, gradients summed in float32, nothing dropped)
and is an optional package. This function stays the default until a GPU measurement
(benchmarks/bench_loss_kernels.py) says otherwise, and evaluation (reduction "none") always uses it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator

import torch

from retro_ray.errors import RetroRayError

IGNORE_INDEX = -100  # a label that takes no part in the loss (the data pipeline's padding)

# Rows per block. CPU: measured at N = 4,096 rows, V = 50,304, 2 threads, on this project's 2-core
# machine (AVX-512; bench_loss.py --sweep-blocks; benchmarks/README.md, "fused output layer"): forward +
# backward of the output layer at d = 256 took 1.23 s unfused, 1.23 / 1.19 / 1.11 / 1.07 s fused in
# blocks of 128 / 256 / 1,024 / 4,096 rows; at d = 768 2.64 s unfused, 3.37 / 2.93 / 2.66 / 2.58 s.
# Small blocks make the three matmuls thin (and d_weight is read and written once a block); no
# block of logits fits a cache at this V anyway (200 KB a row). 1,024 rows is as fast as the unfused
# path at both widths and keeps a block's logits and softmax at 2 x 206 MB (the unfused path: 824 MB
# tensors, several at once).
# CUDA: larger blocks keep the GPU busy; 4,096 rows at V = 50,304 is 0.4 GB of bf16 logits and
# 0.8 GB of float32 softmax. Not measured (no GPU in this project's test runs).
BLOCK_ROWS = {"cpu": 1024, "cuda": 4096}
DEFAULT_BLOCK_ROWS = 1024  # other devices

_fused = True


@contextlib.contextmanager
def fused_loss(enabled: bool) -> Iterator[None]:
    """Within the block, RetroModel's loss is fused (True, the default) or the unfused reference
    (False: full logits, then F.cross_entropy). For A/B measurements and tests."""
    global _fused
    before, _fused = _fused, bool(enabled)
    try:
        yield
    finally:
        _fused = before


def fused_loss_enabled() -> bool:
    return _fused


def block_rows_for(device: torch.device) -> int:
    return BLOCK_ROWS.get(device.type, DEFAULT_BLOCK_ROWS)


def linear_cross_entropy(
    hidden: torch.Tensor,  # [N, d]
    weight: torch.Tensor,  # [V, d]
    labels: torch.Tensor,  # [N] int64, IGNORE_INDEX = no loss
    bias: torch.Tensor | None = None,  # [V]
    *,
    reduction: str = "sum",
    block_rows: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the logits hidden @ weight^T (+ bias) against labels, without storing them.

    reduction "sum": float32 scalar, the loss summed over labelled rows (0 if none), differentiable
    with respect to hidden, weight and bias. "none": float32 [N], each row's loss (0 where
    unlabelled), with no gradient (for evaluation).
    Under autocast the inputs are cast as F.linear would cast them, and the blocks run in that dtype.
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, d] and weight [V, d], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N={hidden.shape[0]}], got {tuple(labels.shape)}")
    rows = block_rows or block_rows_for(hidden.device)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # What F.linear does under autocast: both operands in the autocast dtype.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    with torch.autocast(device_type, enabled=False):
        if reduction == "none" or not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
            with torch.no_grad():
                nll = _loss_only(hidden, weight, bias, labels, rows)  # [N]
            return nll if reduction == "none" else nll.sum()
        return _LinearCrossEntropy.apply(
            hidden, weight, bias, labels, rows,
            hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad,
        )


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 input


def _loss_only(hidden, weight, bias, labels, rows: int) -> torch.Tensor:
    """float32 [N] per-row loss, 0 where unlabelled; blocks of rows, log_softmax as F.cross_entropy."""
    N = hidden.shape[0]
    dtype = _math_dtype(hidden.dtype)
    out = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        logits = _logits(hidden[s:e], weight, bias)  # [R, V]
        logp = torch.log_softmax(logits, dim=1, dtype=dtype)  # [R, V]
        t = labels[s:e]
        valid = t != IGNORE_INDEX
        picked = logp.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)  # [R]
        out[s:e] = torch.where(valid, -picked, 0.0)
    return out


def _softmax_and_nll(logits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     target: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's softmax p [R, V] in dtype and each row's lse - logits[target] [R], from its logits
    [R, V] (of h [R, d]) and targets [R, 1].

    CPU, float32 and bf16 logits: the softmax is written over the logits (in place: 38 ms against 55
    ms for a new [1,024, 50,304] float32 tensor on one thread, the same values), and the loss is
    -log(p[target]), one gather instead of two passes over [R, V] for the row maxima (3 % of a
    training step at the cpu50k shape). Exact to rounding while p[target] is a normal number (a loss
    below 87 nats); the rare rows beyond that are redone from their logits, made again from h.
    For bf16 logits torch's softmax computes in float32 and rounds p to bf16 once, the p the matmuls
    take anyway; its float32 softmax, the bf16 copy of it and the two row maxima took 8x as long
    (245 against 30 ms a block). The loss then carries p[target]'s bf16 rounding (at most 0.002 nats
    a row), a tenth of what the bf16 logits themselves carry (a logit of 10 is rounded by up to 0.03).
    Elsewhere (and under torch.compile, and for float16) the form of the module docstring: no
    data-dependent branch, no host sync.
    """
    picked = logits.gather(1, target).squeeze(1).to(dtype)  # [R]
    if (logits.device.type != "cpu" or logits.dtype not in (dtype, torch.bfloat16)
            or torch.compiler.is_compiling()):
        p = torch.softmax(logits, dim=1, dtype=dtype)
        return p, logits.amax(dim=1).to(dtype) - p.amax(dim=1).log() - picked  # (see the module docstring)
    p = torch.softmax(logits, dim=1, out=logits)  # the logits are gone from here on
    p_target = p.gather(1, target).squeeze(1).to(dtype)  # [R]
    nll = -p_target.log()
    far = p_target < torch.finfo(p.dtype).tiny  # underflowed or subnormal: too few bits left
    if far.any():
        nll[far] = torch.logsumexp(_logits(h[far], weight, bias).to(dtype), dim=1) - picked[far]
    return p, nll


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss sum with every gradient computed in forward; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows: int, want_hidden: bool, want_weight: bool,
                want_bias: bool):
        N, d = hidden.shape
        V = weight.shape[0]
        dtype = _math_dtype(hidden.dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        d_hidden = torch.empty(N, d, dtype=hidden.dtype, device=hidden.device) if want_hidden else None  # every row written once
        # CPU: d_weight is summed as its transpose [d, V] (h^T @ g) where the blocks' products are in float32:
        # with the long V side as the columns, one thread's sgemm ran at 190 GFLOP/s against 170 for
        # g^T @ h at d = 256 (R = 1,024, V = 50,304); backward writes it back as [V, d] while scaling.
        transposed = want_weight and hidden.dtype == acc and hidden.device.type == "cpu"
        d_weight = torch.zeros((d, V) if transposed else (V, d), dtype=acc, device=weight.device) if want_weight else None
        d_bias = torch.zeros(V, dtype=acc, device=weight.device) if want_bias else None
        for s in range(0, N, rows):
            e = min(N, s + rows)
            h, t = hidden[s:e], labels[s:e]  # [R, d], [R]
            valid = t != IGNORE_INDEX  # [R]
            target = torch.where(valid, t, 0)[:, None]  # [R, 1]; a safe index for unlabelled rows
            logits = _logits(h, weight, bias)  # [R, V] in the input dtype
            p, nll = _softmax_and_nll(logits, h, weight, bias, target, dtype)  # [R, V] (CPU: logits' memory), [R]
            total += torch.where(valid, nll, 0.0).sum()
            del logits
            # g = p - onehot(target) on labelled rows. Unlabelled rows keep p here; their share is
            # removed by zeroing their d_hidden rows and their h rows in d_weight's product (both
            # [R, d]: cheaper than another pass over [R, V]).
            # (index_put_: on the CPU, scatter_add_ and scatter_ copy all of a bf16 p twice, 100 ms a block)
            rows_here = torch.arange(e - s, device=p.device)
            p.index_put_((rows_here, target[:, 0]), -valid.to(p.dtype), accumulate=True)
            g = p if p.dtype == hidden.dtype else p.to(hidden.dtype)  # the matmuls in the input dtype
            del p
            if want_hidden:
                torch.mm(g, weight, out=d_hidden[s:e])
                d_hidden[s:e].masked_fill_(~valid[:, None], 0)
            if want_weight:
                h_labelled = h.masked_fill(~valid[:, None], 0)  # [R, d]
                if transposed:
                    # addmm_'s own kernel; written as out= because torch's FLOP counter (which checks
                    # RetroModel.flops_per_token in the tests) does not count the in-place op.
                    torch.addmm(d_weight, h_labelled.t(), g, out=d_weight)
                else:  # bf16 / fp16: the block's product in the input dtype, the sum over blocks in float32
                    d_weight += torch.mm(g.t(), h_labelled)
            if want_bias:
                d_bias += torch.mv(g.t(), valid.to(g.dtype)).to(acc)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.transposed = transposed
        return total.float()

    @staticmethod
    def backward(ctx, grad_total):  # grad_total: float32 scalar
        d_hidden, d_weight, d_bias = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        if d_weight is not None:
            # [d, V] summed: scaled and written back as [V, d] in one pass, in the weight's layout
            d_weight = d_weight.t() if ctx.transposed else d_weight
            d_weight = torch.mul(d_weight, grad_total, out=torch.empty(d_weight.shape, dtype=d_weight.dtype,
                                                                       device=d_weight.device)).to(w_dtype)
        return (
            None if d_hidden is None else (d_hidden * grad_total).to(h_dtype),
            d_weight,
            None if d_bias is None else (d_bias * grad_total).to(b_dtype),
            None, None, None, None, None,
        )


# --------------------------------------------------------------------------------------------------
# Other kernels of the same loss (trainer.loss_kernel)
# --------------------------------------------------------------------------------------------------

# name -> (module to import, the package that provides it). retro_ray: linear_cross_entropy above.
LOSS_KERNELS = {"retro_ray": (None, None), "liger": ("liger_kernel.transformers.functional", "liger-kernel"),
                "cce": ("cut_cross_entropy", "cut-cross-entropy")}


def loss_kernel(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss named by trainer.loss_kernel, as RetroModel.loss_fn: (hidden [N, d], weight
    [V, d], labels [N]) -> float32 scalar, the loss summed over labelled rows, differentiable.

    liger and cce are Triton kernels for CUDA tensors; their package is imported here, so a missing one
    is refused in one line where training starts. Both are asked for this function's numerics: the
    weight's gradient summed in float32 (liger: accum_dtype), no gradient entries dropped (cce's
    default filter_eps skips small ones; here None)."""
    if name not in LOSS_KERNELS:
        raise RetroRayError(f"trainer.loss_kernel={name!r} is not one of {', '.join(LOSS_KERNELS)}.")
    module_name, package = LOSS_KERNELS[name]
    if module_name is None:
        return linear_cross_entropy
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RetroRayError(
            f"trainer.loss_kernel={name} needs the {package} package, which does not import here ({e}); "
            f"pip install {package} on the GPU workers, or use trainer.loss_kernel=retro_ray."
        ) from None

    def external(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if hidden.device.type != "cuda":
            raise RetroRayError(f"trainer.loss_kernel={name} runs on CUDA GPUs only; use trainer.loss_kernel=retro_ray "
                                f"on {hidden.device.type} workers.")
        if torch.is_autocast_enabled("cuda"):  # as linear_cross_entropy: both operands in the autocast dtype
            dtype = torch.get_autocast_dtype("cuda")
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast("cuda", enabled=False):
            if name == "liger":
                loss = module.liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX,
                                                               reduction="sum", accum_dtype=torch.float32)
            else:
                loss = module.linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX,
                                                   reduction="sum", filter_eps=None)
        return loss.float()

    external.__name__ = f"{name}_linear_cross_entropy"
    return external
