"""retro_ray.train.cpu_tuning: what the training loop applies on CPU workers.

What is shown:
  * fast dropout: the masks drop the asked fraction and keep the expectation; backward uses the same
    mask; torch.manual_seed makes them repeatable; eval, p = 0, p = 1 and the fallback (off the CPU,
    under torch.compile) behave as F.dropout; the written-out attention equals SDPA (causal, bool
    mask, plain, bf16);
  * the model: untuned, every dropout site is torch's own (nn.Dropout, SDPA: a bernoulli_ mask per
    site, none of ours); tune_model swaps in the fast masks at every site (no bernoulli_ left) and
    keeps parameters, names and eval outputs; the tuned model draws exactly the masks, in the same
    order and from the same torch generator draws, that the model drew before the CPU tricks left it
    (pinned below); a tuned training step is repeatable under a seed;
  * the allocator: a process that keeps freed memory stops faulting in its large tensors anew.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from retro_ray.model.retro import Dropout, RetroConfig, RetroModel, RetroSettings, sdpa
from retro_ray.train import cpu_tuning
from retro_ray.train.cpu_tuning import FastDropout, attention, dropout, dropout_mask, tune_model


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drops_the_asked_fraction_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of 4: the last 64-bit word is cut
    y = dropout(torch.ones(n), p, training=True)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    kept = y[y != 0]
    drop_below = round(p * 65536)
    assert torch.all(kept == 65536 / (65536 - drop_below))  # 1 / the exact keep probability
    assert abs(y.mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)


def test_bf16_keeps_are_scaled_by_the_exact_keep_probability():
    """bf16 cannot hold 1 / 0.9: each kept element is x times the exact scale, rounded to bf16 once (as
    torch's own dropout), not x times a rounded scale; the gradient likewise."""
    torch.manual_seed(3)
    x = torch.randn(100_000).bfloat16().requires_grad_()
    y = dropout(x, 0.1, training=True)
    scale = 65536 / (65536 - round(0.1 * 65536))
    kept = y != 0
    assert y.dtype == torch.bfloat16 and 0.09 < 1 - kept.float().mean().item() < 0.11
    assert torch.equal(y[kept], (x.detach()[kept].float() * scale).bfloat16())
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, (kept.float() * scale).bfloat16())


def test_backward_uses_the_forward_mask():
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    y.backward(torch.ones_like(y))
    scale = 65536 / (65536 - round(0.3 * 65536))
    assert torch.equal(x.grad, (y != 0).float() * scale)
    assert torch.allclose(y, x.detach() * x.grad)


def test_masks_follow_torch_manual_seed():
    torch.manual_seed(7)
    a, b = dropout_mask((1000,), 0.5, torch.float32), dropout_mask((1000,), 0.5, torch.float32)
    torch.manual_seed(7)
    assert torch.equal(dropout_mask((1000,), 0.5, torch.float32), a)
    assert not torch.equal(a, b)  # consecutive masks differ


def test_masks_are_those_drawn_before_the_move():
    """The masks of a seed, pinned: drawn by retro_ray/model/dropout.py before its code moved here
    (same zeros, same scale, one torch draw per mask)."""
    torch.manual_seed(7)
    masks = [dropout_mask((3, 5, 7), 0.1, torch.float32), dropout_mask((1001,), 0.5, torch.bfloat16)]
    after = torch.rand(()).item()
    got = [(m.dtype, tuple(m.shape), int((m == 0).sum()), hashlib.sha256(m.float().numpy().tobytes()).hexdigest()[:16])
           for m in masks]
    assert got == [(torch.float32, (3, 5, 7), 10, "5fc5c48343ae91f6"), (torch.bfloat16, (1001,), 492, "cc5b1306b3a1659d")]
    assert after == 0.23276156187057495  # the generator moved on by exactly one draw per mask


