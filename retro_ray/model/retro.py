"""RETRO: a GPT decoder with chunked cross-attention to retrieved neighbours.

Borgeaud et al. 2022, "Improving language models by retrieving from trillions of tokens".
Single-device PyTorch; distribution (DeepSpeed, Ray) lives elsewhere and wraps this module.

Shapes, used throughout:
    B  batch size                  n  tokens in a sequence (seq_length when training)
    m  chunk_length                C  chunks with neighbours = n // m
    K  neighbours per chunk        r  tokens per neighbour (chunk + continuation = 2m)
    d  hidden_size                 h  attention heads, dh = d // h (unless kv_channels is set)
    V  vocab_size                  de encoder width (= d unless retro_encoder_hidden_size is set)
    S  a cache's max_length        hk key/value heads (= h unless num_key_value_heads is set)

Data flow of one forward pass:
    tokens [B, n] -> embedding -> decoder layers 1..L -> LayerNorm -> tied output -> logits [B, n, V]
    In a decoder layer listed in retro_layers, between self-attention and MLP, chunked
    cross-attention (CCA) lets each token read the encoded neighbours of the chunk *before* it.
    neighbor_tokens [B, C, K, r] -> shared embedding -> encoder -> [B, C, K, r, de]; the encoder runs
    once, at the first CCA layer, conditioned on that layer's hidden states of the retrieving chunk.

Incremental decoding (generation) goes through the same forward and the same layers, with a
RetroCache that the model makes (new_cache) and owns the layout of:
    cache.k[i], cache.v[i]               [B, hk, S, dh]      self-attention keys/values, every decoder layer
    cache.neighbor_k[i], neighbor_v[i]   [B, h, Kmax*r, dh]  CCA layer i's projection of each row's
    cache.neighbor_mask                  [B, Kmax*r]         current neighbour set, and which keys exist
    cache.states                         [B, S, d]           first CCA layer's normed states (encoder context)
    forward(tokens [B, T], cache=, positions=[B]) feeds T tokens per row at its own positions; prefill
    is T = the prompt, decoding T = 1 (or a few). Neighbours are not chunk-aligned tensors here but
    sets added per row with cache.add_neighbors(row, p, tokens [K, r]): visible from position p until
    the row's next set (the training forward's chunk j is the set at p = (j+1)m-1). The forward that
    feeds p runs the encoder for it, conditioned on the first CCA layer's states of tokens p-m+1..p,
    and each CCA layer projects it to keys/values once, into its cache slot. Why sets and not chunks:
    a generator also gives a prompt neighbours at its last token, wherever that falls in a chunk.
    Self-attention differs only in where keys come from (the cache up to each query's position), CCA
    only in which set a query reads; the layer math (norms, residuals, MLP) is the training code.

Design choices:
    * Pre-LayerNorm blocks with a GELU MLP and a final LayerNorm (GPT-2 / Megatron layout).
    * Rotary position embeddings (RoPE) in every self-attention, decoder and encoder: relative,
      no max-length table (the model runs on any length), and it serves the encoder's r-token
      neighbours with the same code; Megatron's RETRO uses rotary embeddings too. Cross-attention
      (CCA and the encoder's conditioning) uses no position encoding: queries and keys come from
      different sequences, so there is no shared coordinate to rotate by; token order inside a
      neighbour is already mixed into its states by the encoder's self-attention.
    * The encoder has the decoder's width by default, as in Megatron and NeMo. A narrower one
      (retro_encoder_hidden_size) reads the shared embedding through a d -> de projection, keeps the
      head size, and is read back by CCA's de -> d key/value projection; at de = d/2 its layers cost a
      quarter of a decoder layer, which takes RETRO's training cost from 1.52x GPT's to 1.19x (125M).
    * Tied input/output embeddings (GPT-2 and Megatron's default): saves V*d parameters (~39M of
      GPT-2 small's 124M), and the encoder embeds neighbours with the same table.
    * Labels are the next-token targets already aligned with tokens: labels[:, i] is the target for
      logits[:, i] (the data pipeline cuts a (n+1)-token sample into tokens=x[:-1], labels=x[1:]).
      Positions whose label is IGNORE_INDEX (-100) are left out of the mean loss.
    * With labels, the output layer and the loss are one fused step (model/loss.py) that walks the
      rows in blocks and never holds the [B, n, V] logits (824 MB at 8 x 512 tokens, V = 50,304):
      forward(..., labels=) returns the loss and no logits. token_nll() gives per-token losses the
      same way, for evaluation. The training loss is the module's loss_fn, which a trainer may swap
      for a GPU kernel of the same contract (trainer.loss_kernel).
    * Decoder families (config.family), so that pretrained GPT-2 / Llama / Qwen2 weights can be mapped
      in (model/hf.py maps the parameter names; the math matches transformers' modeling code):
        retro  the layout above: LayerNorm, erf GELU, RoPE theta^(-2i/dh), biases everywhere, tied.
        gpt2   learned absolute positions (a max_position_embeddings table: seq_length beyond it is
               refused), tanh GELU, LayerNorm, biases, tied; q/k/v fused as GPT-2's c_attn.
        llama  RMSNorm, SwiGLU MLP (fc_gate, fc_in, fc_out = gate/up/down_proj), no biases, RoPE with
               rope_theta and rope_scaling (linear, llama3), grouped-query attention
               (num_key_value_heads; the cache keeps only those heads), explicit head size
               (kv_channels), tied or untied output (lm_head).
        qwen2  llama with biases on q/k/v.
      Retrieval follows the family, because it has no layout of its own to keep: CCA and the encoder
      use the family's norm, MLP, biases and head size (the encoder's heads are de/dh), the encoder
      the family's positions (RoPE, or the learned table for a neighbour's r positions); their
      attention keeps all heads (no GQA), as their keys/values are computed once per neighbour set,
      not cached per token. Parameter names stay ours in every family, and the default family's
      are unchanged (no fc_gate, position_embedding or lm_head).
    * Dropout is nn.Dropout (Dropout below) and every attention calls its module's attention_fn,
      which is F.scaled_dot_product_attention (sdpa below): the model has torch's own semantics on
      every device. A trainer may swap in other implementations of the same two (the training loop
      does on CPU workers, retro_ray/train/cpu_tuning.py: dropout masks drawn with numpy, ~10x faster
      than torch's bernoulli_, which was a third of a CPU training step).
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from retro_ray.errors import RetroRayError
from retro_ray.model.loss import IGNORE_INDEX, fused_loss_enabled, linear_cross_entropy

ROPE_BASE = 10000.0
FAMILIES = ("retro", "gpt2", "llama", "qwen2")
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def default_retro_layers(num_layers: int) -> tuple[int, ...]:
    """Megatron's default CCA layers: every 3rd layer from layer 6 (from layer 9 above 15 layers)."""
    start = 6 if num_layers <= 15 else 9
    return tuple(range(start, num_layers + 1, 3))


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetroSettings:
    """The retrieval part of the model (NeMo's `retro` block)."""

    enabled: bool = field(
        default=True,
        metadata={"help": "Add the retro encoder and chunked cross-attention; false gives a plain GPT."},
    )
    retro_encoder_num_layers: int = field(
        default=2, metadata={"help": "Number of transformer layers in the neighbour encoder."}
    )
    retro_encoder_hidden_size: int | None = field(
        default=None,
        metadata={
            "help": "Width of the neighbour encoder; unset = hidden_size (Megatron's and NeMo's only "
            "choice). A narrower encoder, a multiple of the head size hidden_size/num_attention_heads, "
            "cuts what retrieval costs in training: at the 125M size, 384 takes RETRO's training FLOPs "
            "from 1.52x GPT's to 1.19x. Its heads keep the decoder's head size; its MLP keeps the "
            "decoder's ffn_hidden_size/hidden_size ratio."
        },
    )
    retro_num_neighbors: int = field(
        default=2, metadata={"help": "Neighbours (K) retrieved per chunk and fed to the model."}
    )
    retro_layers: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "1-based decoder layer numbers with chunked cross-attention; unset = Megatron's "
            "default, every 3rd layer from layer 6 (from layer 9 when num_layers > 15)."
        },
    )
    retro_encoder_hidden_dropout: float = field(
        default=0.1, metadata={"help": "Dropout on the encoder's embeddings and residual branches."}
    )
    retro_encoder_attention_dropout: float = field(
        default=0.1, metadata={"help": "Dropout on the encoder's attention probabilities."}
    )
    retro_encoder_cross_attention_layers: tuple[int, ...] = field(
        default=(1,),
        metadata={
            "help": "1-based encoder layer numbers that cross-attend to the retrieving chunk's "
            "decoder states (Megatron: the first layer only)."
        },
    )
    freeze_decoder: bool = field(
        default=False,
        metadata={
            "help": "RETRO-fitting (Borgeaud et al. 2022, sec. 4.2): train only the neighbour encoder and the "
            "chunked cross-attention (with their norms and projections); the decoder's own weights get no "
            "gradient and no optimizer state and stay bit for bit. Usually with model.init_from."
        },
    )


