"""The fused output layer + cross-entropy (retro_ray/model/loss.py) against the unfused reference:
F.cross_entropy(F.linear(h, W).float(), labels, reduction="sum"), loss and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from retro_ray.model import RetroConfig, RetroModel
from retro_ray.model import loss as loss_module
from retro_ray.model.loss import IGNORE_INDEX, fused_loss, linear_cross_entropy
from retro_ray.model.retrofit import freeze_decoder

V, D = 1000, 48


def reference(h, w, labels, bias=None):
    return F.cross_entropy(F.linear(h, w, bias).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def inputs(n: int, dtype=torch.float32, ignored: float = 0.25, seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    # A scale that gives a spread of probabilities (losses from ~0 to ~20), not a near-uniform softmax.
    h = (torch.randn(n, D, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = IGNORE_INDEX
    b = (torch.randn(V, generator=g)).to(dtype).requires_grad_() if bias else None
    return h, w, labels, b


def grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("n, block", [(300, 64), (256, 64), (37, 1000), (1, 7)],
                         ids=["ragged last block", "whole blocks", "one block", "one row"])
@pytest.mark.parametrize("bias", [False, True], ids=["weight", "weight+bias"])
def test_equals_unfused_fp32(n, block, bias):
    h, w, labels, b = inputs(n, bias=bias)
    want = reference(h, w, labels, b)
    got = linear_cross_entropy(h, w, labels, b, block_rows=block)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # A factor other than 1 on the loss checks that backward scales the stored gradients.
    for g_want, g_got in zip(grads(want * 0.37, h, w, b), grads(got * 0.37, h, w, b)):
        assert g_got.dtype == g_want.dtype
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_losses_beyond_float32_probabilities_are_exact():
    """Rows whose target probability underflows float32 (losses of ~100 and ~1000 nats): the CPU path
    takes -log(p[target]) and must redo these rows from the logits, not return inf."""
    h, w, labels, _ = inputs(64, ignored=0.0)
    with torch.no_grad():
        w[labels[0]] -= 60 * h[0] / h[0].norm() ** 2  # moves the target's logit of row 0 down by ~60
        w[labels[1]] -= 900 * h[1] / h[1].norm() ** 2
    want = F.cross_entropy(F.linear(h, w).double(), labels, reduction="none")
    assert want[0] > 90 and want[1] > 900
    got = linear_cross_entropy(h, w, labels, block_rows=16)
    torch.testing.assert_close(got.double(), want.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(linear_cross_entropy(h, w, labels, reduction="none").double(), want,
                               rtol=1e-6, atol=1e-5)
    for g_want, g_got in zip(grads(reference(h, w, labels), h, w), grads(got, h, w)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_ignored_rows_get_zero_gradient_and_no_loss():
    h, w, labels, _ = inputs(200, ignored=0.5)
    got = linear_cross_entropy(h, w, labels, block_rows=32)
    (gh,) = grads(got, h)
    ignored = labels == IGNORE_INDEX
    assert ignored.sum() > 50
    assert torch.all(gh[ignored] == 0) and torch.all(gh[~ignored].abs().sum(1) > 0)
    # Changing the hidden state of an ignored row changes nothing.
    h2 = h.detach().clone()
    h2[ignored] += 5.0
    torch.testing.assert_close(linear_cross_entropy(h2, w, labels, block_rows=32), got.detach(), rtol=0, atol=0)


def test_all_ignored_gives_zero_loss_and_zero_gradients():
    h, w, labels, _ = inputs(100, ignored=1.0)
    got = linear_cross_entropy(h, w, labels, block_rows=32)
    assert got.item() == 0.0
    gh, gw = grads(got, h, w)
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    assert reference(h, w, labels).item() == 0.0  # the reference agrees


def test_tied_weight_used_twice_gets_both_gradients():
    """An embedding table that embeds the tokens and is the output layer (RetroModel's tied output)."""
    torch.manual_seed(0)
    table = (torch.randn(V, D) * 0.5).requires_grad_()
    tokens = torch.randint(0, V, (120,))
    labels = tokens.roll(-1)
    labels[::7] = IGNORE_INDEX
    proj = torch.randn(D, D) / D**0.5

    def loss(fn):
        h = torch.tanh(F.embedding(tokens, table) @ proj)  # [N, d]
        return fn(h, table, labels)

    want = torch.autograd.grad(loss(reference), table)[0]
    got = torch.autograd.grad(loss(lambda h, w, t: linear_cross_entropy(h, w, t, block_rows=50)), table)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_equals_unfused_bf16_within_bf16_rounding():
    h, w, labels, _ = inputs(300, dtype=torch.bfloat16)
    want = reference(h, w, labels)
    got = linear_cross_entropy(h, w, labels, block_rows=64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-2)
    for g_want, g_got in zip(grads(want, h, w), grads(got, h, w)):
        assert g_got.dtype == torch.bfloat16
        # Both round the same float32 gradient of the logits to bf16 for the matmuls; they differ in
        # the matmuls' blocking (and d_weight's sum over blocks is float32 here). Scale-relative.
        scale = g_want.float().abs().max()
        assert (g_got.float() - g_want.float()).abs().max() <= 2e-2 * scale


def test_frozen_weight_gets_no_gradient():
    h, w, labels, _ = inputs(150)
    w = w.detach()  # requires_grad False, as token_embedding / lm_head under retro.freeze_decoder
    want = reference(h, w, labels)
    got = linear_cross_entropy(h, w, labels, block_rows=64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    assert w.grad is None
    h2 = h.detach().clone().requires_grad_()
    reference(h2, w, labels).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_frozen_hidden_gets_no_gradient():
    h, w, labels, _ = inputs(150)
    h = h.detach()
    got = linear_cross_entropy(h, w, labels, block_rows=64)
    got.backward()
    w2 = w.detach().clone().requires_grad_()
    reference(h, w2, labels).backward()
    assert h.grad is None
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_per_token_nll_equals_unfused_and_has_no_gradient():
    h, w, labels, _ = inputs(300)
    want = F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    got = linear_cross_entropy(h, w, labels, reduction="none", block_rows=64)
    assert got.shape == (300,) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    assert torch.all(got[labels == IGNORE_INDEX] == 0)
    # Without grad, the summed loss takes the same per-token path.
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, labels, block_rows=64), want.sum().detach(),
                                   rtol=1e-5, atol=1e-4)


