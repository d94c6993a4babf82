"""RETRO: a GPT decoder with chunked cross-attention to retrieved neighbours.

Borgeaud et al. 2022, "Improving language models by retrieving from trillions of tokens".
Single-device PyTorch; distribution (DeepSpeed, Ray) lives elsewhere and wraps this module.

Shapes, used throughout:
    B  batch size                  n  tokens in a sequence (seq_length when training)
    m  chunk_length                C  chunks with neighbours = n // m
    K  neighbours per chunk        r  tokens per neighbour (chunk + continuation = 2m)
    d  hidden_size                 h  attention heads, dh = d // h
    V  vocab_size                  de encoder width (= d unless retro_encoder_hidden_size is set)

Data flow of one forward pass:
    tokens [B, n] -> embedding -> decoder layers 1..L -> LayerNorm -> tied output -> logits [B, n, V]
    In a decoder layer listed in retro_layers, between self-attention and MLP, chunked
    cross-attention (CCA) lets each token read the encoded neighbours of the chunk *before* it.
    neighbor_tokens [B, C, K, r] -> shared embedding -> encoder -> [B, C, K, r, de]; the encoder runs
    once, at the first CCA layer, conditioned on that layer's hidden states of the retrieving chunk.

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
    * Dropout and attention go through retro_ray/model/dropout.py: on the CPU it draws dropout masks
      ~10x faster than torch's bernoulli_ (a third of a CPU training step before); elsewhere it is
      exactly F.dropout and F.scaled_dot_product_attention.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from retro_ray.errors import RetroRayError
from retro_ray.model.dropout import Dropout, attention

IGNORE_INDEX = -100
ROPE_BASE = 10000.0


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

    # ---- derived values --------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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
        config = cls(**data) if retro is None else cls(**data, retro=retro)
        config.validate()
        return config

    # ---- validation ------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise RetroRayError naming the first inconsistent setting and how to fix it."""
        for name in ("vocab_size", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "seq_length", "chunk_length"):
            _check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            a = self.num_attention_heads
            suggestion = a * max(1, round(self.hidden_size / a))
            raise RetroRayError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={a}; "
                f"set hidden_size to a multiple of num_attention_heads (e.g. {suggestion}) or change the head count."
            )
        if self.head_dim % 2:
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

    def _validate_retro(self) -> None:
        s = self.retro
        if not isinstance(s, RetroSettings):
            raise RetroRayError(
                f"retro must be a RetroSettings, got {type(s).__name__}; build it with RetroSettings(...)."
            )
        if not isinstance(s.enabled, bool):
            raise RetroRayError(f"retro.enabled={s.enabled!r} must be true or false.")
        if not s.enabled:
            return  # the other retro settings are unused by a plain GPT
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


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, dh/2] for integer positions [T].

    Computed on the fly in float32 (float64 for float64 models): no buffer to be cast to bf16 by a
    training engine, and no length limit.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim)
    angles = positions.to(work)[:, None] * inv_freq[None, :]  # [T, dh/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (i, i + dh/2) of x [..., T, dh] by position-dependent angles."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep q/k in their dtype under autocast
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE; causal in the decoder, bidirectional in the encoder.

    forward() takes an optional past (key, value) and returns the present one, so an incremental
    decoder can feed one new token at a time against a cache.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, causal: bool):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.causal = causal
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self,
        x: torch.Tensor,  # [N, T, d]
        cos: torch.Tensor,  # [T, dh/2], for the positions of x (past_len .. past_len+T-1)
        sin: torch.Tensor,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([N, h, S_past, dh],) * 2
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        N, T, d = x.shape
        q, k, v = self.rotated_qkv(x, cos, sin)  # [N, h, T, dh] each
        if past_kv is not None:
            k = torch.cat((past_kv[0], k), dim=2)  # [N, h, S, dh], S = S_past + T
            v = torch.cat((past_kv[1], v), dim=2)
        S = k.shape[2]

        mask, is_causal = None, False
        if self.causal and T > 1:
            if S == T:
                is_causal = True
            else:
                # SDPA's is_causal aligns the mask top-left; with a cache the queries are the last T keys.
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        y = attention(q, k, v, mask, is_causal, self.dropout if self.training else 0.0)  # [N, h, T, dh]
        return self.out_proj(y.transpose(1, 2).reshape(N, T, d)), (k, v)

    def rotated_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v [N, h, T, dh] of x [N, T, d], q and k rotated (cos/sin broadcast against [N, h, T, dh/2])."""
        N, T, d = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


class CrossAttention(nn.Module):
    """Multi-head attention from x [.., d] to a context [.., dc], no position encoding.

    The attention runs at the queries' width d (h heads); the context may be narrower or wider (the
    encoder's width differs from the decoder's when retro_encoder_hidden_size is set).
    key_mask [N, Tk] (True = visible) hides keys; a query row with no visible key gets a zero
    output instead of the NaN that a softmax over nothing would give.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, context_size: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.head_dim = hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size if context_size is None else context_size, 2 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

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
        y = attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)
        y = self.out_proj(y.transpose(1, 2).reshape(N, Tq, d))
        if has_keys is not None:
            y = y * has_keys[:, None, None].to(y.dtype)
        return y


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, dropout: float):
        super().__init__()
        self.fc_in = nn.Linear(hidden_size, ffn_hidden_size)
        self.drop = Dropout(dropout)
        self.fc_out = nn.Linear(ffn_hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.drop(F.gelu(self.fc_in(x))))


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
            config.hidden_size, config.num_attention_heads, config.attention_dropout, config.encoder_hidden_size
        )

    def forward(self, x: torch.Tensor, retrieval: _Retrieval) -> torch.Tensor:  # x [B, n, d] (normed)
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