@dataclass(frozen=True)
class RetroConfig:
    """Model hyper-parameters; names and defaults follow NeMo's RETRO table (GPT-2 small size)."""

    vocab_size: int = field(
        default=50304,
        metadata={
            "help": "Embedding rows; at least the tokenizer's vocabulary, padded to a multiple of 128 "
            "for fast matmuls (GPT-2's 50257 -> 50304)."
        },
    )
    num_layers: int = field(default=12, metadata={"help": "Number of decoder layers."})
    hidden_size: int = field(default=768, metadata={"help": "Model width d."})
    ffn_hidden_size: int = field(default=3072, metadata={"help": "Inner width of the MLP (usually 4d)."})
    num_attention_heads: int = field(default=12, metadata={"help": "Attention heads; must divide hidden_size."})
    seq_length: int = field(
        default=2048,
        metadata={"help": "Training sequence length in tokens (NeMo: encoder_seq_length); a multiple of chunk_length."},
    )
    chunk_length: int = field(
        default=64, metadata={"help": "Retrieval chunk length m; neighbours are 2m tokens (chunk + continuation)."}
    )
    init_method_std: float = field(
        default=0.023,
        metadata={"help": "Std of the normal weight init; residual output projections use std/sqrt(2*layers)."},
    )
    hidden_dropout: float = field(
        default=0.1, metadata={"help": "Dropout on the decoder's embeddings and residual branches."}
    )
    attention_dropout: float = field(default=0.1, metadata={"help": "Dropout on attention probabilities."})
    ffn_dropout: float = field(
        default=0.1, metadata={"help": "Dropout after the MLP activation (decoder and encoder)."}
    )
    retro: RetroSettings = field(
        default_factory=RetroSettings, metadata={"help": "Retrieval settings (encoder, CCA layers, neighbours)."}
    )
    family: str = field(
        default="retro",
        metadata={
            "help": "Decoder layout. retro: pre-LN LayerNorm, GELU MLP, RoPE, biases (this project's original); "
            "gpt2: learned absolute positions (max_position_embeddings), tanh GELU, biases (GPT2LMHeadModel); "
            "llama: RMSNorm, SwiGLU MLP, RoPE (rope_theta, rope_scaling), no biases (LlamaForCausalLM); "
            "qwen2: llama with q/k/v biases (Qwen2ForCausalLM). The encoder and CCA follow it."
        },
    )
    num_key_value_heads: int | None = field(
        default=None,
        metadata={"help": "Key/value heads of the decoder's self-attention (grouped-query attention, llama's "
                          "num_key_value_heads); must divide num_attention_heads; unset = num_attention_heads."},
    )
    kv_channels: int | None = field(
        default=None,
        metadata={"help": "Attention head size (Megatron's kv_channels, HF's head_dim); unset = "
                          "hidden_size/num_attention_heads."},
    )
    max_position_embeddings: int = field(
        default=1024,
        metadata={"help": "gpt2 family: rows of the learned position table, the longest sequence it can read "
                          "(seq_length and the 2m-token neighbours must fit); unused by RoPE families."},
    )
    rope_theta: float = field(
        default=ROPE_BASE, metadata={"help": "RoPE base period (llama 3: 500000); unused by the gpt2 family."}
    )
    rope_scaling: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "RoPE frequency scaling, as HF's rope_scaling: {rope_type: linear, factor} or {rope_type: "
                          "llama3, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}; "
                          "unset = none. llama and qwen2 families only."},
    )
    layernorm_epsilon: float = field(
        default=1e-5, metadata={"help": "Epsilon of every LayerNorm / RMSNorm (llama: rms_norm_eps)."}
    )
    tie_word_embeddings: bool = field(
        default=True,
        metadata={"help": "Output logits use the input embedding table (false: a separate lm_head, as in most "
                          "llama and qwen2 checkpoints)."},
    )

    # ---- derived values --------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        if self.kv_channels is not None:
            return self.kv_channels
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads of the decoder's self-attention (= num_attention_heads without GQA)."""
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def uses_rope(self) -> bool:
        return self.family != "gpt2"

    @property
    def norm(self) -> str:
        """'rms' (llama, qwen2: RMSNorm, a scale and no bias) or 'layer' (LayerNorm)."""
        return "rms" if self.family in ("llama", "qwen2") else "layer"

    @property
    def activation(self) -> str:
        """The MLP: 'gelu' (erf GELU), 'gelu_tanh' (GPT-2's tanh approximation) or 'swiglu' (llama's gated SiLU)."""
        return {"retro": "gelu", "gpt2": "gelu_tanh"}.get(self.family, "swiglu")

    @property
    def qkv_bias(self) -> bool:
        """Biases on the attention's query/key/value projections (all but llama)."""
        return self.family != "llama"

    @property
    def linear_bias(self) -> bool:
        """Biases on every other projection: attention outputs, MLPs (retro and gpt2; none in llama/qwen2)."""
        return self.family in ("retro", "gpt2")

    @property
    def neighbor_length(self) -> int:
        """r: a retrieved neighbour is its chunk plus the chunk that follows it."""
        return 2 * self.chunk_length

    @property
    def encoder_hidden_size(self) -> int:
        """d_e: the neighbour encoder's width (hidden_size unless retro.retro_encoder_hidden_size is set)."""
        width = self.retro.retro_encoder_hidden_size
        return self.hidden_size if width is None else width

    @property
    def encoder_num_attention_heads(self) -> int:
        """The encoder's heads, of the decoder's head size."""
        return self.encoder_hidden_size // self.head_dim

    @property
    def encoder_ffn_hidden_size(self) -> int:
        """The encoder's MLP width, at the decoder's ffn_hidden_size/hidden_size ratio."""
        return self.ffn_hidden_size * self.encoder_hidden_size // self.hidden_size

    @property
    def decoder_retro_layers(self) -> tuple[int, ...]:
        """Sorted 1-based decoder layers with CCA; empty when retrieval is disabled."""
        if not self.retro.enabled:
            return ()
        layers = self.retro.retro_layers
        if layers is None:
            layers = default_retro_layers(self.num_layers)
        return tuple(sorted(layers))

    # ---- constructors ----------------------------------------------------------------------------

    @classmethod
    def tiny(cls, **overrides: Any) -> "RetroConfig":
        """A seconds-to-train debug model for CI: 4 layers, d=64, CCA in layers 2 and 4, no dropout."""
        base = cls(
            vocab_size=256,
            num_layers=4,
            hidden_size=64,
            ffn_hidden_size=256,
            num_attention_heads=4,
            seq_length=64,
            chunk_length=16,
            init_method_std=0.02,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            ffn_dropout=0.0,
            retro=RetroSettings(
                retro_layers=(2, 4),
                retro_encoder_hidden_dropout=0.0,
                retro_encoder_attention_dropout=0.0,
            ),
        )
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (tuples become lists); from_dict() inverts it."""

        def plain(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            return value

        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RetroConfig":
        """Build and validate a config from to_dict() output (e.g. read from a checkpoint)."""
        data = dict(data)
        _reject_unknown_keys(cls, data, where="model config")
        retro = data.pop("retro", None)
        if isinstance(retro, dict):
            retro = dict(retro)
            _reject_unknown_keys(RetroSettings, retro, where="model config 'retro' section")
            for key in ("retro_layers", "retro_encoder_cross_attention_layers"):
                if isinstance(retro.get(key), list):
                    retro[key] = tuple(retro[key])
            retro = RetroSettings(**retro)
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = dict(data["rope_scaling"])
        config = cls(**data) if retro is None else cls(**data, retro=retro)
        config.validate()
        return config

    # ---- validation ------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise RetroRayError naming the first inconsistent setting and how to fix it."""
        for name in ("vocab_size", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "seq_length", "chunk_length"):
            _check_positive_int(name, getattr(self, name))
        self._validate_family()
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            a = self.num_attention_heads
            suggestion = a * max(1, round(self.hidden_size / a))
            raise RetroRayError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={a}; "
                f"set hidden_size to a multiple of num_attention_heads (e.g. {suggestion}) or change the head count."
            )
        if self.uses_rope and self.head_dim % 2:
            raise RetroRayError(
                f"the attention head size hidden_size/num_attention_heads={self.head_dim} is odd, but rotary "
                "position embeddings need an even head size; change hidden_size or num_attention_heads."
            )
        if self.seq_length % self.chunk_length:
            m = self.chunk_length
            raise RetroRayError(
                f"seq_length={self.seq_length} is not a multiple of chunk_length={m}; set seq_length to a "
                f"multiple of chunk_length (e.g. {m * max(1, self.seq_length // m)})."
            )
        if not isinstance(self.init_method_std, (int, float)) or not self.init_method_std > 0:
            raise RetroRayError(
                f"init_method_std={self.init_method_std!r} must be a positive number; use e.g. 0.023."
            )
        for name in ("hidden_dropout", "attention_dropout", "ffn_dropout"):
            _check_probability(name, getattr(self, name))
        self._validate_retro()

    def _validate_family(self) -> None:
        if self.family not in FAMILIES:
            raise RetroRayError(f"family={self.family!r} is not a known decoder family; choose one of {list(FAMILIES)}.")
        h = self.num_attention_heads
        if self.kv_channels is not None:
            _check_positive_int("kv_channels", self.kv_channels)
        if self.num_key_value_heads is not None:
            _check_positive_int("num_key_value_heads", self.num_key_value_heads)
            if isinstance(h, int) and h % self.num_key_value_heads:
                raise RetroRayError(
                    f"num_key_value_heads={self.num_key_value_heads} does not divide num_attention_heads={h}; "
                    f"each key/value head serves a whole group of query heads, so use a divisor of {h}."
                )
        if not isinstance(self.layernorm_epsilon, (int, float)) or not self.layernorm_epsilon > 0:
            raise RetroRayError(f"layernorm_epsilon={self.layernorm_epsilon!r} must be a positive number; use e.g. 1e-5.")
        if not isinstance(self.tie_word_embeddings, bool):
            raise RetroRayError(f"tie_word_embeddings={self.tie_word_embeddings!r} must be true or false.")
        if self.family == "gpt2":
            _check_positive_int("max_position_embeddings", self.max_position_embeddings)
            if self.seq_length > self.max_position_embeddings:
                raise RetroRayError(
                    f"seq_length={self.seq_length} exceeds max_position_embeddings={self.max_position_embeddings}, "
                    f"the gpt2 family's learned position table; set seq_length <= {self.max_position_embeddings} "
                    f"or raise max_position_embeddings."
                )
            if self.retro.enabled and self.neighbor_length > self.max_position_embeddings:
                raise RetroRayError(
                    f"neighbours of 2*chunk_length={self.neighbor_length} tokens exceed max_position_embeddings="
                    f"{self.max_position_embeddings}, the gpt2 family's learned position table that the encoder "
                    f"reads too; lower chunk_length or raise max_position_embeddings."
                )
        if not isinstance(self.rope_theta, (int, float)) or not self.rope_theta > 0:
            raise RetroRayError(f"rope_theta={self.rope_theta!r} must be a positive number; use e.g. 10000.")
        if self.rope_scaling is not None:
            self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if self.family not in ("llama", "qwen2"):
            raise RetroRayError(f"rope_scaling is a llama/qwen2 setting, but family={self.family!r}; "
                                "leave rope_scaling unset or set family to llama or qwen2.")
        kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else None
        if kind not in ROPE_SCALING_KEYS:
            raise RetroRayError(f"rope_scaling={rs!r} needs rope_type {' or '.join(ROPE_SCALING_KEYS)}; "
                                "e.g. {rope_type: llama3, factor: 8, low_freq_factor: 1, high_freq_factor: 4, "
                                "original_max_position_embeddings: 8192}.")
        missing = [k for k in ROPE_SCALING_KEYS[kind] if not isinstance(rs.get(k), (int, float)) or not rs[k] > 0]
        if missing:
            raise RetroRayError(f"rope_scaling of rope_type {kind} needs positive {missing}; got {rs!r}.")
        if kind == "llama3" and not rs["high_freq_factor"] > rs["low_freq_factor"]:
            raise RetroRayError(f"rope_scaling high_freq_factor={rs['high_freq_factor']} must exceed "
                                f"low_freq_factor={rs['low_freq_factor']} (llama 3: 4 and 1).")

    def _validate_retro(self) -> None:
        s = self.retro
        if not isinstance(s, RetroSettings):
            raise RetroRayError(
                f"retro must be a RetroSettings, got {type(s).__name__}; build it with RetroSettings(...)."
            )
        if not isinstance(s.enabled, bool):
            raise RetroRayError(f"retro.enabled={s.enabled!r} must be true or false.")
        if not s.enabled:
            if s.freeze_decoder:
                raise RetroRayError(
                    "retro.freeze_decoder=true with retro.enabled=false would leave nothing to train; set "
                    "retro.enabled=true to RETRO-fit, or retro.freeze_decoder=false to train a GPT."
                )
            return  # the other retro settings are unused by a plain GPT
        if self.kv_channels is not None and s.retro_encoder_hidden_size is None and self.hidden_size % self.head_dim:
            raise RetroRayError(
                f"the encoder (width hidden_size={self.hidden_size}) keeps the decoder's head size kv_channels="
                f"{self.head_dim}, which does not divide it; set retro.retro_encoder_hidden_size to a multiple of "
                f"{self.head_dim}."
            )
        for name in ("retro_encoder_num_layers", "retro_num_neighbors"):
            _check_positive_int(f"retro.{name}", getattr(s, name))
        if s.retro_encoder_hidden_size is not None:
            width, dh = s.retro_encoder_hidden_size, self.head_dim
            _check_positive_int("retro.retro_encoder_hidden_size", width)
            if width % dh:
                raise RetroRayError(
                    f"retro.retro_encoder_hidden_size={width} is not a multiple of the head size "
                    f"hidden_size/num_attention_heads={dh}; the encoder's heads keep the decoder's head size, so "
                    f"use a multiple of {dh} (e.g. {dh * max(1, round(width / dh))}), or leave it unset for "
                    f"hidden_size."
                )
            if self.ffn_hidden_size * width % self.hidden_size:
                raise RetroRayError(
                    f"retro.retro_encoder_hidden_size={width} gives the encoder's MLP a fractional width "
                    f"(ffn_hidden_size*{width}/hidden_size = {self.ffn_hidden_size * width / self.hidden_size}); "
                    f"use a multiple of "
                    f"{math.lcm(dh, self.hidden_size // math.gcd(self.hidden_size, self.ffn_hidden_size))}."
                )
        for name in ("retro_encoder_hidden_dropout", "retro_encoder_attention_dropout"):
            _check_probability(f"retro.{name}", getattr(s, name))
        if s.retro_layers is not None:
            _check_layer_numbers("retro.retro_layers", s.retro_layers, self.num_layers, "num_layers")
        if not self.decoder_retro_layers:
            raise RetroRayError(
                f"retro.enabled is true but no decoder layer has chunked cross-attention: the default layers "
                f"start at layer 6 and num_layers={self.num_layers}; set retro.retro_layers explicitly "
                f"(e.g. ({self.num_layers},)), add layers, or set retro.enabled=false."
            )
        _check_layer_numbers(
            "retro.retro_encoder_cross_attention_layers",
            s.retro_encoder_cross_attention_layers,
            s.retro_encoder_num_layers,
            "retro.retro_encoder_num_layers",
        )


