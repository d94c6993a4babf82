"""RETRO-fitting: a pretrained decoder, frozen, learns to read retrieved neighbours.

Borgeaud et al. 2022, §4.2: take a trained transformer, add the neighbour encoder and the chunked
cross-attention (CCA), freeze the decoder's own weights and train only the new ones, on a few
percent of the pretraining tokens. The decoder's weights come from a base model of the same shape
(``load_decoder``): our GPT baseline's export, or a checkpoint imported from another library.

Which parameters are the decoder's: everything except ``encoder.*`` (the neighbour encoder) and each
CCA layer's ``ln_cca`` and ``cca`` (its norm and attention). So a GPT's state dict (``retro.enabled
= false``) is exactly the decoder part of a RETRO of the same shape.

Step 0 equals the base exactly (``zero_cca_outputs``): every CCA's output projection starts at zero,
weight and bias, so the residual branch adds exactly 0.0 and the logits are the base's bit for bit,
whatever the neighbours. The projection's own gradient is not zero (its input, the attention
output, is not), so the first update moves it and the rest of CCA and the encoder follow from the
second. We chose this over a zero-initialised gate (Flamingo's tanh gate) because it adds no
parameter and no state-dict key, and the forward stays the one the model always runs.

Frozen means frozen (``freeze_decoder``): the decoder's parameters get ``requires_grad=False``, so
autograd computes no gradient for them, the optimizer (built from trainable parameters only) keeps
no state for them, and their bits never change. Backward then ends at the first CCA layer: nothing
below it has a trainable input (its hidden states come from frozen layers over a frozen embedding).
"""

from __future__ import annotations

import torch
from torch import nn

from retro_ray.errors import RetroRayError

__all__ = ["freeze_decoder", "is_retrieval_parameter", "load_decoder", "retrofit", "zero_cca_outputs"]


def is_retrieval_parameter(name: str) -> bool:
    """Whether a state-dict / parameter name belongs to the retrieval part (encoder, CCA and its norm)."""
    return name.startswith("encoder.") or ".cca." in name or ".ln_cca." in name


def load_decoder(model: nn.Module, base_state: dict[str, torch.Tensor], source: str = "the base model") -> int:
    """Copy every decoder tensor of ``model`` from ``base_state``; returns how many were copied.

    The base must hold exactly the decoder: a tensor it lacks, a tensor the decoder lacks (other than
    retrieval ones, which a RETRO base may carry and which are ignored) or a shape that differs is a
    RetroRayError naming the first such key.
    """
    own = {k: v for k, v in model.state_dict().items() if not is_retrieval_parameter(k)}
    base = {k: v for k, v in base_state.items() if not is_retrieval_parameter(k)}
    missing = [k for k in own if k not in base]
    if missing:
        raise RetroRayError(f"{source} has no weight {missing[0]!r} (and {len(missing) - 1} more) that the decoder "
                            "needs; give a model of the same family and shape")
    unexpected = [k for k in base if k not in own]
    if unexpected:
        raise RetroRayError(f"{source} has a weight {unexpected[0]!r} that this decoder does not; give a model of "
                            "the same family and shape")
    for k, v in own.items():
        if tuple(base[k].shape) != tuple(v.shape):
            raise RetroRayError(f"{source}'s weight {k!r} has shape {tuple(base[k].shape)} but the decoder's is "
                                f"{tuple(v.shape)}; give a model of the same shape")
    with torch.no_grad():
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for k in own:
            target = params.get(k, buffers.get(k))
            target.copy_(base[k].to(dtype=target.dtype, device=target.device))
    return len(own)


def zero_cca_outputs(model: nn.Module) -> int:
    """Zero every CCA output projection (weight and bias): the retrieval branch then adds exactly 0."""
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".cca." in name and ".out_proj." in name:
                p.zero_()
                n += 1
    return n


def freeze_decoder(model: nn.Module) -> int:
    """``requires_grad=False`` on every decoder parameter; returns how many parameters (tensors) froze."""
    n = 0
    for name, p in model.named_parameters():
        if not is_retrieval_parameter(name):
            p.requires_grad_(False)
            n += 1
    return n


def retrofit(model: nn.Module, base_state: dict[str, torch.Tensor], *, freeze: bool, source: str = "the base model") -> dict:
    """Make ``model`` (a RETRO) a RETRO-fit of ``base_state``: decoder copied, CCA outputs zeroed, decoder
    frozen when ``freeze``. Returns counts for the run's log."""
    if not getattr(model.config.retro, "enabled", False):
        raise RetroRayError("RETRO-fitting needs a RETRO (model.retro.enabled=true); a GPT has nothing to fit")
    copied = load_decoder(model, base_state, source)
    zeroed = zero_cca_outputs(model)
    frozen = freeze_decoder(model) if freeze else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"decoder_tensors_copied": copied, "cca_outputs_zeroed": zeroed, "decoder_tensors_frozen": frozen,
            "trainable_parameters": trainable}