def test_eval_zero_one_and_the_fallback_are_plain_dropout(monkeypatch):
    x = torch.randn(10, 10)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0, training=True) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
    with pytest.raises(ValueError, match="between 0 and 1, got 1.5"):
        dropout(x, 1.5, training=True)
    torch.manual_seed(3)
    want = F.dropout(x, 0.2, training=True)
    torch.manual_seed(3)
    assert torch.equal(Dropout(0.2)(x), want)  # the model's own Dropout: torch's masks
    # Under torch.compile (and off the CPU) the fast module is F.dropout too.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(3)
    assert torch.equal(FastDropout(0.2)(x), want)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.2, training=True), want)


def test_module_keeps_dtype_and_has_no_state():
    for d in (FastDropout(0.1), Dropout(0.1)):
        assert d.state_dict() == {} and "p=0.1" in repr(d)
        y = d(torch.ones(4, 8, dtype=torch.bfloat16))
        assert y.dtype == torch.bfloat16
        d.eval()
        x = torch.randn(3)
        assert d(x) is x


def _qkv(T: int, S: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, T, 16, generator=g, dtype=dtype), torch.randn(2, 3, S, 16, generator=g, dtype=dtype),
            torch.randn(2, 3, S, 16, generator=g, dtype=dtype))


# p = 1e-6 resolves to "drop nothing" (below 1/65536) but still takes the written-out path.
@pytest.mark.parametrize("case", ["plain", "causal", "mask"])
def test_written_out_attention_equals_sdpa(case):
    q, k, v = _qkv(12, 12 if case == "causal" else 20)
    mask = torch.rand(2, 1, 1, 20, generator=torch.Generator().manual_seed(1)) > 0.3 if case == "mask" else None
    mask = None if mask is None else mask.index_fill(-1, torch.tensor([0]), True)  # every row sees a key
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case == "causal")
    assert torch.allclose(attention(q, k, v, mask, case == "causal", dropout_p=1e-6), ref, atol=1e-6)
    assert torch.equal(attention(q, k, v, mask, case == "causal"), ref)  # no dropout: SDPA itself
    assert torch.equal(sdpa(q, k, v, mask, case == "causal"), ref)  # the untuned model's attention_fn


def test_written_out_attention_in_bf16():
    q, k, v = _qkv(8, 8, torch.bfloat16)
    out = attention(q, k, v, is_causal=True, dropout_p=1e-6)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=2e-2)


@pytest.mark.parametrize("keys", [64, 256, 512, 513])
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_attention_over_few_keys_is_written_out(keys, causal):
    """Without dropout, bf16 attention over at most BF16_WRITTEN_OUT_MAX_KEYS keys takes the written-out
    path (attention dropout's: p = 1e-6 drops nothing), over more keys it is bf16 SDPA itself; both are
    SDPA within bf16 rounding, and gradients reach q, k and v in bf16."""
    q, k, v = (t.requires_grad_() for t in _qkv(keys if causal else 16, keys, torch.bfloat16))
    mask = None if causal else torch.rand(2, 1, 1, keys, generator=torch.Generator().manual_seed(1)) > 0.3
    out = attention(q, k, v, mask, causal)
    if keys <= cpu_tuning.BF16_WRITTEN_OUT_MAX_KEYS:
        want = attention(q, k, v, mask, causal, dropout_p=1e-6)
    else:
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, is_causal=causal)
    assert (out.double() - exact).abs().max() < 3e-2
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert all(g.dtype == torch.bfloat16 and g.abs().sum() > 0 for g in grads)


def test_attention_dropout_drops_probabilities():
    q, k, v = _qkv(16, 16)
    v = torch.ones_like(v)  # each output row is then the sum of its kept, rescaled probabilities
    torch.manual_seed(0)
    out = attention(q, k, v, is_causal=True, dropout_p=0.5)
    row_sums = out[..., 0]
    assert not torch.allclose(row_sums, torch.ones_like(row_sums))  # some probabilities were dropped
    assert 0.8 < row_sums.mean().item() < 1.2  # and the rest scaled up


def test_attention_falls_back_to_sdpa_with_its_dropout(monkeypatch):
    q, k, v = _qkv(12, 12)
    torch.manual_seed(4)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.3)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(4)
    assert torch.equal(attention(q, k, v, None, True, 0.3), want)


# --------------------------------------------------------------------------------------------------
# The model, untuned and tuned
# --------------------------------------------------------------------------------------------------