def _reject_unknown_keys(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RetroRayError(
            f"unknown key(s) {unknown} in the {where}; remove them or fix the spelling "
            f"(known keys: {sorted(known)})."
        )


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RetroRayError(f"{name}={value!r} must be a positive integer; set it to 1 or more.")


def _check_probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise RetroRayError(f"{name}={value!r} must be a probability in [0, 1); use e.g. 0.1, or 0 to disable.")


def _check_layer_numbers(name: str, layers: Any, count: int, count_name: str) -> None:
    if not isinstance(layers, (tuple, list)):
        raise RetroRayError(f"{name}={layers!r} must be a list of layer numbers, e.g. (1,).")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= count:
            raise RetroRayError(
                f"{name} contains {layer!r}, outside 1..{count_name}={count}; use 1-based layer numbers "
                f"between 1 and {count}."
            )
    if len(set(layers)) != len(layers):
        raise RetroRayError(f"{name}={tuple(layers)} lists a layer twice; list each layer once.")


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def rope_inv_freq(config: RetroConfig, device: torch.device, work: torch.dtype) -> torch.Tensor:
    """RoPE's angle per position of each feature pair, [dh/2], in the work dtype.

    The retro family keeps its original expression, theta^(-2i/dh) (its outputs stay bit-identical);
    the HF families use HF's, 1 / theta^(2i/dh) (a few ulps apart), then rope_scaling: linear divides
    every frequency by factor; llama3 divides the low frequencies (wavelength above
    original_max_position_embeddings/low_freq_factor) by factor, keeps the high ones (wavelength below
    .../high_freq_factor) and interpolates linearly in 1/wavelength between the two.
    """
    dh, theta = config.head_dim, float(config.rope_theta)
    exponents = torch.arange(0, dh, 2, device=device, dtype=work) / dh
    if config.family == "retro":
        return theta ** (-exponents)
    inv_freq = 1.0 / theta ** exponents
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    kind, factor = rs.get("rope_type", rs.get("type")), float(rs["factor"])
    if kind == "linear":
        return inv_freq / factor
    low, high, context = float(rs["low_freq_factor"]), float(rs["high_freq_factor"]), rs["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)  # 0 at the low-frequency edge, 1 at the high one
    between = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_cos_sin(
    config: RetroConfig, positions: torch.Tensor, dtype: torch.dtype, inv_freq: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """cos, sin [T, dh/2] for integer positions [T]; (None, None) for the gpt2 family (no rotation).

    Computed on the fly in float32 (float64 for float64 models): no buffer to be cast to bf16 by a
    training engine, and no length limit. inv_freq: rope_inv_freq() computed once (a RetroCache keeps
    it: a decode step is small enough for its four tensor ops to show).
    """
    if not config.uses_rope:
        return None, None
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if inv_freq is None:
        inv_freq = rope_inv_freq(config, positions.device, work)
    angles = positions.to(work)[:, None] * inv_freq[None, :]  # [T, dh/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (llama's norm: no mean subtraction, no bias), computed in float32."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config: RetroConfig, width: int) -> nn.Module:
    """The family's norm of the given width (every norm of the model, decoder, CCA and encoder)."""
    if config.norm == "rms":
        return RMSNorm(width, config.layernorm_epsilon)
    return nn.LayerNorm(width, eps=config.layernorm_epsilon)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (i, i + dh/2) of x [..., T, dh] by position-dependent angles."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep q/k in their dtype under autocast
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class _RotatedQKV(torch.autograd.Function):
    """q and k rotated (apply_rotary's arithmetic, bit for bit) and v, [N, h, T, dh] each, of a fused
    projection's output y [N, T, 3, h, dh], for positions 0..T-1 of every row (cos, sin [T, dh/2]).

    Why a Function: autograd's own backward of view-permute-unbind, chunk, four products and cat
    stacked the three gradients, copied the permuted stack to y's layout and cut and re-joined the
    halves: 7 % of a CPU training step at the cpu50k shape went to these copies and small products.
    Here forward writes rotated q and k straight into one tensor, and backward rotates dq and dk back
    (by -angle) and writes them and dv straight into y's gradient, in y's layout. The rotation is
    x * [cos, cos] + swap(x) * [-sin, sin] (swap exchanges the halves), with both factors laid out
    over every head of a token: each product then runs along a token's h*dh features in one
    stretch, where the half-width form ran in stretches of dh/2 (1.7 ns an element at dh = 64).
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        N, T, _, h, dh = y.shape
        c, s = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # [T, dh]
        x = y[:, :, :2]  # q and k: [N, T, 2, h, dh]
        qk = torch.mul(x, c[:, None, None, :].expand(T, 2, h, dh).contiguous())  # x1 cos, x2 cos
        x1, x2 = x.chunk(2, dim=-1)
        qk += torch.cat((x2, x1), dim=-1).mul_(s[:, None, None, :].expand(T, 2, h, dh).contiguous())
        ctx.save_for_backward(c, s)
        return qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), y[:, :, 2].transpose(1, 2)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        c, s = ctx.saved_tensors
        grads = (dq, dk, dv)
        ref = next(g for g in grads if g is not None)
        N, h, T, dh = ref.shape
        c = c[:, None, :].expand(T, h, dh).contiguous()  # [T, h, dh]
        s = (-s)[:, None, :].expand(T, h, dh).contiguous()  # the rotation's transpose: by -angle
        dy = torch.empty(N, T, 3, h, dh, dtype=ref.dtype, device=ref.device)
        for i, g in enumerate(grads):
            if g is None:
                dy[:, :, i] = 0
                continue
            g = g.transpose(1, 2)  # [N, T, h, dh]
            if i == 2:
                dy[:, :, i] = g
                continue
            g1, g2 = g.chunk(2, dim=-1)
            torch.mul(g, c, out=dy[:, :, i]).add_(torch.cat((g2, g1), dim=-1).mul_(s))
        return dy, None, None


class Dropout(nn.Dropout):
    """nn.Dropout (F.dropout); no parameters or buffers, so state dicts are unchanged."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # In eval mode this is the identity: return at once rather than through nn.Module's call
        # machinery, which an incremental decode step pays ~20 times (~1% of a small model's step).
        if not self.training:
            return x
        return super().__call__(x)


def sdpa(
    q: torch.Tensor,  # [N, h, T, dh]
    k: torch.Tensor,  # [N, h, S, dh]
    v: torch.Tensor,  # [N, h, S, dh]
    mask: torch.Tensor | None = None,  # bool, broadcast to [N, h, T, S]; True = may attend
    is_causal: bool = False,  # query i sees keys 0..i (T == S)
    dropout_p: float = 0.0,  # attention dropout, already 0 outside training
) -> torch.Tensor:  # [N, h, T, dh]
    """F.scaled_dot_product_attention: the attention_fn of every attention module unless a trainer
    swaps in another implementation with these semantics (retro_ray/train/cpu_tuning.py)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE; causal in the decoder, bidirectional in the encoder.

    With a cache slot (incremental decoding, see RetroCache) the new keys/values are written into
    the cache at their positions and the queries attend to every cached key up to their own position.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, causal: bool, head_dim: int | None = None,
                 kv_heads: int | None = None, qkv_bias: bool = True, out_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.kv_heads = num_heads if kv_heads is None else kv_heads  # grouped-query attention when fewer
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        self.dropout = dropout
        self.causal = causal
        self.attention_fn = sdpa  # (q, k, v, mask, is_causal, dropout_p) -> [N, h, T, dh]; see sdpa
        # q, k, v fused in one projection: rows [h*dh | hk*dh | hk*dh] (HF's q_proj, k_proj, v_proj stacked).
        self.qkv = nn.Linear(hidden_size, (num_heads + 2 * self.kv_heads) * self.head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=out_bias)

    def forward(
        self,
        x: torch.Tensor,  # [N, T, d]
        cos: torch.Tensor,  # [T, dh/2] (or [N, 1, T, dh/2] with a cache), for the positions of x
        sin: torch.Tensor,
        cache: "_LayerSlot | None" = None,
    ) -> torch.Tensor:  # [N, T, d]
        N, T, _ = x.shape
        q, k, v = self.rotated_qkv(x, cos, sin)  # q [N, h, T, dh], k and v [N, hk, T, dh]
        if cache is None:
            mask, is_causal = None, self.causal and T > 1
        else:
            k, v, mask, is_causal = cache.self_attention_kv(k, v)  # [N, hk, S, dh]: every key up to the last query
        p = self.dropout if self.training else 0.0
        if self.kv_heads != self.num_heads:  # query head j reads key/value head j // g
            g = self.num_heads // self.kv_heads
            if T == 1 and mask is None and not is_causal:
                # One query per head that sees every key (decoding): a key/value head's g query heads read
                # the same keys, so they go on the query axis, [N, hk, g, dh], and no cached key is copied.
                y = self.attention_fn(q.view(N, self.kv_heads, g, self.head_dim), k, v, None, False, p)
                return self.out_proj(y.reshape(N, T, self.num_heads * self.head_dim))
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        y = self.attention_fn(q, k, v, mask, is_causal, p)  # [N, h, T, dh]
        return self.out_proj(y.transpose(1, 2).reshape(N, T, self.num_heads * self.head_dim))

    def rotated_qkv(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """q [N, h, T, dh], k, v [N, hk, T, dh] of x [N, T, d], q and k rotated unless cos is None
        (cos/sin broadcast against [N, h, T, dh/2])."""
        N, T, _ = x.shape
        h, hk, dh = self.num_heads, self.kv_heads, self.head_dim
        if hk == h and cos is not None and cos.dim() == 2:  # every row at positions 0..T-1 (no cache)
            return _RotatedQKV.apply(self.qkv(x).view(N, T, 3, h, dh), cos.to(x.dtype), sin.to(x.dtype))
        if hk == h:
            q, k, v = self.qkv(x).view(N, T, 3, h, dh).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).split((h * dh, hk * dh, hk * dh), dim=-1)
            q, k, v = (t.view(N, T, -1, dh).transpose(1, 2) for t in (q, k, v))
        if cos is None:
            return q, k, v
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


class CrossAttention(nn.Module):
    """Multi-head attention from x [.., d] to a context [.., dc], no position encoding.

    The attention runs at the queries' width d (h heads); the context may be narrower or wider (the
    encoder's width differs from the decoder's when retro_encoder_hidden_size is set).
    key_mask [N, Tk] (True = visible) hides keys; a query row with no visible key gets a zero
    output instead of the NaN that a softmax over nothing would give.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, context_size: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = True, out_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.attention_fn = sdpa  # (q, k, v, mask, is_causal, dropout_p) -> [N, h, T, dh]; see sdpa
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        inner = num_heads * self.head_dim
        self.q = nn.Linear(hidden_size, inner, bias=qkv_bias)
        self.kv = nn.Linear(hidden_size if context_size is None else context_size, 2 * inner, bias=qkv_bias)
        self.out_proj = nn.Linear(inner, hidden_size, bias=out_bias)

    def forward(
        self,
        x: torch.Tensor,  # [N, Tq, d]
        context: torch.Tensor,  # [N, Tk, dc]
        key_mask: torch.Tensor | None = None,  # [N, Tk] bool
    ) -> torch.Tensor:  # [N, Tq, d]
        return self.attend(x, *self.context_kv(context), key_mask)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [N, h, Tk, dh] of the context [N, Tk, dc]; a generator computes them once per neighbour set."""
        N, Tk, _ = context.shape
        k, v = self.kv(context).view(N, Tk, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(
        self,
        x: torch.Tensor,  # [N, Tq, d]
        k: torch.Tensor,  # [N, h, Tk, dh]
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,  # [N, Tk] bool
    ) -> torch.Tensor:  # [N, Tq, d]
        N, Tq, d = x.shape
        q = self.q(x).view(N, Tq, self.num_heads, self.head_dim).transpose(1, 2)  # [N, h, Tq, dh]
        mask, has_keys = None, None
        if key_mask is not None:
            has_keys = key_mask.any(dim=-1)  # [N]
            # Let empty rows see every key (finite softmax), then zero their output below.
            mask = (key_mask | ~has_keys[:, None])[:, None, None, :]  # [N, 1, 1, Tk]
        y = self.attention_fn(q, k, v, mask, False, self.dropout if self.training else 0.0)
        y = self.out_proj(y.transpose(1, 2).reshape(N, Tq, self.num_heads * self.head_dim))
        if has_keys is not None:
            y = y * has_keys[:, None, None].to(y.dtype)
        return y


class MLP(nn.Module):
    """fc_out(act(fc_in(x))); SwiGLU: fc_out(silu(fc_gate(x)) * fc_in(x)) (HF llama's gate/up/down_proj)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, dropout: float, activation: str = "gelu",
                 bias: bool = True):
        super().__init__()
        self.activation = activation
        self.fc_gate = nn.Linear(hidden_size, ffn_hidden_size, bias=bias) if activation == "swiglu" else None
        self.fc_in = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.drop = Dropout(dropout)
        self.fc_out = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc_gate is not None:
            return self.fc_out(self.drop(F.silu(self.fc_gate(x)) * self.fc_in(x)))
        h = self.fc_in(x)
        h = F.gelu(h, approximate="tanh") if self.activation == "gelu_tanh" else F.gelu(h)
        return self.fc_out(self.drop(h))


class _Retrieval:
    """The neighbours of one forward pass; encoded once, by the first CCA layer, then reused."""

    def __init__(self, encoder: "RetroEncoder", embedded: torch.Tensor, mask: torch.Tensor):
        self.encoder = encoder
        self.embedded = embedded  # [B, C, K, r, d] neighbour token embeddings
        self.mask = mask  # [B, C, K] True = the neighbour exists
        self.encoded: torch.Tensor | None = None  # [B, C, K, r, de]

    def encode(self, chunk_states: torch.Tensor) -> torch.Tensor:  # chunk_states [B, C, m, d]
        if self.encoded is None:
            self.encoded = self.encoder(self.embedded, chunk_states)
        return self.encoded


class ChunkedCrossAttention(nn.Module):
    """CCA: every token attends to the encoded neighbours of the last chunk it has fully seen.

    With chunk j = positions [j*m, (j+1)*m), its neighbours were retrieved with chunk j's tokens, so
    they may only inform predictions made once chunk j is complete: positions (j+1)*m-1 .. (j+2)*m-2
    (chunk j's last token and the next chunk's first m-1 tokens). We realise this by dropping the
    first m-1 positions, padding the end to C*m and regrouping into chunks of m; after attention the
    output is shifted back. Positions 0..m-2 precede every complete chunk and get a zero update.
    """

    def __init__(self, config: RetroConfig):
        super().__init__()
        self.chunk_length = config.chunk_length
        self.attn = CrossAttention(
            config.hidden_size, config.num_attention_heads, config.attention_dropout, config.encoder_hidden_size,
            head_dim=config.head_dim, qkv_bias=config.qkv_bias, out_bias=config.linear_bias,
        )

    def forward(self, x: torch.Tensor, retrieval: "_Retrieval | _LayerSlot") -> torch.Tensor:  # x [B, n, d] (normed)
        if isinstance(retrieval, _LayerSlot):
            return self._forward_cached(x, retrieval)
        B, n, d = x.shape
        m = self.chunk_length
        C = retrieval.mask.shape[1]  # = n // m; a trailing partial chunk has no neighbours yet
        # The encoder reads the retrieving chunk itself (not shifted): it ends at or before every
        # token that will see its neighbours, so this stays causal.
        encoded = retrieval.encode(x[:, : C * m].reshape(B, C, m, d))  # [B, C, K, r, de]
        K, r, de = encoded.shape[2:]

        shifted = x[:, m - 1 :]  # [B, n-m+1, d]: position m-1 becomes index 0
        shifted = F.pad(shifted, (0, 0, 0, C * m - shifted.shape[1]))  # [B, C*m, d]
        queries = shifted.reshape(B * C, m, d)  # row j: positions (j+1)m-1 .. (j+2)m-2
        keys = encoded.reshape(B * C, K * r, de)
        key_mask = retrieval.mask.reshape(B * C, K, 1).expand(B * C, K, r).reshape(B * C, K * r)
        out = self.attn(queries, keys, key_mask).reshape(B, C * m, d)
        return F.pad(out, (0, 0, m - 1, 0))[:, :n]  # shift back: [B, n, d]

    def _forward_cached(self, x: torch.Tensor, slot: "_LayerSlot") -> torch.Tensor:  # x [B, T, d] (normed)
        """Incremental decoding: each token reads the neighbour set current at its position.

        The same visibility as forward() when sets are added at chunk ends ((j+1)m-1), but a set may
        start anywhere (the generator adds one at the prompt's last token). This layer projects a
        new set to keys/values once and keeps them in its cache slot for every later token.
        """
        step = slot.step
        step.encode_neighbors(x)  # the first CCA layer runs the encoder; a no-op in later layers
        later = []  # sets that start after the first new token: they need their own queries
        for s in step.new_sets:
            k, v = self.attn.context_kv(s.encoded)  # [1, h, K*r, dh]
            if s.start == 0:
                slot.install(s.row, k, v)
            else:
                later.append((s, k, v))
        if step.visible_at_start:  # every row reads the set current at its first new token
            out = self.attn.attend(x, slot.neighbor_k, slot.neighbor_v, step.mask_at_start)  # [B, T, d]
        else:
            out = torch.zeros_like(x)  # before any set no token reads neighbours (as forward()'s first m-1)
        for s, k, v in later:
            out[s.row, s.start : s.end] = self.attn.attend(x[s.row : s.row + 1, s.start : s.end], k, v,
                                                          s.key_mask[None])[0]
            slot.install(s.row, k, v)  # in order of position: the row's last set stays current
        return out


class DecoderLayer(nn.Module):
    """Pre-LN block: self-attention, [chunked cross-attention], MLP, each added to the residual."""

    def __init__(self, config: RetroConfig, with_cca: bool):
        super().__init__()
        d = config.hidden_size
        self.ln_attn = make_norm(config, d)
        self.attn = SelfAttention(d, config.num_attention_heads, config.attention_dropout, causal=True,
                                  head_dim=config.head_dim, kv_heads=config.kv_heads, qkv_bias=config.qkv_bias,
                                  out_bias=config.linear_bias)
        self.ln_cca = make_norm(config, d) if with_cca else None
        self.cca = ChunkedCrossAttention(config) if with_cca else None
        self.ln_mlp = make_norm(config, d)
        self.mlp = MLP(d, config.ffn_hidden_size, config.ffn_dropout, config.activation, config.linear_bias)
        self.drop = Dropout(config.hidden_dropout)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, d]
        cos: torch.Tensor,
        sin: torch.Tensor,
        retrieval: _Retrieval | None = None,
        cache: "_LayerSlot | None" = None,  # incremental decoding: this layer's part of a RetroCache
    ) -> torch.Tensor:  # [B, T, d]
        x = x + self.drop(self.attn(self.ln_attn(x), cos, sin, cache))
        if self.cca is not None and (retrieval is not None or cache is not None):
            # With a cache the neighbours come from it (sets added with RetroCache.add_neighbors).
            x = x + self.drop(self.cca(self.ln_cca(x), retrieval if cache is None else cache))
        x = x + self.drop(self.mlp(self.ln_mlp(x)))
        return x