def test_the_comparison_can_fail():
    """A wrong label changes the loss and the gradients beyond the tolerances used above."""
    h, w, labels, _ = inputs(100, ignored=0.0)
    want = reference(h, w, labels)
    wrong = labels.clone()
    wrong[3] = (wrong[3] + 1) % V
    got = linear_cross_entropy(h, w, wrong, block_rows=32)
    assert (got - want).abs() > 1e-3
    assert (grads(got, w)[0] - grads(want, w)[0]).abs().max() > 1e-3


# ---- in the model --------------------------------------------------------------------------------


@pytest.mark.parametrize("family, frozen", [({}, False), (dict(family="llama", tie_word_embeddings=False), False),
                                            ({}, True), (dict(family="llama", tie_word_embeddings=False), True)],
                         ids=["tied", "untied", "tied, frozen decoder", "untied, frozen decoder"])
def test_model_loss_and_gradients_equal_the_unfused_path(family, frozen, monkeypatch):
    monkeypatch.setitem(loss_module.BLOCK_ROWS, "cpu", 48)  # 2 x 64 rows: blocks of 48, 48 and 32
    torch.manual_seed(0)
    config = RetroConfig.tiny(**family)
    model = RetroModel(config).eval()
    if frozen:  # RETRO-fitting: the output layer gets no gradient, the encoder and CCA do
        freeze_decoder(model)
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_length))
    C = config.seq_length // config.chunk_length
    neighbors = torch.randint(0, config.vocab_size, (2, C, 2, 2 * config.chunk_length))
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        with fused_loss(fused):
            out = model(tokens, neighbors, labels=labels)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (ref, ref_grads), (got, got_grads) = run(False), run(True)
    assert ref.logits is not None and got.logits is None
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=1e-6)
    assert set(got_grads) == set(ref_grads)
    output = model.token_embedding.weight if model.lm_head is None else model.lm_head.weight
    assert (output.grad is None) == frozen
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_model_token_nll_equals_the_logits(monkeypatch):
    monkeypatch.setitem(loss_module.BLOCK_ROWS, "cpu", 48)  # several blocks, the last one short
    torch.manual_seed(0)
    config = RetroConfig.tiny()
    model = RetroModel(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_length))
    labels = tokens.roll(-1, dims=1)
    labels[0, :5] = IGNORE_INDEX
    with torch.no_grad():
        logits = model(tokens).logits
        want = F.cross_entropy(logits.reshape(-1, config.vocab_size), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="none").reshape(labels.shape)
        got = model.token_nll(tokens, labels)
    assert got.shape == labels.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_the_model_trains_with_its_loss_fn():
    """RetroModel.loss_fn is what a training forward calls (trainer.loss_kernel swaps it); evaluation
    (token_nll) keeps this project's loss."""
    torch.manual_seed(0)
    config = RetroConfig.tiny()
    model = RetroModel(config)
    assert model.loss_fn is linear_cross_entropy
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_length))
    labels = tokens.roll(-1, dims=1)
    calls = []

    def unfused(h, w, t):
        calls.append(tuple(h.shape))
        return reference(h, w, t)

    want = model(tokens, labels=labels).loss
    model.loss_fn = unfused
    got = model(tokens, labels=labels).loss
    assert calls == [(2 * config.seq_length, config.hidden_size)]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        model.token_nll(tokens, labels)
    assert len(calls) == 1