# Every dropout different, so that a site's p tells which site drew a mask.
SITES = RetroConfig.tiny(hidden_dropout=0.1, attention_dropout=0.2, ffn_dropout=0.3,
                         retro=RetroSettings(retro_layers=(2, 4), retro_encoder_hidden_dropout=0.15,
                                             retro_encoder_attention_dropout=0.25))

# The masks (shape, p), in order, that one training forward of SITES drew on the CPU before the CPU
# tricks left the model (retro_ray/model/dropout.py's global fast masks): decoder embedding, layer 1
# (attention probabilities, residual, MLP, residual), layer 2 with the encoder run inside its CCA
# (embedded neighbours; per encoder layer attention, residual, [conditioning attention, residual,]
# MLP, residual), CCA's attention, ..., layer 4.
MASKS_BEFORE = [
    ((2, 64, 64), 0.1), ((8, 64, 64), 0.2), ((2, 64, 64), 0.1), ((2, 64, 256), 0.3), ((2, 64, 64), 0.1),
    ((8, 64, 64), 0.2), ((2, 64, 64), 0.1), ((2, 4, 2, 32, 64), 0.15), ((64, 32, 32), 0.25), ((16, 32, 64), 0.15),
    ((32, 64, 16), 0.25), ((16, 32, 64), 0.15), ((16, 32, 256), 0.3), ((16, 32, 64), 0.15), ((64, 32, 32), 0.25),
    ((16, 32, 64), 0.15), ((16, 32, 256), 0.3), ((16, 32, 64), 0.15), ((32, 16, 64), 0.2), ((2, 64, 64), 0.1),
    ((2, 64, 256), 0.3), ((2, 64, 64), 0.1), ((8, 64, 64), 0.2), ((2, 64, 64), 0.1), ((2, 64, 256), 0.3),
    ((2, 64, 64), 0.1), ((8, 64, 64), 0.2), ((2, 64, 64), 0.1), ((32, 16, 64), 0.2), ((2, 64, 64), 0.1),
    ((2, 64, 256), 0.3), ((2, 64, 64), 0.1),
]


def _sites_model_and_batch(tuned: bool):
    torch.manual_seed(0)
    model = RetroModel(SITES)
    if tuned:
        tune_model(model)
    tokens = torch.randint(0, SITES.vocab_size, (2, SITES.seq_length + 1))
    C, K, r = SITES.seq_length // SITES.chunk_length, SITES.retro.retro_num_neighbors, SITES.neighbor_length
    return model.train(), (tokens[:, :-1], torch.randint(0, SITES.vocab_size, (2, C, K, r)), None, tokens[:, 1:])


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _masks_and_ops(tuned: bool, monkeypatch) -> tuple[list, collections.Counter, torch.Tensor]:
    """One training forward + backward of SITES under seed 5: the fast masks drawn, the aten ops run, the loss."""
    drawn = []

    def recording(shape, p, dtype):
        drawn.append((tuple(shape), p))
        return real(shape, p, dtype)

    real = cpu_tuning.dropout_mask
    monkeypatch.setattr(cpu_tuning, "dropout_mask", recording)
    model, batch = _sites_model_and_batch(tuned)
    torch.manual_seed(5)
    with _Ops() as ops:
        loss = model(*batch).loss
        loss.backward()
    monkeypatch.undo()
    return drawn, ops.counts, loss.detach()


def test_untuned_model_is_torch_dropout_and_sdpa(monkeypatch):
    model, _ = _sites_model_and_batch(tuned=False)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is Dropout and type(m).forward is nn.Dropout.forward for m in drops)
    attns = [m for m in model.modules() if hasattr(m, "attention_fn")]
    assert len(attns) == 4 + 2 + 1 + 2 and all(m.attention_fn is sdpa for m in attns)  # decoder, CCA, encoder self + cross
    drawn, ops, _ = _masks_and_ops(tuned=False, monkeypatch=monkeypatch)
    assert drawn == [] and ops["aten.bernoulli_.float"] == len(MASKS_BEFORE)  # torch's mask at every site