class EncoderLayer(nn.Module):
    """Pre-LN bidirectional block over one neighbour, optionally conditioned on its retrieving chunk."""

    def __init__(self, config: RetroConfig, with_cross: bool):
        super().__init__()
        de, heads, s = config.encoder_hidden_size, config.encoder_num_attention_heads, config.retro
        dh, qkv_bias, bias = config.head_dim, config.qkv_bias, config.linear_bias
        self.ln_attn = make_norm(config, de)
        self.attn = SelfAttention(de, heads, s.retro_encoder_attention_dropout, causal=False, head_dim=dh,
                                  qkv_bias=qkv_bias, out_bias=bias)
        self.ln_cross = make_norm(config, de) if with_cross else None
        self.cross = (
            CrossAttention(de, heads, s.retro_encoder_attention_dropout, context_size=config.hidden_size,
                           head_dim=dh, qkv_bias=qkv_bias, out_bias=bias)
            if with_cross else None
        )
        self.ln_mlp = make_norm(config, de)
        self.mlp = MLP(de, config.encoder_ffn_hidden_size, config.ffn_dropout, config.activation, bias)
        self.drop = Dropout(s.retro_encoder_hidden_dropout)

    def forward(
        self,
        x: torch.Tensor,  # [B*C*K, r, de]
        cos: torch.Tensor,
        sin: torch.Tensor,
        context: torch.Tensor,  # [B*C, m, d]
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), cos, sin))
        if self.cross is not None:
            # All K neighbours of a chunk read the same m chunk states: fold K into the query axis
            # so the context is projected once per chunk, not once per neighbour.
            N, r, de = x.shape
            BC = context.shape[0]
            q = self.ln_cross(x).reshape(BC, (N // BC) * r, de)  # [B*C, K*r, de]
            x = x + self.drop(self.cross(q, context).reshape(N, r, de))
        x = x + self.drop(self.mlp(self.ln_mlp(x)))
        return x


class RetroEncoder(nn.Module):
    """Bidirectional transformer over each neighbour (chunk + continuation, r tokens), of width de.

    Neighbours are embedded with the decoder's table (width d); a narrower encoder projects them to
    de first (input_proj, present only when de != d, so default models keep their parameter names).
    """

    def __init__(self, config: RetroConfig):
        super().__init__()
        s = config.retro
        cross = set(s.retro_encoder_cross_attention_layers)
        de = config.encoder_hidden_size
        self.config = config
        self.input_proj = nn.Linear(config.hidden_size, de, bias=config.linear_bias) if de != config.hidden_size else None
        self.drop = Dropout(s.retro_encoder_hidden_dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(config, with_cross=i in cross) for i in range(1, s.retro_encoder_num_layers + 1)
        )
        self.ln_f = make_norm(config, de)

    def forward(
        self,
        embedded: torch.Tensor,  # [B, C, K, r, d] neighbour token embeddings
        chunk_states: torch.Tensor,  # [B, C, m, d] decoder states of the retrieving chunks
    ) -> torch.Tensor:  # [B, C, K, r, de]
        B, C, K, r, d = embedded.shape
        x = embedded if self.input_proj is None else self.input_proj(embedded)  # [B, C, K, r, de]
        de = x.shape[-1]
        x = self.drop(x).reshape(B * C * K, r, de)
        context = chunk_states.reshape(B * C, chunk_states.shape[2], d)
        cos, sin = rope_cos_sin(self.config, torch.arange(r, device=x.device), x.dtype)  # None for gpt2
        for layer in self.layers:
            x = layer(x, cos, sin, context)
        return self.ln_f(x).reshape(B, C, K, r, de)


# --------------------------------------------------------------------------------------------------
# Incremental decoding: the cache
# --------------------------------------------------------------------------------------------------


@dataclass
class _PendingSet:
    """A neighbour set added with RetroCache.add_neighbors, waiting for the forward that feeds its position."""

    position: int
    tokens: torch.Tensor  # [K, r] int64, negative = no neighbour
    mask: torch.Tensor  # [K] bool, True = the neighbour exists


class _RowState:
    """Python-side bookkeeping of one cached sequence, shared by RetroCache.row() views."""

    __slots__ = ("pending", "has_neighbors")

    def __init__(self) -> None:
        self.pending: list[_PendingSet] = []  # sorted by position
        self.has_neighbors = False  # a set is installed (its keys are in the cache)


class RetroCache:
    """Incremental-decoding state of B sequences, owned by the model (see RetroModel.new_cache).

    Per decoder layer, self-attention keys/values k[i], v[i] [B, hk, S, dh] of every fed position
    (S = max_length). Per CCA layer i, the projected keys/values of each row's current neighbour
    set, neighbor_k[i], neighbor_v[i] [B, h, Kmax*r, dh], with neighbor_mask [B, Kmax*r] (True =
    a key of an existing neighbour; a set of K < Kmax neighbours leaves the rest hidden). states
    [B, S, d] keeps the first CCA layer's normed states: the encoder is conditioned on those of the
    chunk that retrieved a set.

    The cache does not count positions: each forward says where its tokens go (positions), so rows
    of a batch can sit at different lengths and a finished row can stop advancing.
    """

    def __init__(self, config: RetroConfig, batch_size: int, max_length: int, max_neighbors: int | None = None,
                 *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        B, S = batch_size, max_length
        h, dh, d = config.num_attention_heads, config.head_dim, config.hidden_size
        cca = [i - 1 for i in config.decoder_retro_layers]  # 0-based decoder layers with CCA
        K = config.retro.retro_num_neighbors if max_neighbors is None else max_neighbors
        self.config, self.batch_size, self.max_length = config, B, S
        self.max_neighbors = K if cca else 0
        hk = config.kv_heads  # grouped-query attention caches only the key/value heads
        self.k = [torch.zeros(B, hk, S, dh, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        Kr = self.max_neighbors * config.neighbor_length
        self.states = torch.zeros(B, S, d, dtype=dtype, device=device) if cca else None
        self.neighbor_k = {i: torch.zeros(B, h, Kr, dh, dtype=dtype, device=device) for i in cca}
        self.neighbor_v = {i: torch.zeros_like(t) for i, t in self.neighbor_k.items()}
        self.neighbor_mask = torch.zeros(B, Kr, dtype=torch.bool, device=device) if cca else None
        self.rows = [_RowState() for _ in range(B)]
        work = torch.float64 if dtype == torch.float64 else torch.float32  # as rope_cos_sin computes it
        self.inv_freq = rope_inv_freq(config, torch.device(device), work) if config.uses_rope else None  # [dh/2]

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def row(self, b: int) -> "RetroCache":
        """Row b as a one-row cache sharing this one's storage (e.g. to prefill one prompt of a batch)."""
        view = object.__new__(RetroCache)
        view.config, view.batch_size, view.max_length, view.max_neighbors = (
            self.config, 1, self.max_length, self.max_neighbors)
        view.k, view.v = [t[b : b + 1] for t in self.k], [t[b : b + 1] for t in self.v]
        view.states = None if self.states is None else self.states[b : b + 1]
        view.neighbor_k = {i: t[b : b + 1] for i, t in self.neighbor_k.items()}
        view.neighbor_v = {i: t[b : b + 1] for i, t in self.neighbor_v.items()}
        view.neighbor_mask = None if self.neighbor_mask is None else self.neighbor_mask[b : b + 1]
        view.rows = self.rows[b : b + 1]
        view.inv_freq = self.inv_freq
        return view

    def add_neighbors(self, row: int, position: int, neighbor_tokens: torch.Tensor,
                      neighbor_mask: torch.Tensor | None = None) -> None:
        """Make a neighbour set (tokens [K, r], mask [K]) visible to row's position and every later one.

        It stays current until the row's next set. The forward that feeds ``position`` encodes it,
        conditioned on the first CCA layer's states of the (up to m) tokens ending at ``position``:
        at a chunk's last token, (j+1)m-1, that is the training forward's chunk-j neighbours exactly.
        Add a set before the forward that feeds its position. A neighbour with a negative token id
        counts as missing, as in forward().
        """
        if self.neighbor_mask is None:
            raise ValueError("this model has no chunked cross-attention (retro disabled): it reads no neighbours")
        r = self.config.neighbor_length
        if neighbor_tokens.dim() != 2 or neighbor_tokens.shape[1] != r or not 0 < len(neighbor_tokens) <= self.max_neighbors:
            raise ValueError(f"neighbor_tokens must be [K, r={r}] with 1 <= K <= max_neighbors={self.max_neighbors}, "
                             f"got {tuple(neighbor_tokens.shape)}")
        if not 0 <= position < self.max_length:
            raise ValueError(f"position {position} is outside the cache's 0..{self.max_length - 1}")
        K = len(neighbor_tokens)
        mask = torch.ones(K, dtype=torch.bool) if neighbor_mask is None else neighbor_mask.bool()
        if mask.shape != (K,):
            raise ValueError(f"neighbor_mask must be [{K}], got {tuple(mask.shape)}")
        pending = self.rows[row].pending
        pending.append(_PendingSet(position, neighbor_tokens.to(self.device), mask.to(self.device)))
        pending.sort(key=lambda s: s.position)  # stable: of two sets at one position the later-added wins


class _NewSet(NamedTuple):
    """A set encoded in this forward: row `row` reads it at new tokens start .. end-1."""

    row: int
    start: int
    end: int
    encoded: torch.Tensor  # [1, K*r, de]
    key_mask: torch.Tensor  # [K*r] bool


class _Step:
    """One forward of T tokens per row against a RetroCache, new tokens of row b at positions[b] + 0..T-1.

    A fresh step (every row starts at 0, e.g. a prefill) attends with is_causal over its own keys,
    like the training forward; otherwise queries see the cached keys up to their own positions.
    """

    def __init__(self, model: "RetroModel", cache: RetroCache, positions: int | torch.Tensor, T: int):
        B, dev, c = cache.batch_size, cache.device, model.config
        if isinstance(positions, int):
            lo = hi = positions
            pos = torch.full((B,), positions, dtype=torch.long, device=dev)
        else:
            pos = positions.to(device=dev, dtype=torch.long).reshape(-1)
            if pos.shape[0] != B:
                raise ValueError(f"positions must be [B={B}], got {tuple(positions.shape)}")
            lo, hi = (int(t) for t in pos.aminmax())
        if lo < 0 or hi + T > cache.max_length:
            raise ValueError(f"positions {lo}..{hi + T - 1} are outside the cache's 0..{cache.max_length - 1}; "
                             "make the cache longer (max_length)")
        self.model, self.cache, self.T, self.pos = model, cache, T, pos
        self.fresh = hi == 0
        self.span = hi + T  # keys 0..span-1 hold every position a query of this step may see
        dtype = cache.k[0].dtype
        if self.fresh:
            self.index = None  # write with a slice [:T]
            self.positions = torch.arange(T, device=dev)  # [T]
            self.cos, self.sin = rope_cos_sin(c, self.positions, dtype, cache.inv_freq)  # [T, dh/2] (None: gpt2)
            self.visible = None
        else:
            at = pos[:, None] + torch.arange(T, device=dev) if T > 1 else pos[:, None]  # [B, T] new positions
            rows = torch.arange(B, device=dev)
            # Where the new tokens go: ([B, 1], [B, T]) index [b, p]; for one token, 1-d [B], [B] (a cheaper
            # index_put, a few % of a small model's decode step).
            self.index = (rows[:, None], at) if T > 1 else (rows, pos)
            self.positions = at  # [B, T]
            cos, sin = rope_cos_sin(c, at.reshape(-1), dtype, cache.inv_freq)  # [B*T, dh/2]
            if cos is not None:
                cos, sin = cos.view(B, 1, T, -1), sin.view(B, 1, T, -1)  # against [B, h, T, dh/2]
            self.cos, self.sin = cos, sin
            # [B, 1, T, span]; none when one token per row at one shared position sees every key 0..span-1
            self.visible = None if T == 1 and lo == hi else (
                torch.arange(self.span, device=dev)[None, None, :] <= at[:, :, None])[:, None]
        self.encoded = False
        self.new_sets: list[_NewSet] = []
        self.visible_at_start = False
        self.mask_at_start = cache.neighbor_mask

    def layer(self, i: int) -> "_LayerSlot":
        c = self.cache
        return _LayerSlot(self, c.k[i], c.v[i], c.neighbor_k.get(i), c.neighbor_v.get(i))

    def write(self, buffer: torch.Tensor, new: torch.Tensor) -> None:
        """Store new [B, T, ...] at the step's positions of buffer [B, S, ...]."""
        if self.index is None:
            buffer[:, : self.T] = new
        else:
            buffer[self.index] = new if self.T > 1 else new[:, 0]

    def write_heads(self, buffer: torch.Tensor, new: torch.Tensor) -> None:
        """Store new [B, h, T, dh] at the step's positions of buffer [B, h, S, dh]."""
        if self.index is None:
            buffer[:, :, : self.T] = new
        elif self.T > 1:
            buffer[self.index[0], :, self.index[1]] = new.transpose(1, 2)  # indexed as [B, T, h, dh]
        else:
            buffer[self.index[0], :, self.index[1]] = new[:, :, 0]  # [B, h, dh]

    def encode_neighbors(self, x: torch.Tensor) -> None:
        """At the first CCA layer (x [B, T, d] normed): keep the states, encode the sets of this step."""
        if self.encoded:
            return
        self.encoded = True
        cache, m, T = self.cache, self.model.config.chunk_length, self.T
        self.write(cache.states, x)
        starts = self.pos.tolist() if any(row.pending for row in cache.rows) else []
        for b, row in enumerate(cache.rows):
            ours = [s for s in row.pending if s.position < starts[b] + T] if row.pending else []
            row.pending = row.pending[len(ours):]
            for s, nxt in zip(ours, [*ours[1:], None]):
                if s.position < starts[b]:
                    raise ValueError(f"neighbours for position {s.position} of row {b} were added after that "
                                     "position was fed; add them before the forward that feeds it")
                context = cache.states[b, max(0, s.position - m + 1) : s.position + 1]  # [m', d]
                encoded, key_mask = self.model.encode_neighbors(s.tokens, s.mask, context)
                end = T if nxt is None else nxt.position - starts[b]
                self.new_sets.append(_NewSet(b, s.position - starts[b], end, encoded, key_mask))
        mask = cache.neighbor_mask
        for s in self.new_sets:
            if s.start == 0:
                _set_mask(mask, s.row, s.key_mask)
                cache.rows[s.row].has_neighbors = True
        self.visible_at_start = any(row.has_neighbors for row in cache.rows)
        if any(s.start > 0 for s in self.new_sets):
            self.mask_at_start = mask.clone()  # the sets current before this step's later ones
            for s in self.new_sets:
                if s.start > 0:
                    _set_mask(mask, s.row, s.key_mask)
                    cache.rows[s.row].has_neighbors = True


def _set_mask(mask: torch.Tensor, b: int, key_mask: torch.Tensor) -> None:  # mask [B, Kmax*r], key_mask [K*r]
    mask[b] = False
    mask[b, : key_mask.shape[0]] = key_mask


class _LayerSlot(NamedTuple):
    """Decoder layer i's part of a RetroCache during one _Step."""

    step: _Step
    k: torch.Tensor  # [B, hk, S, dh]
    v: torch.Tensor
    neighbor_k: torch.Tensor | None  # [B, h, Kmax*r, dh], CCA layers only
    neighbor_v: torch.Tensor | None

    def self_attention_kv(self, k: torch.Tensor, v: torch.Tensor):
        """Store the new k, v [B, hk, T, dh]; return (keys, values, mask, is_causal) for the queries."""
        step = self.step
        step.write_heads(self.k, k)
        step.write_heads(self.v, v)
        if step.fresh:
            return k, v, None, step.T > 1  # a fresh step sees only its own keys, causally
        return self.k[:, :, : step.span], self.v[:, :, : step.span], step.visible, False

    def install(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Make the projected set k, v [1, h, K*r, dh] row b's current one in this layer."""
        n = k.shape[2]
        self.neighbor_k[b, :, :n] = k[0]
        self.neighbor_v[b, :, :n] = v[0]


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class RetroOutput(NamedTuple):
    # [B, n, V]; None when labels were given: the fused loss never forms the logits whole (call
    # again without labels for them).
    logits: torch.Tensor | None
    loss: torch.Tensor | None  # scalar float32 mean cross-entropy, None without labels


class RetroModel(nn.Module):
    """RETRO decoder + neighbour encoder. With retro.enabled=False it is exactly a GPT (same names)."""

    def __init__(self, config: RetroConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.retro_layers = config.decoder_retro_layers  # 1-based
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        # gpt2 family: learned absolute positions, added to the token embedding (decoder and encoder).
        self.position_embedding = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size) if config.family == "gpt2" else None
        )
        self.drop = Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(config, with_cca=i in self.retro_layers) for i in range(1, config.num_layers + 1)
        )
        self.ln_f = make_norm(config, config.hidden_size)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.encoder = RetroEncoder(config) if config.retro.enabled else None
        # Training setting, not architecture (so not in the config): keep only each decoder layer's
        # input in training forwards and recompute the rest in backward (trainer.activation_checkpointing).
        self.activation_checkpointing = False
        # The fused output layer + loss of training forwards (model/loss.py): this project's, or another
        # kernel of the same contract that the trainer swaps in (trainer.loss_kernel, loss.loss_kernel).
        self.loss_fn = linear_cross_entropy  # (hidden [N, d], weight [V, d], labels [N]) -> float32 sum
        self._init_weights()

    @classmethod
    def from_config(cls, config: "RetroConfig | dict[str, Any]") -> "RetroModel":
        """Build from a RetroConfig or its to_dict() form (as stored in a checkpoint)."""
        return cls(config if isinstance(config, RetroConfig) else RetroConfig.from_dict(config))

    def _init_weights(self) -> None:
        std = self.config.init_method_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            # nn.LayerNorm keeps its (1, 0) init, RMSNorm its 1.
        # Projections that write into the residual stream are scaled by 1/sqrt(2 * layers), as in
        # GPT-2 and Megatron (scaled_init_method_normal), so the residual's variance does not grow
        # with depth. The encoder is its own stack and uses its own depth.
        enc_layers = self.config.retro.retro_encoder_num_layers
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "fc_out.weight")):
                depth = enc_layers if name.startswith("encoder.") else self.config.num_layers
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * depth))

    def forward(
        self,
        tokens: torch.Tensor,  # [B, n] int64
        neighbor_tokens: torch.Tensor | None = None,  # [B, n // m, K, r] int64
        neighbor_mask: torch.Tensor | None = None,  # [B, n // m, K] bool, True = neighbour exists
        labels: torch.Tensor | None = None,  # [B, n] int64 next-token targets, IGNORE_INDEX = no loss
        *,
        cache: RetroCache | None = None,  # incremental decoding (new_cache()); tokens continue its rows
        positions: int | torch.Tensor | None = None,  # with a cache: [B] (or one int) position of tokens[:, 0]
        logits_to_keep: int = 0,  # > 0: logits of the last logits_to_keep positions only (0 = all)
    ) -> RetroOutput:
        """Logits for every position; with labels, the mean loss over labelled positions instead.

        With labels the output is RetroOutput(logits=None, loss): the output layer and the
        cross-entropy run fused, in blocks of rows (model/loss.py), so the [B, n, V] logits are never
        made. Their gradients are computed in the same pass; the FLOPs are those of the unfused path.

        n may be any length; only complete chunks have neighbours (C = n // m), so a trailing
        partial chunk is fine. Neighbours are ignored when retro is disabled, and CCA is skipped when
        neighbor_tokens is None. A neighbour with any negative token id (the database's -1 for
        "no neighbour") counts as missing, like one with neighbor_mask False.

        With a cache, tokens[b] are fed at positions[b] .. positions[b]+n-1 of row b: their keys and
        values are stored, they attend to the row's earlier cached positions, and CCA reads the
        neighbour sets added with cache.add_neighbors (not neighbor_tokens). Prefilling T tokens
        and then feeding one (or a few) at a time gives the logits of one forward over the whole
        sequence, up to rounding (tests/unit/test_model.py).
        """
        if logits_to_keep and labels is not None:
            raise ValueError("labels need every position's logits; leave logits_to_keep at 0")
        x = self._final_states(tokens, neighbor_tokens, neighbor_mask, cache, positions, logits_to_keep)  # [B, n, d]
        weight = self._output_weight()  # [V, d]
        if labels is None:
            return RetroOutput(F.linear(x, weight), None)  # [B, n, V]
        count = (labels != IGNORE_INDEX).sum().clamp(min=1)
        if fused_loss_enabled():
            total = self.loss_fn(x.reshape(-1, x.shape[-1]), weight, labels.reshape(-1))
            return RetroOutput(None, total / count)
        # The unfused reference (loss.fused_loss(False), for A/B runs): the whole logits, then the loss.
        # Sum / count rather than a plain mean so a batch with no labelled position gives 0, not NaN.
        logits = F.linear(x, weight)  # [B, n, V]
        total = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        return RetroOutput(logits, total / count)

    def token_nll(
        self,
        tokens: torch.Tensor,  # [B, n] int64
        labels: torch.Tensor,  # [B, n] int64 next-token targets, IGNORE_INDEX = not scored
        neighbor_tokens: torch.Tensor | None = None,  # [B, n // m, K, r] int64
        neighbor_mask: torch.Tensor | None = None,  # [B, n // m, K] bool
    ) -> torch.Tensor:  # [B, n] float32
        """Each label's negative log-likelihood (nats), 0 where the label is IGNORE_INDEX; no gradient.

        The loss of forward(..., labels=) token by token, for evaluation: the output layer runs in
        blocks of rows as there (model/loss.py), so the [B, n, V] logits are never made.
        """
        x = self._final_states(tokens, neighbor_tokens, neighbor_mask)  # [B, n, d]
        nll = linear_cross_entropy(x.reshape(-1, x.shape[-1]), self._output_weight(), labels.reshape(-1),
                                   reduction="none")  # [B*n]
        return nll.reshape(labels.shape)

    def _output_weight(self) -> torch.Tensor:  # [V, d]
        return self.token_embedding.weight if self.lm_head is None else self.lm_head.weight  # tied or lm_head

    def _final_states(
        self,
        tokens: torch.Tensor,
        neighbor_tokens: torch.Tensor | None,
        neighbor_mask: torch.Tensor | None,
        cache: RetroCache | None = None,
        positions: int | torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:  # [B, n, d] (the last logits_to_keep positions if > 0), after the final norm
        """The decoder up to the output layer: what forward multiplies by the output embedding."""
        B, n = tokens.shape
        if cache is None:
            self._check_positions(n)
            x = self.drop(self._embed(tokens, lambda: torch.arange(n, device=tokens.device)))  # [B, n, d]
            cos, sin = rope_cos_sin(self.config, torch.arange(n, device=tokens.device), x.dtype)  # [n, dh/2]
            retrieval = self._retrieval(neighbor_tokens, neighbor_mask, B, n)
            for layer in self.layers:
                if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                    x = self._checkpointed(layer, x, cos, sin, retrieval)
                else:
                    x = layer(x, cos, sin, retrieval)
        else:
            if neighbor_tokens is not None or positions is None or cache.batch_size != B:
                raise ValueError(f"with a cache, give positions, a cache of B={B} rows (got {cache.batch_size}), "
                                 "and neighbours through cache.add_neighbors, not neighbor_tokens")
            step = _Step(self, cache, positions, n)
            self._check_positions(step.span)
            x = self.drop(self._embed(tokens, lambda: step.positions))  # [B, n, d]
            for i, layer in enumerate(self.layers):
                x = layer(x, step.cos, step.sin, cache=step.layer(i))
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.ln_f(x)

    @staticmethod
    def _checkpointed(layer: "DecoderLayer", x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      retrieval: _Retrieval | None) -> torch.Tensor:
        """One decoder layer under activation checkpointing: only its input is kept, and backward runs
        its forward again. torch's non-reentrant checkpoint replays the ops in order (and the RNG, so
        dropout draws the same masks), so the replay must not depend on state the first run changed:
        the layer that encodes the neighbours gets a fresh _Retrieval each time, and hands the encoded
        neighbours out as an output for the later CCA layers."""
        from torch.utils.checkpoint import checkpoint

        if retrieval is None or layer.cca is None or retrieval.encoded is not None:
            return checkpoint(layer, x, cos, sin, retrieval, use_reentrant=False)

        def encoding_layer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            fresh = _Retrieval(retrieval.encoder, retrieval.embedded, retrieval.mask)
            return layer(x, cos, sin, fresh), fresh.encoded

        x, retrieval.encoded = checkpoint(encoding_layer, x, use_reentrant=False)
        return x

    def _retrieval(
        self, neighbor_tokens: torch.Tensor | None, neighbor_mask: torch.Tensor | None, B: int, n: int
    ) -> _Retrieval | None:
        if self.encoder is None or neighbor_tokens is None:
            return None
        C = n // self.config.chunk_length
        if neighbor_tokens.dim() != 4 or tuple(neighbor_tokens.shape[:2]) != (B, C):
            raise ValueError(
                f"neighbor_tokens must be [B={B}, C={C}, K, r] for {n} tokens in chunks of "
                f"{self.config.chunk_length}, got {tuple(neighbor_tokens.shape)}"
            )
        if C == 0:
            return None  # no complete chunk yet, so no token may see a neighbour
        embedded, mask = self._embed_neighbors(neighbor_tokens, neighbor_mask)
        return _Retrieval(self.encoder, embedded, mask)  # embedded [B, C, K, r, d]

    def _embed_neighbors(
        self, neighbor_tokens: torch.Tensor, neighbor_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [..., K, r], mask [..., K] -> embedded [..., K, r, d], mask
        mask = (neighbor_tokens >= 0).all(dim=-1)  # [..., K]
        if neighbor_mask is not None:
            if neighbor_mask.shape != mask.shape:
                raise ValueError(f"neighbor_mask must be {tuple(mask.shape)}, got {tuple(neighbor_mask.shape)}")
            mask = mask & neighbor_mask.bool()
        safe = neighbor_tokens.masked_fill(~mask[..., None], 0)  # any valid id; these are never attended
        r = neighbor_tokens.shape[-1]
        return self._embed(safe, lambda: torch.arange(r, device=safe.device)), mask  # a neighbour starts at 0

    def _check_positions(self, length: int) -> None:
        if self.position_embedding is not None and length > self.config.max_position_embeddings:
            raise RetroRayError(
                f"{length} positions exceed max_position_embeddings={self.config.max_position_embeddings}, the gpt2 "
                f"family's learned position table; use at most {self.config.max_position_embeddings} tokens."
            )

    def _embed(self, tokens: torch.Tensor, positions) -> torch.Tensor:  # tokens [..., T] -> [..., T, d]
        """Token embedding, plus the learned position embedding in the gpt2 family (positions() [T] or [B, T])."""
        x = self.token_embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions())
        return x

    # ---- incremental decoding --------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_length: int, max_neighbors: int | None = None) -> RetroCache:
        """An empty cache for batch_size sequences of up to max_length tokens, in the model's dtype and device.

        max_neighbors: the most neighbours in one set (default retro.retro_num_neighbors).
        """
        p = self.token_embedding.weight
        return RetroCache(self.config, batch_size, max_length, max_neighbors, dtype=p.dtype, device=p.device)

    def encode_neighbors(
        self,
        neighbor_tokens: torch.Tensor,  # [K, r] int64, negative = no neighbour
        neighbor_mask: torch.Tensor,  # [K] bool
        context: torch.Tensor,  # [m', d] first-CCA-layer normed states of the retrieving tokens (m' <= m)
    ) -> tuple[torch.Tensor, torch.Tensor]:  # encoded [1, K*r, de], key_mask [K*r]
        """One neighbour set through the encoder, as CCA reads it (a forward with a cache calls this)."""
        K, r = neighbor_tokens.shape
        embedded, mask = self._embed_neighbors(neighbor_tokens, neighbor_mask)  # [K, r, d], [K]
        encoded = self.encoder(embedded[None, None], context[None, None])  # [1, 1, K, r, de]
        return encoded.reshape(1, K * r, -1), mask[:, None].expand(K, r).reshape(K * r)

    # ---- accounting ------------------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters, the tied embedding counted once (optionally left out)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.token_embedding.weight.numel()
            if self.position_embedding is not None:
                total -= self.position_embedding.weight.numel()
        return total

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward = 3x forward) per decoder token at seq_length.

        Matmuls only, 2 FLOPs per multiply-add; biases, norms, softmax ignored. For a plain GPT this
        is the usual 6*N + 12*L*n*d (PaLM appendix B, nanoGPT): 6 per weight, and QK^T plus AV over
        all n keys (causal masking not discounted), with N counting the tied embedding once for the
        output projection. Retrieval adds, per decoder token (de = the encoder's width):
          CCA layer: q/out projections, k/v projections (de -> d) of K*r/m neighbour tokens, attention
                     to K*r keys;
          encoder:   K*r/m neighbour tokens through the encoder (input projection d -> de when de != d,
                     self-attention over r tokens, the conditioning cross-attention over m chunk
                     tokens), plus the k/v projection (d -> de) of the chunk context, done once per
                     chunk (so once per decoder token).
        """
        c = self.config
        d, f, L, n, m, V = c.hidden_size, c.ffn_hidden_size, c.num_layers, c.seq_length, c.chunk_length, c.vocab_size

        mlp_mats = 3 if c.activation == "swiglu" else 2  # SwiGLU's gate is a third ffn-wide matrix
        inner, kv_inner = c.num_attention_heads * c.head_dim, c.kv_heads * c.head_dim  # = d, d without GQA

        def layer(width: int, ffn: int, keys: int, q_width: int, kv_width: int) -> int:
            """A transformer layer per token: q, out (q_width), k, v (kv_width) projections, MLP, QK^T and AV."""
            return 2 * 2 * width * q_width + 2 * 2 * width * kv_width + 2 * mlp_mats * width * ffn + 4 * keys * q_width

        fwd = L * layer(d, f, n, inner, kv_inner) + 2 * d * V
        if c.retro.enabled:
            K, r = c.retro.retro_num_neighbors, c.neighbor_length
            de, fe = c.encoder_hidden_size, c.encoder_ffn_hidden_size
            nbr_per_token = K * r / m
            cca = 2 * 2 * d * inner + nbr_per_token * 2 * 2 * de * inner + 4 * K * r * inner
            fwd += len(self.retro_layers) * cca
            E = c.retro.retro_encoder_num_layers
            X = len(c.retro.retro_encoder_cross_attention_layers)
            per_nbr_token = (
                (2 * d * de if de != d else 0)
                + E * layer(de, fe, r, de, de)
                + X * (2 * 2 * de * de + 4 * m * de)
            )
            fwd += nbr_per_token * per_nbr_token + X * 2 * 2 * d * de
        return 3.0 * fwd
