"""Hugging Face transformers configs and weights -> RetroConfig and RetroModel state dicts.

The gpt2, llama and qwen2 families (model/retro.py) compute what GPT2LMHeadModel, LlamaForCausalLM
and Qwen2ForCausalLM compute; this module maps one onto the other, and reads a local checkpoint
directory (``load_hf_directory``: config.json and safetensors) or, through model/gguf.py, a GGUF file
(``load_pretrained`` takes either). It never downloads anything and
never runs code from a checkpoint (no remote code).

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

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retro_ray.errors import RetroRayError
from retro_ray.model.retro import RetroConfig, RetroSettings
from retro_ray.pretrained import read_config_json


def context_length(hf_config: Any) -> int:
    """The positions an HF model was trained for."""
    return int(hf_config.n_positions if hf_config.model_type == "gpt2" else hf_config.max_position_embeddings)


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


def state_dict_from_hf(hf_state_dict: dict[str, torch.Tensor], config: RetroConfig,
                       source: str = "the HF state dict") -> dict[str, torch.Tensor]:
    """Our decoder's parameters from an HF state dict of the config's family (see the module docstring).

    Every HF weight must be used: a missing one, or one left over (other than the buffers some
    checkpoints carry and a tied output layer's copy), is a RetroRayError naming it and ``source``.
    """
    sd = _Weights({k.removeprefix("transformer.").removeprefix("model."): v for k, v in hf_state_dict.items()},
                  source, config.family)
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
    sd.check_all_used(ignore={"lm_head.weight"} if config.tie_word_embeddings else set())
    return {k: v.detach().clone() for k, v in out.items()}


# Tensors some checkpoints carry that are not weights: GPT-2's causal-mask buffers, old rotary caches.
_NOT_WEIGHTS = re.compile(r"(\.attn\.(masked_)?bias|rotary_emb\.inv_freq)$")


class _Weights(dict):
    """An HF state dict that remembers which tensors the mapping read, and names what is wrong."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: str, family: str) -> None:
        super().__init__(tensors)
        self.source, self.family, self.used = source, family, set()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self:
            raise RetroRayError(f"{self.source} lacks the weight {name!r} that a {self.family} model of its config "
                                "has; the checkpoint is incomplete or of another shape")
        self.used.add(name)
        return super().__getitem__(name)

    def check_all_used(self, ignore: set[str]) -> None:
        extra = sorted(k for k in self if k not in self.used and k not in ignore and not _NOT_WEIGHTS.search(k))
        if extra:
            raise RetroRayError(f"{self.source} has a weight {extra[0]!r} (and {len(extra) - 1} more) that a "
                                f"{self.family} model of its config does not; it is another architecture or a "
                                "modified checkpoint")



# ---- local checkpoint directories -----------------------------------------------------------------
SUPPORTED_MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass
class HFCheckpoint:
    """A local Hugging Face model directory, read: our config and state dict, and its tokenizer's facts."""

    path: Path
    config: RetroConfig                 # retro disabled: the decoder alone
    state_dict: dict[str, torch.Tensor]  # ours, float32
    tokenizer_path: Path | None          # <dir>/tokenizer.json when there is one
    tokenizer_vocab_size: int | None     # its token count, added tokens included
    eos_token: str | None                # the checkpoint's end-of-text token
    tokenizer: Any = None                # a GGUF file's tokenizer (tokenizers.Tokenizer), made from its metadata
    chat_template: str | None = None     # a GGUF file's chat template
    hf_tokenizer: Any = None             # a GGUF file's tokenizer as transformers made it (to save_pretrained)
    context_length: int | None = None    # the positions the model was trained for (max_position_embeddings)

    def load_tokenizer(self):
        """The checkpoint's tokenizers.Tokenizer, or None when it has none."""
        if self.tokenizer is None and self.tokenizer_path is not None:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        return self.tokenizer


def is_hf_directory(path: str | Path) -> bool:
    """Whether ``path`` looks like a Hugging Face model directory (a config.json naming a model_type),
    rather than one of our run, checkpoint or project directories."""
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and "model_type" in json.loads(cfg.read_text())
    except (OSError, ValueError, TypeError):
        return False


def load_pretrained(path: str | Path, *, weights: bool = True, **overrides: Any) -> HFCheckpoint:
    """A local Hugging Face directory (``load_hf_directory``) or a GGUF file (``model/gguf.py``), read."""
    from retro_ray.model.gguf import is_gguf_file, read_gguf

    if is_gguf_file(path):
        return read_gguf(path, weights=weights, **overrides)
    return load_hf_directory(path, weights=weights, **overrides)


def is_pretrained(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint of another project: an HF directory or a GGUF file."""
    from retro_ray.model.gguf import is_gguf_file

    return is_hf_directory(path) or is_gguf_file(path)


def _safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RetroRayError(f"cannot read {index}: {e}; re-save the model with save_pretrained") from None
        files = [d / f for f in sorted(set(weight_map.values()))]
        lost = next((f for f in files if not f.is_file()), None)
        if lost is not None:
            raise RetroRayError(f"{index} names the shard {lost.name}, which is not in {d}; copy the whole checkpoint")
        return files
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    found = sorted(p.name for p in d.iterdir())[:8]
    hint = (" (pytorch_model.bin is not read: convert it with save_pretrained(dir, safe_serialization=True))"
            if (d / "pytorch_model.bin").is_file() else "")
    raise RetroRayError(f"{d} has no model.safetensors or model.safetensors.index.json (found: {', '.join(found)})"
                        f"{hint}; give the directory save_pretrained wrote")


def load_hf_directory(path: str | Path, *, weights: bool = True, **overrides: Any) -> HFCheckpoint:
    """Read a local GPT2LMHeadModel / LlamaForCausalLM / Qwen2ForCausalLM directory (config.json and
    safetensors, sharded or not). Nothing is downloaded and no code from the directory runs.
    ``weights=False`` reads the config and tokenizer only (state_dict is then empty).
    ``overrides``: RetroConfig fields (seq_length, chunk_length) set on the mapped config."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    d = Path(path).expanduser()
    if not d.is_dir():
        what = "is not a directory" if d.exists() else "does not exist"
        raise RetroRayError(f"{d} {what}; give a local Hugging Face model directory (config.json and *.safetensors, "
                            "as save_pretrained writes it) or a .gguf file; nothing is downloaded")
    raw = read_config_json(d, fix="give the directory save_pretrained wrote")
    kind = raw.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise RetroRayError(f"{d} holds a model of type {kind!r}; supported: {supported}")
    hf_config = AutoConfig.for_model(kind, **{k: v for k, v in raw.items() if k != "model_type"})
    config = config_from_hf(hf_config, **overrides)
    hf: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(d) if weights else []:
        try:
            hf.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type (and OSError) on bad files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RetroRayError(f"{f} is not a readable safetensors file ({first}); copy it again or re-save the "
                                "model with save_pretrained") from None
    sd = state_dict_from_hf({k: v.float() for k, v in hf.items()}, config, str(d)) if weights else {}
    tok_file = d / "tokenizer.json"
    vocab = None
    if tok_file.is_file():
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(tok_file)).get_vocab_size()
    from retro_ray.tokenizer import checkpoint_eos_token

    return HFCheckpoint(path=d.resolve(), config=config, state_dict=sd,
                        tokenizer_path=tok_file.resolve() if tok_file.is_file() else None,
                        tokenizer_vocab_size=vocab, eos_token=checkpoint_eos_token(d),
                        context_length=context_length(hf_config))