class DecoderLayer(nn.Module):
    """Pre-LN block: self-attention, [chunked cross-attention], MLP, each added to the residual."""

    def __init__(self, config: RetroConfig, with_cca: bool):
        super().__init__()
        d = config.hidden_size
        self.ln_attn = nn.LayerNorm(d)
        self.attn = SelfAttention(d, config.num_attention_heads, config.attention_dropout, causal=True)
        self.ln_cca = nn.LayerNorm(d) if with_cca else None
        self.cca = ChunkedCrossAttention(config) if with_cca else None
        self.ln_mlp = nn.LayerNorm(d)
        self.mlp = MLP(d, config.ffn_hidden_size, config.ffn_dropout)
        self.drop = Dropout(config.hidden_dropout)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, d]
        cos: torch.Tensor,
        sin: torch.Tensor,
        retrieval: _Retrieval | None = None,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, present = self.attn(self.ln_attn(x), cos, sin, past_kv)
        x = x + self.drop(a)
        if self.cca is not None and retrieval is not None:
            x = x + self.drop(self.cca(self.ln_cca(x), retrieval))
        x = x + self.drop(self.mlp(self.ln_mlp(x)))
        return x, present


class EncoderLayer(nn.Module):
    """Pre-LN bidirectional block over one neighbour, optionally conditioned on its retrieving chunk."""

    def __init__(self, config: RetroConfig, with_cross: bool):
        super().__init__()
        de, heads, s = config.encoder_hidden_size, config.encoder_num_attention_heads, config.retro
        self.ln_attn = nn.LayerNorm(de)
        self.attn = SelfAttention(de, heads, s.retro_encoder_attention_dropout, causal=False)
        self.ln_cross = nn.LayerNorm(de) if with_cross else None
        self.cross = (
            CrossAttention(de, heads, s.retro_encoder_attention_dropout, context_size=config.hidden_size)
            if with_cross else None
        )
        self.ln_mlp = nn.LayerNorm(de)
        self.mlp = MLP(de, config.encoder_ffn_hidden_size, config.ffn_dropout)
        self.drop = Dropout(s.retro_encoder_hidden_dropout)

    def forward(
        self,
        x: torch.Tensor,  # [B*C*K, r, de]
        cos: torch.Tensor,
        sin: torch.Tensor,
        context: torch.Tensor,  # [B*C, m, d]
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), cos, sin)[0])
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
        self.head_dim = config.head_dim
        self.input_proj = nn.Linear(config.hidden_size, de) if de != config.hidden_size else None
        self.drop = Dropout(s.retro_encoder_hidden_dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(config, with_cross=i in cross) for i in range(1, s.retro_encoder_num_layers + 1)
        )
        self.ln_f = nn.LayerNorm(de)

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
        cos, sin = rotary_cos_sin(torch.arange(r, device=x.device), self.head_dim, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, context)
        return self.ln_f(x).reshape(B, C, K, r, de)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class RetroOutput(NamedTuple):
    logits: torch.Tensor  # [B, n, V]
    loss: torch.Tensor | None  # scalar float32 mean cross-entropy, None without labels


