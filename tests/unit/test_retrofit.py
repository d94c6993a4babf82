"""RETRO-fitting a decoder: step 0 equals the base exactly, and a frozen decoder stays bit for bit."""

import dataclasses

import pytest
import torch

from retro_ray.errors import RetroRayError
from retro_ray.model import RetroConfig, RetroModel
from retro_ray.model.retro import RetroSettings
from retro_ray.model.retrofit import is_retrieval_parameter, load_decoder, retrofit
from retro_ray.train.loop import param_groups

M, N, K, V = 16, 64, 2, 256
NARROW = dataclasses.replace(RetroConfig.tiny().retro, retro_encoder_hidden_size=32)


def gpt_base(seed: int = 0, **overrides) -> RetroModel:
    torch.manual_seed(seed)
    cfg = RetroConfig.tiny(**overrides)
    return RetroModel(dataclasses.replace(cfg, retro=dataclasses.replace(cfg.retro, enabled=False)))


def inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, V, (batch, N), generator=g), torch.randint(0, V, (batch, N // M, K, 2 * M), generator=g))


def fitted(retro: RetroSettings | None = None, freeze: bool = True, **dropout) -> tuple[RetroModel, RetroModel]:
    base = gpt_base(**dropout)
    cfg = RetroConfig.tiny(**dropout)
    cfg = dataclasses.replace(cfg, retro=dataclasses.replace(retro or cfg.retro, freeze_decoder=freeze))
    torch.manual_seed(1)
    model = RetroModel(cfg)
    retrofit(model, base.state_dict(), freeze=freeze)
    return base, model


@pytest.mark.parametrize("retro", [None, NARROW], ids=["encoder width d", "encoder width d/2"])
def test_a_fresh_retrofit_equals_its_base_with_neighbours_given(retro):
    base, model = fitted(retro)
    tokens, neighbors = inputs()
    with torch.no_grad():
        want = base.eval()(tokens).logits
        got = model.eval()(tokens, neighbors).logits
        unfitted = RetroModel(model.config).eval()
        unfitted.load_state_dict(base.state_dict(), strict=False)
    assert torch.equal(got, want)
    with torch.no_grad():  # without the zeroed CCA outputs the same decoder reads its neighbours
        assert (unfitted(tokens, neighbors).logits - want).abs().max() > 1e-4


def test_training_a_retrofit_moves_only_the_retrieval_part():
    base, model = fitted(hidden_dropout=0.1, attention_dropout=0.1)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    tokens, neighbors = inputs(batch=4)
    for _ in range(3):
        loss = model(tokens, neighbors, labels=tokens.roll(-1, dims=1)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        frozen_grads = [n for n, p in model.named_parameters() if not is_retrieval_parameter(n) and p.grad is not None]
        assert frozen_grads == []
        opt.step()
    base_state = base.state_dict()
    for name, tensor in model.state_dict().items():
        if is_retrieval_parameter(name):
            continue
        assert torch.equal(tensor, base_state[name]), name  # bit for bit
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    state_of = {id(p) for p in opt.state}
    for name, p in model.named_parameters():
        assert (id(p) in in_optimizer) == is_retrieval_parameter(name), name
    assert state_of == in_optimizer  # only trainable parameters carry Adam moments
    assert all(model.get_parameter(n).abs().max() > 0 for n, _ in model.named_parameters()
               if ".cca." in n and ".out_proj.weight" in n)
    model.eval()
    base.eval()
    with torch.no_grad():
        assert (model(tokens, neighbors).logits - base(tokens).logits).abs().max() > 1e-4


def test_unfrozen_retrofit_trains_everything():
    _, model = fitted(freeze=False)
    assert all(p.requires_grad for p in model.parameters())


def test_a_base_that_does_not_fit_is_named():
    _, model = fitted()
    state = gpt_base().state_dict()
    missing = dict(state)
    missing.pop("layers.0.mlp.fc_in.weight")
    with pytest.raises(RetroRayError, match=r"base.pt has no weight 'layers.0.mlp.fc_in.weight' \(and 0 more\)"):
        load_decoder(model, missing, "base.pt")
    extra = {**state, "layers.9.attn.qkv.weight": torch.zeros(1)}
    with pytest.raises(RetroRayError, match=r"base.pt has a weight 'layers.9.attn.qkv.weight' that this decoder does not"):
        load_decoder(model, extra, "base.pt")
    wide = gpt_base(ffn_hidden_size=384).state_dict()
    with pytest.raises(RetroRayError, match=r"base.pt's weight 'layers.0.mlp.fc_in.weight' has shape \(384, 64\) but "
                                            r"the decoder's is \(256, 64\)"):
        load_decoder(model, wide, "base.pt")
    with pytest.raises(RetroRayError, match="RETRO-fitting needs a RETRO"):
        retrofit(gpt_base(), state, freeze=True)


def test_freezing_a_gpt_is_refused():
    cfg = RetroConfig.tiny()
    with pytest.raises(RetroRayError, match="retro.freeze_decoder=true with retro.enabled=false would leave nothing"):
        dataclasses.replace(cfg, retro=dataclasses.replace(cfg.retro, enabled=False, freeze_decoder=True)).validate()
