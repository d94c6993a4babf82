"""CPU tuning of a training worker: what the training loop (train/loop.py) applies on CPU workers only.

The model (model/retro.py) has torch's own semantics on every device: nn.Dropout, and
F.scaled_dot_product_attention behind each attention module's ``attention_fn``. On a CPU worker the
loop applies three things from here, each where it has to happen:

    keep_freed_memory()               glibc's allocator keeps freed memory in the process; at the
                                      worker's start, before the model or any other tensor of training
                                      exists (trainer.cpu_keep_freed_memory)
    disable_deepspeed_cpu_compiles()  DeepSpeed's op table, so that it compiles no C++ op; before
                                      ``deepspeed.initialize``
    tune_model(model)                 fast dropout masks: every dropout module of the built model is
                                      replaced by FastDropout and every attention module's
                                      attention_fn set to :func:`attention`; before DeepSpeed wraps it

A model without tune_model is exactly F.dropout and SDPA; one with it draws its CPU dropout masks as
below, from the same torch generator draws as before this module existed (training results are the
same bit for bit). Figures: benchmarks/README.md, sections "train" and "Keeping freed memory on CPU
workers".

Dropout whose masks are cheap to draw on the CPU
-------------------------------------------------
On the CPU, torch draws a dropout mask one element at a time (``bernoulli_``, ~12 ns an element on
this machine's cores): in a training step of the demo RETRO model, a third of the time went to
drawing masks. Here a CPU mask comes from numpy's SFC64 generator instead, four 16-bit draws per
64-bit word (~1 ns an element), and is applied as one product.

What stays the same as torch's dropout:
    * an element is kept with probability 1 - p and scaled by 1 / (keep probability), so the
      expectation is unchanged. p is resolved to 1/65536: an element is dropped when its 16-bit draw
      is below round(p * 65536), and the scale uses that exact keep probability (for p = 0.1 the
      drop probability is 0.100006);
    * torch's generator governs it: each mask is seeded by one draw from torch's default generator,
      so torch.manual_seed makes runs repeatable, as before;
    * off the CPU (CUDA draws masks inside its kernels, at no cost worth saving), under
      torch.compile, and when `p` is 0 or the module is in eval mode, this is exactly F.dropout.

`attention()` is F.scaled_dot_product_attention with the same trade for attention dropout: on the
CPU, SDPA with dropout runs its unfused math path and draws the mask with `bernoulli_`; here that
path is written out (scores with the mask added by baddbmm, softmax in float32, fast mask,
values). bf16 attention over at most 512 keys takes the same written-out path without dropout,
where torch's bf16 flash kernels are 2-4x slower; every other case goes to SDPA.

Keeping freed CPU memory inside the process
-------------------------------------------
glibc's malloc serves large blocks (above a threshold that adapts up to 32 MiB) with ``mmap`` and
returns them with ``munmap`` when freed; it also gives the top of the heap back to the system once
more than the trim threshold is free there. A training step allocates and frees the same large
tensors every time (activations, logits of seq_length x vocabulary, gradients), so each step maps
fresh pages and the kernel zero-fills them on first touch: at the 125M shape on this project's CPU
that was 9 % of a step (1.9 s of 21.5 s), more for RETRO than for GPT (benchmarks/README.md).
Raising the mmap threshold and turning trimming off lets freed blocks be reused from the heap: the
process keeps its peak footprint instead of returning it between steps.
"""

from __future__ import annotations

import ctypes
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retro_ray.model.retro import Dropout, sdpa

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# The model: fast CPU dropout masks
# --------------------------------------------------------------------------------------------------

_RESOLUTION = 1 << 16  # masks are drawn as 16-bit integers