class RetroModel(nn.Module):
    """RETRO decoder + neighbour encoder. With retro.enabled=False it is exactly a GPT (same names)."""

    def __init__(self, config: RetroConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.retro_layers = config.decoder_retro_layers  # 1-based
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(config, with_cca=i in self.retro_layers) for i in range(1, config.num_layers + 1)
        )
        self.ln_f = nn.LayerNorm(config.hidden_size)
        self.encoder = RetroEncoder(config) if config.retro.enabled else None
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
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            # nn.LayerNorm keeps its (1, 0) init.
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
    ) -> RetroOutput:
        """Logits for every position, and the mean loss over labelled positions if labels are given.

        n may be any length; only complete chunks have neighbours (C = n // m), so a trailing
        partial chunk is fine. Neighbours are ignored when retro is disabled, and CCA is skipped when
        neighbor_tokens is None. A neighbour with any negative token id (the database's -1 for
        "no neighbour") counts as missing, like one with neighbor_mask False.
        """
        B, n = tokens.shape
        x = self.drop(self.token_embedding(tokens))  # [B, n, d]
        cos, sin = rotary_cos_sin(torch.arange(n, device=tokens.device), self.config.head_dim, x.dtype)
        retrieval = self._retrieval(neighbor_tokens, neighbor_mask, B, n)
        for layer in self.layers:
            x, _ = layer(x, cos, sin, retrieval)
        x = self.ln_f(x)
        logits = F.linear(x, self.token_embedding.weight)  # [B, n, V], tied output embedding

        loss = None
        if labels is not None:
            # Sum / count rather than a plain mean so a batch with no labelled position gives 0, not NaN.
            total = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            loss = total / (labels != IGNORE_INDEX).sum().clamp(min=1)
        return RetroOutput(logits, loss)

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
        mask = (neighbor_tokens >= 0).all(dim=-1)  # [B, C, K]
        if neighbor_mask is not None:
            if neighbor_mask.shape != mask.shape:
                raise ValueError(f"neighbor_mask must be {tuple(mask.shape)}, got {tuple(neighbor_mask.shape)}")
            mask = mask & neighbor_mask.bool()
        safe = neighbor_tokens.masked_fill(~mask[..., None], 0)  # any valid id; these are never attended
        return _Retrieval(self.encoder, self.token_embedding(safe), mask)  # embedded [B, C, K, r, d]

    # ---- accounting ------------------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters, the tied embedding counted once (optionally left out)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.token_embedding.weight.numel()
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

        def layer(width: int, ffn: int, keys: int) -> int:
            """A transformer layer per token: q, k, v, out projections, MLP, QK^T and AV over ``keys``."""
            return 2 * 4 * width * width + 2 * 2 * width * ffn + 4 * keys * width

        fwd = L * layer(d, f, n) + 2 * d * V
        if c.retro.enabled:
            K, r = c.retro.retro_num_neighbors, c.neighbor_length
            de, fe = c.encoder_hidden_size, c.encoder_ffn_hidden_size
            nbr_per_token = K * r / m
            cca = 2 * 2 * d * d + nbr_per_token * 2 * 2 * de * d + 4 * K * r * d
            fwd += len(self.retro_layers) * cca
            E = c.retro.retro_encoder_num_layers
            X = len(c.retro.retro_encoder_cross_attention_layers)
            per_nbr_token = (
                (2 * d * de if de != d else 0)
                + E * layer(de, fe, r)
                + X * (2 * 2 * de * de + 4 * m * de)
            )
            fwd += nbr_per_token * per_nbr_token + X * 2 * 2 * d * de
        return 3.0 * fwd