@pytest.mark.parametrize("name, package", [("liger", "liger_kernel"), ("cce", "cut_cross_entropy")])
def test_gpu_loss_kernels_are_refused_in_one_line_where_they_cannot_run(name, package):
    import importlib.util

    from retro_ray.errors import RetroRayError

    assert loss_module.loss_kernel("retro_ray") is linear_cross_entropy
    if importlib.util.find_spec(package) is None:  # this project's CPU machines: the package is not installed
        with pytest.raises(RetroRayError, match=rf"trainer\.loss_kernel={name} needs the .* package, which does not "
                                                rf"import here \(.*\); pip install .* on the GPU workers, or use "
                                                rf"trainer\.loss_kernel=retro_ray\.$"):
            loss_module.loss_kernel(name)
        return
    h, w, labels, _ = inputs(8)  # installed: CPU tensors are refused before the Triton kernel sees them
    with pytest.raises(RetroRayError, match=rf"trainer\.loss_kernel={name} runs on CUDA GPUs only"):
        loss_module.loss_kernel(name)(h, w, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: liger and cce are Triton kernels")
@pytest.mark.parametrize("name, package", [("liger", "liger_kernel"), ("cce", "cut_cross_entropy")])
def test_gpu_loss_kernels_equal_ours(name, package):
    pytest.importorskip(package, reason=f"trainer.loss_kernel={name} needs {package} installed")
    # float32 within TF32's rounding (Triton's dot may take float32 inputs as TF32), bf16 within bf16's
    for dtype, rtol in ((torch.float32, 5e-3), (torch.bfloat16, 2e-2)):
        h, w, labels, _ = inputs(300, dtype=torch.float32)
        h, w = (t.detach().cuda().to(dtype).requires_grad_() for t in (h, w))
        labels = labels.cuda()
        want = linear_cross_entropy(h, w, labels)
        got = loss_module.loss_kernel(name)(h, w, labels)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-2)
        for g_want, g_got in zip(grads(want, h, w), grads(got, h, w)):
            scale = g_want.float().abs().max()
            assert (g_got.float() - g_want.float()).abs().max() <= rtol * scale
