"""Hugging Face transformers configs and weights -> RetroConfig and RetroModel state dicts.

The gpt2, llama and qwen2 families (model/retro.py) compute what GPT2LMHeadModel, LlamaForCausalLM
and Qwen2ForCausalLM compute; this module maps one onto the other, for tests and for a later
checkpoint import. It reads configs and state dicts only; it downloads and loads nothing.

Parameter names, HF -> ours (layer i; "transformer." / "model." prefixes as HF writes them):
    gpt2   wte, wpe                          token_embedding, position_embedding
           h.i.ln_1, h.i.ln_2, ln_f          layers.i.ln_attn, layers.i.ln_mlp, ln_f
           h.i.attn.c_attn, c_proj           layers.i.attn.qkv, attn.out_proj      (Conv1D: transposed)
           h.i.mlp.c_fc, c_proj              layers.i.mlp.fc_in, mlp.fc_out        (Conv1D: transposed)
    llama  embed_tokens, norm, lm_head       token_embedding, ln_f, lm_head (untied only)
    qwen2  layers.i.input_layernorm          layers.i.ln_attn
           post_attention_layernorm          layers.i.ln_mlp
           self_attn.{q,k,v}_proj            layers.i.attn.qkv: rows [q | k | v] stacked (qwen2: biases too)
           self_attn.o_proj                  layers.i.attn.out_proj
           mlp.gate_proj, up_proj, down_proj layers.i.mlp.fc_gate, fc_in, fc_out
Retrieval (encoder, CCA) has no HF counterpart: a mapped model has retro disabled unless the caller
enables it, and then the retrieval parameters keep their fresh initialisation (load with strict=False).
"""

from __future__ import annotations

from typing import Any

import torch

from retro_ray.errors import RetroRayError
from retro_ray.model.retro import RetroConfig, RetroSettings


def config_from_hf(hf_config: Any, **overrides: Any) -> RetroConfig:
    """The RetroConfig of an HF GPT2Config / LlamaConfig / Qwen2Config (retro disabled; overrides win).

    seq_length defaults to the HF model's max_position_embeddings rounded down to chunk_length.
    """
    kind = hf_config.model_type
    if kind == "gpt2":
        if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise RetroRayError(f"GPT-2 activation {hf_config.activation_function!r} is not the gpt2 family's tanh "
                                "GELU; only gelu_new models map.")
        if hf_config.scale_attn_by_inverse_layer_idx or hf_config.reorder_and_upcast_attn:
            raise RetroRayError("GPT-2 attention variants (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn) "
                                "have no counterpart in the gpt2 family.")
        d = hf_config.n_embd
        fields = dict(
            family="gpt2", vocab_size=hf_config.vocab_size, num_layers=hf_config.n_layer, hidden_size=d,
            ffn_hidden_size=hf_config.n_inner or 4 * d, num_attention_heads=hf_config.n_head,
            max_position_embeddings=hf_config.n_positions, layernorm_epsilon=hf_config.layer_norm_epsilon,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings), hidden_dropout=hf_config.resid_pdrop,
            attention_dropout=hf_config.attn_pdrop, ffn_dropout=hf_config.resid_pdrop,
        )
        max_len = hf_config.n_positions
    elif kind in ("llama", "qwen2"):
        if hf_config.hidden_act != "silu":
            raise RetroRayError(f"{kind} activation {hf_config.hidden_act!r} is not SwiGLU's SiLU; it does not map.")
        if getattr(hf_config, "mlp_bias", False) or (kind == "llama" and getattr(hf_config, "attention_bias", False)):
            raise RetroRayError(f"{kind} with attention_bias/mlp_bias has no counterpart in the {kind} family.")
        if getattr(hf_config, "use_sliding_window", False):
            raise RetroRayError("qwen2 with use_sliding_window has no counterpart in the qwen2 family.")
        rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **{
            k: v for k, v in rope.items() if k not in ("rope_type", "type")}}
        fields = dict(
            family=kind, vocab_size=hf_config.vocab_size, num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size, ffn_hidden_size=hf_config.intermediate_size,
            num_attention_heads=hf_config.num_attention_heads, num_key_value_heads=hf_config.num_key_value_heads,
            kv_channels=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
            rope_theta=float(theta), rope_scaling=scaling, layernorm_epsilon=hf_config.rms_norm_eps,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings), hidden_dropout=0.0,
            attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0)), ffn_dropout=0.0,
        )
        max_len = hf_config.max_position_embeddings
    else:
        raise RetroRayError(f"HF model type {kind!r} does not map; gpt2, llama and qwen2 do.")
    fields["retro"] = RetroSettings(enabled=False)
    fields.update(overrides)
    m = fields.get("chunk_length", RetroConfig.chunk_length)
    fields.setdefault("seq_length", max(m, max_len // m * m))
    config = RetroConfig(**fields)
    config.validate()
    return config


def state_dict_from_hf(hf_state_dict: dict[str, torch.Tensor], config: RetroConfig) -> dict[str, torch.Tensor]:
    """Our decoder's parameters from an HF state dict of the config's family (see the module docstring)."""
    sd = {k.removeprefix("transformer.").removeprefix("model."): v for k, v in hf_state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    L = config.num_layers
    if config.family == "gpt2":
        out["token_embedding.weight"] = sd["wte.weight"]
        out["position_embedding.weight"] = sd["wpe.weight"]
        for i in range(L):
            src, dst = f"h.{i}.", f"layers.{i}."
            for a, b in (("ln_1", "ln_attn"), ("ln_2", "ln_mlp")):
                out[dst + b + ".weight"], out[dst + b + ".bias"] = sd[src + a + ".weight"], sd[src + a + ".bias"]
            for a, b in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.out_proj"),
                         ("mlp.c_fc", "mlp.fc_in"), ("mlp.c_proj", "mlp.fc_out")):
                out[dst + b + ".weight"] = sd[src + a + ".weight"].t()  # Conv1D stores [in, out]
                out[dst + b + ".bias"] = sd[src + a + ".bias"]
        out["ln_f.weight"], out["ln_f.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
    elif config.family in ("llama", "qwen2"):
        out["token_embedding.weight"] = sd["embed_tokens.weight"]
        for i in range(L):
            src, dst = f"layers.{i}.", f"layers.{i}."
            out[dst + "ln_attn.weight"] = sd[src + "input_layernorm.weight"]
            out[dst + "ln_mlp.weight"] = sd[src + "post_attention_layernorm.weight"]
            qkv = [src + f"self_attn.{p}_proj" for p in "qkv"]
            out[dst + "attn.qkv.weight"] = torch.cat([sd[p + ".weight"] for p in qkv])
            if config.qkv_bias:
                out[dst + "attn.qkv.bias"] = torch.cat([sd[p + ".bias"] for p in qkv])
            out[dst + "attn.out_proj.weight"] = sd[src + "self_attn.o_proj.weight"]
            for a, b in (("gate_proj", "fc_gate"), ("up_proj", "fc_in"), ("down_proj", "fc_out")):
                out[dst + "mlp." + b + ".weight"] = sd[src + "mlp." + a + ".weight"]
        out["ln_f.weight"] = sd["norm.weight"]
    else:
        raise RetroRayError(f"family={config.family!r} has no HF counterpart; gpt2, llama and qwen2 do.")
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().clone() for k, v in out.items()}