def test_tuned_model_draws_the_masks_it_drew_before(monkeypatch):
    drawn, ops, loss = _masks_and_ops(tuned=True, monkeypatch=monkeypatch)
    assert drawn == MASKS_BEFORE
    assert not any("bernoulli" in op for op in ops) and ops["aten.randint.low"] == len(MASKS_BEFORE)
    again, _, loss_again = _masks_and_ops(tuned=True, monkeypatch=monkeypatch)
    _, _, untuned_loss = _masks_and_ops(tuned=False, monkeypatch=monkeypatch)
    assert torch.equal(loss, loss_again) and not torch.equal(loss, untuned_loss)


def test_tune_model_keeps_parameters_modes_and_eval_outputs():
    plain, batch = _sites_model_and_batch(tuned=False)
    tuned, _ = _sites_model_and_batch(tuned=False)
    tuned.encoder.eval()  # a module in eval mode stays so
    params = dict(tuned.named_parameters())
    assert tune_model(tuned) is tuned
    assert dict(tuned.named_parameters()) == params  # the same tensors under the same names
    assert tuned.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), plain.state_dict().values()))
    drops = [m for m in tuned.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == len([m for m in plain.modules() if isinstance(m, nn.Dropout)])
    assert all(type(m) is FastDropout for m in drops)
    assert all(m.attention_fn is attention for m in tuned.modules() if hasattr(m, "attention_fn"))
    assert [m.p for m in drops] == [m.p for m in plain.modules() if isinstance(m, nn.Dropout)]
    assert all(not m.training for m in tuned.encoder.modules()) and tuned.drop.training
    tuned.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(tuned(*batch[:2]).logits, plain(*batch[:2]).logits)


def test_training_step_is_repeatable_under_a_seed():
    # the tiny config with the reference's dropouts (0.1 everywhere), tuned as on a CPU worker
    cfg = RetroConfig.tiny(hidden_dropout=0.1, attention_dropout=0.1, ffn_dropout=0.1,
                           retro=RetroSettings(retro_layers=(2, 4)))
    torch.manual_seed(0)
    model = tune_model(RetroModel(cfg)).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1))
    C, K, r = cfg.seq_length // cfg.chunk_length, cfg.retro.retro_num_neighbors, cfg.neighbor_length
    nb = torch.randint(0, cfg.vocab_size, (2, C, K, r))

    def loss(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return model(tokens[:, :-1], nb, labels=tokens[:, 1:]).loss

    assert torch.equal(loss(5), loss(5))
    assert not torch.equal(loss(5), loss(6))  # dropout is active
    model.eval()
    assert torch.equal(loss(5), loss(6))


# --------------------------------------------------------------------------------------------------
# The allocator
# --------------------------------------------------------------------------------------------------

# Allocate and free the same large tensors again and again, as training steps do; count the page
# faults of the last rounds (the first ones fault in the heap once either way). 3 GiB are alive at once,
# as the activations of a 125M step on a CPU are, in blocks above glibc's adaptive mmap ceiling.
_STEPS = r"""
import json, resource, sys, torch
from retro_ray.train.cpu_tuning import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():
    held = [torch.empty(32 << 20) for _ in range(24)] + [torch.empty(4 << 20)]  # 24 x 128 MiB + 16 MiB
    for t in held:
        t.view(-1, 1024)[:, 0] = 1.0  # touch every 4 KiB page once
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[2])):
    step()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
STEPS = 5
_PAGES_PER_STEP = (24 * (128 << 20) + (16 << 20)) // 4096


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode, str(STEPS)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_kept_memory_is_reused_instead_of_faulted_in_every_step():
    default, kept = _faults("default"), _faults("keep")
    assert kept["kept"] is True and default["kept"] is False
    pages = STEPS * _PAGES_PER_STEP  # what mapping every tensor afresh each step costs
    assert default["faults"] > pages // 2, default
    assert kept["faults"] < pages // 10, kept


def test_thresholds_fit_mallopts_int():
    assert 0 < cpu_tuning.MMAP_THRESHOLD <= 2**31 - 1 and cpu_tuning.TRIM_THRESHOLD == -1  # -1: never trim
