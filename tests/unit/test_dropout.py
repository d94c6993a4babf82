"""retro_ray.model.dropout: CPU dropout masks from numpy's SFC64, attention written out when it drops.

What is shown: the masks drop the asked fraction and keep the expectation; backward uses the same
mask; torch.manual_seed makes them repeatable; eval, p = 0, p = 1 and torch_masks() behave as
F.dropout; the written-out attention equals SDPA (causal, bool mask, plain, bf16); and a RETRO
training step in train mode is repeatable under a seed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retro_ray.model.dropout import Dropout, attention, dropout, dropout_mask, torch_masks
from retro_ray.model.retro import RetroConfig, RetroModel, RetroSettings


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


def test_eval_zero_one_and_torch_masks_are_plain_dropout():
    x = torch.randn(10, 10)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0, training=True) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
    with torch_masks():
        torch.manual_seed(3)
        ours = dropout(x, 0.2, training=True)
    torch.manual_seed(3)
    assert torch.equal(ours, F.dropout(x, 0.2, training=True))
    with pytest.raises(ValueError, match="between 0 and 1, got 1.5"):
        dropout(x, 1.5, training=True)


def test_module_keeps_dtype_and_has_no_state():
    d = Dropout(0.1)
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


def test_written_out_attention_in_bf16():
    q, k, v = _qkv(8, 8, torch.bfloat16)
    out = attention(q, k, v, is_causal=True, dropout_p=1e-6)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=2e-2)


def test_attention_dropout_drops_probabilities():
    q, k, v = _qkv(16, 16)
    v = torch.ones_like(v)  # each output row is then the sum of its kept, rescaled probabilities
    torch.manual_seed(0)
    out = attention(q, k, v, is_causal=True, dropout_p=0.5)
    row_sums = out[..., 0]
    assert not torch.allclose(row_sums, torch.ones_like(row_sums))  # some probabilities were dropped
    assert 0.8 < row_sums.mean().item() < 1.2  # and the rest scaled up


def test_training_step_is_repeatable_under_a_seed():
    # the tiny config with the reference's dropouts (0.1 everywhere)
    cfg = RetroConfig.tiny(hidden_dropout=0.1, attention_dropout=0.1, ffn_dropout=0.1,
                           retro=RetroSettings(retro_layers=(2, 4)))
    torch.manual_seed(0)
    model = RetroModel(cfg).train()
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