def _uses_fast_mask(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> tuple[torch.Tensor, float]:
    """A bool CPU tensor [shape], False with probability ~p, and 1 / (its keep probability)."""
    drop_below = round(p * _RESOLUTION)
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, ()))  # from torch's default generator: manual_seed governs the masks
    words = np.random.SFC64(seed).random_raw((n + 3) // 4)  # uint64, four 16-bit draws each
    keep = torch.from_numpy(words.view(np.uint16)[:n] >= drop_below).view(shape)
    return keep, _RESOLUTION / (_RESOLUTION - drop_below)


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor [shape] of 0 (probability ~p) and 1 / (keep probability) elsewhere."""
    keep, scale = _keep_mask(shape, p)
    return _as(keep, dtype).mul_(scale)


def _as(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # through uint8: the same 0 / 1 values; torch converts bool to bf16 / float32 8-9x slower (2.9 / 3.9
    # ms against 0.35 / 0.43 ms for 2M elements on one thread)
    return keep.view(torch.uint8).to(dtype)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training), with a fast mask on the CPU (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, got {p}")
    if not _uses_fast_mask(x) or round(p * _RESOLUTION) >= _RESOLUTION:
        return F.dropout(x, p, True)  # also p ~ 1, where every element is dropped
    # A plain product: backward multiplies by the same saved mask. It keeps the mask in x's dtype
    # (torch keeps a bool mask), which measured 1.8x faster than where()
    # and 1.3x faster than a bool product, forward and backward.
    if x.dtype in (torch.float32, torch.float64):
        return x * dropout_mask(x.shape, p, x.dtype)
    # bf16 / fp16 cannot hold the scale (1 / 0.9 is 1.109375 in bf16: kept values 0.16 % too small on
    # average), so the mask is 0 / 1 and the scale a float32 factor, each product rounded once, as torch's
    # own dropout does
    keep, scale = _keep_mask(x.shape, p)
    return (x * _as(keep, x.dtype)).mul_(scale)


class FastDropout(Dropout):
    """The model's Dropout with fast CPU masks; no parameters or buffers, so state dicts are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


# bf16 attention on the CPU over at most this many keys is written out (bmm on the AMX tiles, torch's
# bf16 softmax, bmm), with or without dropout: torch's CPU flash kernels for bf16 are slower there, and
# so is SDPA in float32. Forward + backward, one thread, 4 heads of 64 (benchmarks/README.md, "bf16
# training on CPUs with AMX"): 128 neighbours x 128 keys 185 ms bf16 flash, 134 ms float32 flash,
# 43 ms written out; 256 queries x 64 keys 95 / 69 / 22 ms; 64 queries x 256 masked keys 68 / 69 /
# 25 ms; 8 x 512 causal keys 51 / 71 / 29-43 ms. Over 1,024 causal keys and more bf16 flash is faster
# (70 against 81 ms; 160 against 349 at 2,048), and the written-out scores [N*h, T, S] grow with T x S.
# The written-out scores are rounded to bf16 before the softmax (flash keeps them in float32): the
# outputs' largest error against float64 was 1.3-1.9e-2 against flash's 0.6-1.4e-2, what training
# with attention dropout has always had here.
BF16_WRITTEN_OUT_MAX_KEYS = 512


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """The model's ``sdpa`` (retro_ray/model/retro.py: the same arguments and shapes), written out on the
    CPU where that is faster: with attention dropout (drawn by `dropout()`), and in bf16 over at most
    BF16_WRITTEN_OUT_MAX_KEYS keys."""
    written_out = _uses_fast_mask(q) and (
        dropout_p > 0.0 or (q.dtype == torch.bfloat16 and k.shape[-2] <= BF16_WRITTEN_OUT_MAX_KEYS))
    if not written_out:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
    N, h, T, dh = q.shape
    S = k.shape[-2]
    q3, k3, v3 = q.reshape(N * h, T, dh), k.reshape(N * h, S, dh), v.reshape(N * h, S, dh)
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is None:
        scores = (q3 * (1.0 / math.sqrt(dh))) @ k3.transpose(1, 2)  # [N*h, T, S]
    else:
        # The mask as an additive bias that baddbmm adds while it writes the scores: no masked copy.
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))  # [N|1, h|1, T|1, S]
        bias = bias.expand(N, h, bias.shape[2], S).reshape(N * h, bias.shape[2], S)
        scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=1.0 / math.sqrt(dh))  # [N*h, T, S]
    # float32 inside the softmax either way: torch's CPU kernel computes a bf16 softmax in float32 and
    # rounds once, 3x faster at the demo's shapes than a float32 copy of the scores and back (forward
    # and backward); other dtypes go through float32 explicitly
    if q.dtype == torch.bfloat16:
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0.0:
        probs = dropout(probs, dropout_p, True)
    return (probs @ v3).view(N, h, T, dh)


def tune_model(model: nn.Module) -> nn.Module:
    """Fast CPU dropout masks for ``model``, in place (and returned): every Dropout module (the model's,
    or a plain nn.Dropout) becomes a FastDropout of the same p and mode, and every attention module
    whose attention_fn is the plain SDPA gets :func:`attention`. Parameters, buffers, names and state
    dicts stay as they are. Call it before an optimizer or DeepSpeed engine wraps the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (nn.Dropout, Dropout) and not child.inplace:
                fast = FastDropout(child.p)
                fast.train(child.training)
                setattr(module, name, fast)
        if getattr(module, "attention_fn", None) is sdpa:
            module.attention_fn = attention
    return model


# --------------------------------------------------------------------------------------------------
# The process: glibc's allocator
# --------------------------------------------------------------------------------------------------

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# mallopt takes a C int: blocks of 2 GiB and more are still mapped. A trim threshold of -1 turns
# trimming off (mallopt(3)): the free top of the heap is never handed back, however large it grows
# (a 125M step on a CPU frees several GiB of activations at once).
MMAP_THRESHOLD = (1 << 31) - 1
TRIM_THRESHOLD = -1


def keep_freed_memory() -> bool:
    """Raise glibc's mmap threshold and turn heap trimming off for this process. False where that is not possible
    (not glibc: macOS, musl), leaving the allocator as it was."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, libc's among them
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op
    except (OSError, AttributeError):
        return False
    gnu_get_libc_version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if ok:
        log.debug("glibc %s: mmap threshold %d, trim threshold %d", gnu_get_libc_version().decode(),
                  MMAP_THRESHOLD, TRIM_THRESHOLD)
    return ok


# --------------------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------------------


def disable_deepspeed_cpu_compiles() -> None:
    """Keep DeepSpeed 0.19 from compiling C++ ops on CPU (minutes on a small machine, measured).

    1. Shared-memory all-reduce op: ``deepspeed.comm``'s TorchBackend builds it with g++ when it wraps
       the process group (the CPU accelerator's comm backend is gloo unless oneCCL is installed). It
       only serves DeepSpeed's *inference* all-reduce; training collectives go through
       torch.distributed (gloo) either way. DeepSpeed builds it only if
       ``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"]`` is true; that dict is probed once
       per process and edits to it persist, so we mark the op unavailable before
       ``deepspeed.initialize``. (There is no environment switch for it.)
    2. FusedAdam: built when the DeepSpeed config names optimizer "AdamW" without ``torch_adam``.
       We pass a ``torch.optim.AdamW`` instance instead (see ``train.loop.build_engine``), so no config
       optimizer exists.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
