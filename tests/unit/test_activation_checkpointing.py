"""Activation checkpointing (trainer.activation_checkpointing) recomputes each decoder layer in backward:
the loss and every gradient must be those of the plain forward, bit for bit, with dropout on (the
replay draws the same masks), the encoder run inside the first CCA layer, and a frozen decoder; with the
fast CPU dropout masks of a CPU training worker (cpu_tuning.tune_model) and with torch's own."""

from __future__ import annotations

import pytest
import torch

from retro_ray.model.retro import RetroConfig, RetroModel
from retro_ray.model.retrofit import freeze_decoder
from retro_ray.train.cpu_tuning import tune_model

DROPOUTS = {"hidden_dropout": 0.1, "attention_dropout": 0.1, "ffn_dropout": 0.1}


def _model(family: str, retro: bool, tuned: bool = True) -> RetroModel:
    d = RetroConfig.tiny(vocab_size=256, seq_length=128, chunk_length=32).to_dict()
    d.update(DROPOUTS, family=family)
    d["retro"] = {**d["retro"], "enabled": retro, "retro_encoder_hidden_dropout": 0.1,
                  "retro_encoder_attention_dropout": 0.1}
    torch.manual_seed(0)
    model = RetroModel(RetroConfig.from_dict(d))
    return (tune_model(model) if tuned else model).train()


def _step(model: RetroModel, checkpointing: bool, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.activation_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks for both runs
    loss = model(*batch).loss
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,retro,frozen,tuned", [("retro", True, False, True), ("llama", True, False, True),
                                                       ("gpt2", False, False, True), ("retro", True, True, True),
                                                       ("retro", True, False, False)])
def test_checkpointed_training_step_equals_the_plain_one(family, retro, frozen, tuned):
    model = _model(family, retro, tuned)
    if frozen:
        freeze_decoder(model)
    g = torch.Generator().manual_seed(1)
    B, n, K, r = 2, 128, 2, 64
    batch = (torch.randint(0, 256, (B, n), generator=g), torch.randint(0, 256, (B, n // 32, K, r), generator=g),
             None, torch.randint(0, 256, (B, n), generator=g))
    plain_loss, plain = _step(model, False, batch)
    ckpt_loss, ckpt = _step(model, True, batch)
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    assert all(torch.equal(plain[k], ckpt[k]) for k in plain), [k for k in plain if not torch.equal(plain[k], ckpt[k])]
    if frozen:
        assert all(k.startswith("encoder.") or ".cca." in k or ".ln_cca." in k for k in ckpt)
    # and it really recomputes: with checkpointing on, backward runs the layers' forwards again
    calls = []
    hook = model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))  # replays stop early: no post-hook
    _step(model, True, batch)
    hook.remove()
    assert len(calls) == (1 if frozen else 2)  # a frozen layer below every CCA layer has nothing to recompute for
