"""``add-docs``: add documents to the retrieval database without retraining.

RETRO's knowledge lives partly in its retrieval database, so a trained model learns new facts when
documents are added to the database it retrieves from (Borgeaud et al. 2022 §4; Wang et al. 2023,
"Shall we pretrain autoregressive language models with retrieval?"). ``add_documents`` does that for
a finished project: the new documents are normalised, tokenized with the project's GPT tokenizer,
cut into ``chunk_length`` chunks exactly as the db stage cuts (:func:`retro_ray.chunking.chunk_bounds`,
wordpiece lengths included), embedded with the project's embedder and settings, and added to the
merged index (``added.faissindex``) and to every shard file. ``retro-ray search``,
``Retriever.local`` / ``Retriever.sharded`` and generation then retrieve them.

Design (the choices, and why):

* Training data never changes. The train token dataset, ``db/merged/*.hdf5``, ``docs.parquet``, the
  embeddings and the query stage's neighbours stay byte-identical. Added documents live in their own
  store, ``db/added/`` (layout in :mod:`retro_ray.retrieval.chunks`): append-only token and embedding
  files, and per commit a small version directory with the chunk rows and the document table
  (title, content digest, token offsets; text is the tokens: byte-level BPE is lossless).
  ``ChunkDatabase`` presents chunk ids ``0 .. n_train - 1`` as before and the added chunks from
  ``n_train`` on; document ids of added documents start after the last docs.parquet row. Existing
  ids never change; new ones are appended.
* Shards: added chunk ``n_train + j`` goes to shard ``j % num_shards`` (round-robin,
  :func:`retro_ray.retrieval.shards.added_chunk_ids`): shards grow alike, and a shard's vector count
  says which added ids it holds, which is what makes an interrupted add finishable.
* Commit order, so that a ``kill -9`` at any moment leaves a searchable project whose every returned
  id resolves: (1) append tokens and embeddings (fsync), write the new version directory; (2) replace
  ``db/added/CURRENT.json`` atomically: the chunk database now knows the new chunks, no index does;
  (3) write every updated index file (shards, then the merged one) under a temporary name, fsync;
  (4) rename them over the old files, one after another (a window of microseconds); (5) write
  ``added_docs.json`` beside the index. Readers open the index before the chunk database. A crash
  before (2) leaves the old contents (the next run truncates the unfinished tails and deletes the
  uncommitted version directory); a crash after (2) leaves old or new index files, all resolvable,
  and the next run (any add, even of nothing new) first completes the index from the stored
  embeddings, without re-embedding.
* One writer at a time: an exclusive ``flock`` on ``db/added/.lock`` serialises adds from the CLI and
  a server (and from threads of one server).
* Idempotent: a document is identified by the BLAKE2b-128 digest of its normalised text (the digest
  ``prep`` de-duplicates the corpus with). A document already added, repeated within the input, or
  already in the corpus (any split: adding a valid-split document would leak it into retrieval for
  the evaluation) is skipped and counted. Adding the same file twice adds nothing the second time,
  and the report says so (``skipped``). The corpus digests are cached in ``db/added/corpus_digests.npy``.
* Cost: the index files are rewritten on every add (Faiss cannot append to a file), so an add costs
  about one read and one write of the index besides the embedding; batch documents per call.
* Bad input is a one-line ``RetroRayError`` naming the fix, raised before anything is written:
  missing path, no documents, no text field, index-add not done, an embedder that does not match
  the one the index was built with.

Live retrievers: ``add_documents(..., retriever=r)`` calls ``r.sync_added()`` after the commit, which
loads the new chunks into ``r.db`` and then adds the new vectors to ``r.searcher`` (a LocalIndex in
this process, or the IndexShard actors): searches may run meanwhile, and see the new documents once
the call returns. Another process's retriever picks the add up with its own ``sync_added()``.

``RETRO_RAY_ADD_DOCS_KILL_AT=<point>`` (one of :data:`KILL_POINTS`) makes the process ``SIGKILL``
itself at that commit point: the crash tests use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retro_ray.config import config_class
from retro_ray.embedder import group_size
from retro_ray.errors import RetroRayError
from retro_ray.metrics import stage_metrics
from retro_ray.project import Project, Report, atomic_write_json
from retro_ray.retrieval.chunks import (
    ADDED_FORMAT,
    AddedChunks,
    load_added,
    read_added_state,
)
from retro_ray.stages import STAGES
from retro_ray.stages.base import Stage, StageRun

log = logging.getLogger(__name__)
KILL_AT_ENV = "RETRO_RAY_ADD_DOCS_KILL_AT"
KILL_POINTS = ("before-db-commit", "db-committed", "index-partial")
_VERSION_DIR = re.compile(r"^v(\d{6,})$")


@config_class
class AddDocsConfig:
    """Settings of one ``add-docs`` call (what the documents look like, how to embed them)."""

    text_field: str | None = field(
        default=None,
        metadata={"help": "JSONL key / Parquet column / record key with the text. Empty = the project's corpus.text_field."},
    )
    title_field: str | None = field(
        default=None,
        metadata={"help": "JSONL key / Parquet column / record key with the title (optional in the data). "
                          "Empty = the project's corpus.title_field."},
    )
    device: str = field(default="auto", metadata={"help": "Embedder device when add-docs loads it: auto | cpu | cuda | cuda:N."})


@dataclass
class NewDocument:
    title: str
    text: str
    digest: str  # hex BLAKE2b-128 of the normalised text
    source: str


# ------------------------------------------------------------------------------------------------
# Input
# ------------------------------------------------------------------------------------------------
def _digest(text: str) -> bytes:
    # Exactly prep's de-duplication digest (retro_ray.corpus.ingest).
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _key64(digest: bytes) -> int:
    """The first 8 digest bytes as one integer: the corpus lookup key (collisions ~ n / 2**64)."""
    return int.from_bytes(digest[:8], "little", signed=False)


def read_documents(source: str | os.PathLike | Sequence[dict], text_field: str, title_field: str,
                   normalization: str) -> tuple[list[NewDocument], dict[str, int]]:
    """Normalised documents of ``source`` (a path, or records ``{"title": ..., "text": ...}``).

    Returns the non-empty ones and counts (``docs_read``, ``docs_skipped_empty``). Raises
    ``RetroRayError`` for a missing path, unreadable data, a missing text field or no documents.
    """
    from retro_ray.corpus import normalize_text

    raw: Iterator[tuple[str, str]]
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise RetroRayError(
                f"documents file {path} does not exist; give a .jsonl / .jsonl.gz / .parquet / text file, "
                "or a directory of them"
            )
        where, src_name = str(path), str(path)
        raw = _iter_path(path, text_field, title_field)
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        where, src_name = "the request", "request"
        raw = _iter_records(source, text_field, title_field)
    else:
        raise RetroRayError(
            f"add_documents got a {type(source).__name__}; pass a path or a list of "
            f'{{"{title_field}": ..., "{text_field}": ...}} records'
        )
    docs, n_read, n_empty = [], 0, 0
    for title, text in raw:
        n_read += 1
        text = normalize_text(text, normalization)
        if not text:
            n_empty += 1
            continue
        docs.append(NewDocument(normalize_text(title or "", normalization), text, _digest(text).hex(), src_name))
    if not docs:
        raise RetroRayError(
            f"{where} holds no documents ({n_read} read, {n_empty} empty); give at least one document with a "
            f"non-empty {text_field!r} field"
        )
    return docs, {"docs_read": n_read, "docs_skipped_empty": n_empty}


def _iter_path(path: Path, text_field: str, title_field: str) -> Iterator[tuple[str, str]]:
    from retro_ray.config import CorpusConfig
    from retro_ray.corpus import IngestStats, iter_raw_documents

    cfg = CorpusConfig(path=str(path), text_field=text_field, title_field=title_field)
    try:
        yield from iter_raw_documents(cfg, IngestStats())
    except RetroRayError as e:
        # corpus.py names the prep options; here the same fix is add-docs' own option.
        raise RetroRayError(str(e).replace("corpus.text_field", "text_field").replace("corpus.format", "the file extension")) from None


def _iter_records(records: Sequence[Any], text_field: str, title_field: str) -> Iterator[tuple[str, str]]:
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise RetroRayError(
                f"document {i} is a {type(r).__name__}, not an object; send objects like "
                f'{{"{title_field}": "...", "{text_field}": "..."}}'
            )
        if text_field not in r:
            raise RetroRayError(
                f"document {i} has no field {text_field!r} (it has: {', '.join(sorted(map(str, r))) or 'none'}); "
                f"put the text under {text_field!r} or set text_field"
            )
        text, title = r[text_field], r.get(title_field)
        if text is not None and not isinstance(text, str):
            raise RetroRayError(f"document {i}: field {text_field!r} is a {type(text).__name__}, not a string; send the text as a string")
        yield (title if isinstance(title, str) else ""), (text or "")


# ------------------------------------------------------------------------------------------------
# The store: paths, lock, recovery
# ------------------------------------------------------------------------------------------------
def _maybe_kill(point: str) -> None:
    if os.environ.get(KILL_AT_ENV) == point:
        log.warning("add-docs: %s=%s: killing this process (crash test)", KILL_AT_ENV, point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _store_lock(project: Project) -> Iterator[None]:
    """Exclusive lock of the added-documents store (blocks until another writer is done)."""
    project.added_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(project.added_lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _truncate(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size > size:
        os.truncate(path, size)


def _clean_uncommitted(project: Project, state: dict | None) -> None:
    """Remove what an interrupted add left behind before its commit; keep the previous version (a reader
    may still be loading it)."""
    root = project.added_dir
    version = int(state["version"]) if state else 0
    for p in root.iterdir():
        m = _VERSION_DIR.match(p.name)
        if m and p.is_dir() and (int(m.group(1)) > version or int(m.group(1)) < version - 1):
            shutil.rmtree(p, ignore_errors=True)
    Project.remove_stale_temporaries(root)
    tokens = int(state["tokens"]) if state else 0
    itemsize = np.dtype(state["token_dtype"]).itemsize if state else 0
    _truncate(project.added_tokens_path, tokens * itemsize)
    _truncate(project.added_embeddings_path, (int(state["chunks"]) * int(state["dim"]) * 4) if state else 0)


def _index_targets(project: Project, n_base: int) -> list[tuple[Path, int, int | None]]:
    """(file, vectors index-add put there, shard number or None for the merged index)."""
    from retro_ray.retrieval.shards import shard_ranges

    files = project.shard_paths()
    ranges = shard_ranges(n_base, len(files))
    targets: list[tuple[Path, int, int | None]] = [(f, hi - lo, i) for i, (f, (lo, hi)) in enumerate(zip(files, ranges))]
    targets.append((project.added_index_path, n_base, None))
    return targets


def _complete_index(project: Project, store: AddedChunks | None) -> int:
    """Bring every index file up to the committed store; returns the vectors added. Idempotent."""
    import faiss

    from retro_ray.retrieval.index import load_index
    from retro_ray.retrieval.shards import add_ids, added_chunk_ids

    Project.remove_stale_temporaries(project.index_dir)
    Project.remove_stale_temporaries(project.index_shards_dir)
    if store is None:
        return 0
    marker = project.index_added_docs_path
    n_base, n_added = store.n_base_chunks, len(store)
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("version") == store.version and done.get("chunks") == n_added:
            return 0
    targets = _index_targets(project, n_base)
    num_shards = len(targets) - 1
    prepared: list[tuple[Path, Path]] = []
    added = 0
    try:
        for path, base, shard in targets:
            ids = (np.arange(n_base, n_base + n_added, dtype=np.int64) if shard is None
                   else added_chunk_ids(shard, num_shards, n_base, n_added))
            index = load_index(path)
            have = int(index.ntotal) - base
            if not 0 <= have <= len(ids):
                raise RetroRayError(
                    f"{path} holds {index.ntotal} vectors; index-add put {base} there and the added documents explain "
                    f"up to {len(ids)} more; the index and db/added disagree: rebuild the index "
                    f"(remove {project.index_dir} and the index-train / index-add markers, run `retro-ray index`), then add again"
                )
            todo = ids[have:]
            if len(todo):
                local = todo - n_base
                block = store.embeddings(int(local[0]), int(local[-1]) + 1)
                add_ids(index, block[local - local[0]], todo)
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                faiss.write_index(index, str(tmp))
                _fsync_path(tmp)
                prepared.append((tmp, path))
                added += len(todo)
            del index
        # All written: now the renames, back to back.
        for k, (tmp, path) in enumerate(prepared):
            os.replace(tmp, path)
            if k == 0:
                _maybe_kill("index-partial")
        for d in {path.parent for _, path in prepared}:
            _fsync_path(d)
    except BaseException:
        for tmp, _ in prepared:
            tmp.unlink(missing_ok=True)
        raise
    atomic_write_json(marker, {"version": store.version, "chunks": n_added, "finished_at": time.time()})
    return added


def _corpus_keys(project: Project) -> np.ndarray:
    """Sorted uint64 keys of the digests of every corpus document (cached in db/added/)."""
    import pyarrow.parquet as pq

    cache = project.corpus_digests_path
    meta = project.corpus_digests_meta_path
    pf = pq.ParquetFile(project.docs_path)
    n_docs = int(pf.metadata.num_rows)
    if cache.is_file() and meta.is_file() and json.loads(meta.read_text()).get("docs") == n_docs:
        return np.load(cache)
    keys = np.empty(n_docs, dtype=np.uint64)
    i = 0
    for rg in range(pf.num_row_groups):
        for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
            keys[i] = _key64(_digest(text or ""))
            i += 1
    keys = np.sort(keys[:i])
    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, keys)
    os.replace(tmp, cache)
    atomic_write_json(meta, {"docs": n_docs})
    return keys


def _in_sorted(keys: np.ndarray, key: int) -> bool:
    i = int(np.searchsorted(keys, np.uint64(key)))
    return i < len(keys) and int(keys[i]) == key


# ------------------------------------------------------------------------------------------------
# Embedder
# ------------------------------------------------------------------------------------------------
def _check_embedder(embedder, project: Project) -> None:
    from retro_ray.embedder import resolve_model_dir

    cfg = project.read_config()
    want_dir = resolve_model_dir(cfg.embedder.model_dir)
    want_dim = int(project.derived().get("embed_dim", embedder.dim))
    got_dir = Path(getattr(embedder, "model_dir", want_dir)).resolve()
    if got_dir != want_dir:
        raise RetroRayError(
            f"the embedder given is {got_dir} but the project's index was built with {want_dir} "
            "(embedder.model_dir in config.json); pass the project's embedder, or none to load it"
        )
    if int(getattr(embedder, "max_length", cfg.embedder.max_chunk_length)) != int(cfg.embedder.max_chunk_length):
        raise RetroRayError(
            f"the embedder given truncates chunks at {embedder.max_length} wordpieces but the index was built with "
            f"{cfg.embedder.max_chunk_length} (embedder.max_chunk_length in config.json); pass an embedder with that setting, or none"
        )
    if int(embedder.dim) != want_dim:
        raise RetroRayError(
            f"the embedder gives {embedder.dim}-d vectors but the index holds {want_dim}-d ones; "
            "embed with the model the index was built with (embedder.model_dir in config.json)"
        )


def _project_embedder(project: Project, cfg: AddDocsConfig):
    from retro_ray.embedder import Embedder, EmbedderConfig

    pcfg = project.read_config()
    # The precision the embed stage used, so new vectors sit where the old ones would (as Retriever does).
    precision = str(project.derived().get("embed_precision", "auto")).split(",")[0]
    if precision not in ("fp32", "bf16", "fp16"):
        precision = "auto"
    return Embedder(EmbedderConfig(model_dir=pcfg.embedder.model_dir, max_chunk_length=pcfg.embedder.max_chunk_length,
                                   precision=precision, device=cfg.device, batch_size=pcfg.embedder.batch_size))


# ------------------------------------------------------------------------------------------------
# The add
# ------------------------------------------------------------------------------------------------
def _tokenize_and_chunk(project: Project, docs: list[NewDocument]) -> dict:
    """Tokens (+ EOD per document), chunk rows (doc index local to ``docs``) and chunk texts, as the db stage."""
    from retro_ray.chunking import chunk_bounds
    from retro_ray.embedder import load_wordpiece_tokenizer, wordpiece_lengths
    from retro_ray.tokenizer import load_tokenizer

    pcfg = project.read_config()
    derived = project.derived()
    eod = int(derived["eod_id"])
    dtype = np.dtype(derived["token_dtype"])
    gpt = load_tokenizer(project.tokenizer_path)
    encodings = gpt.encode_batch([d.text for d in docs], add_special_tokens=False)
    text_len = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    n_tokens = text_len + 1  # + the end-of-document token, as prep appends it
    starts = np.concatenate([[0], np.cumsum(n_tokens)[:-1]]).astype(np.int64)
    flat = np.empty(int(n_tokens.sum()), dtype=dtype)
    for s, e in zip(starts, encodings):
        flat[s:s + len(e.ids)] = e.ids
        flat[s + len(e.ids)] = eod
    doc, start, end = chunk_bounds(text_len, pcfg.chunk_length)
    texts = gpt.decode_batch([flat[a:b].tolist() for a, b in zip(starts[doc] + start, starts[doc] + end)],
                             skip_special_tokens=True)
    bert = load_wordpiece_tokenizer(pcfg.embedder.model_dir)
    rows = np.empty((len(doc), 5), dtype=np.uint32)
    rows[:, 0] = 0
    rows[:, 1] = doc
    rows[:, 2] = start
    rows[:, 3] = end
    rows[:, 4] = np.minimum(wordpiece_lengths(bert, texts), np.iinfo(np.uint32).max)
    return {"tokens": flat, "starts": starts, "n_tokens": n_tokens, "rows": rows, "texts": texts,
            "chunks_per_doc": np.bincount(doc, minlength=len(docs))}


def _embed(embedder, texts: list[str], group: int, progress: bool) -> np.ndarray:
    """The call's chunks in groups of ``group`` (the project's embedder group) from its first chunk,
    as the embed stage groups chunk ids: the same documents always get the same vectors."""
    from tqdm import tqdm

    out = np.empty((len(texts), embedder.dim), dtype=np.float32)
    with tqdm(total=len(texts), unit=" chunks", desc="add-docs embed", disable=True if not progress else None,
              leave=False) as bar:
        for lo in range(0, len(texts), group):  # one group a call: any embedder with embed() will do
            out[lo:lo + group] = embedder.embed(texts[lo:lo + group])
            bar.update(min(group, len(texts) - lo))
    return out


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _commit_db(project: Project, state: dict | None, store: AddedChunks | None, docs: list[NewDocument],
               chunked: dict, vectors: np.ndarray, embedder) -> dict:
    """Steps (1) and (2) of the module docstring; returns the new CURRENT state."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = project.added_dir
    derived = project.derived()
    version = (int(state["version"]) if state else 0) + 1
    old_docs = int(state["docs"]) if state else 0
    old_chunks = int(state["chunks"]) if state else 0
    old_tokens = int(state["tokens"]) if state else 0
    n_base_docs = int(state["n_base_docs"]) if state else int(_docs_in_corpus(project))
    # (1) data first: appended past the committed end, then the version directory.
    _append(project.added_tokens_path, chunked["tokens"].tobytes())
    _append(project.added_embeddings_path, np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    vdir = project.added_version_dir(version)
    shutil.rmtree(vdir, ignore_errors=True)
    vdir.mkdir(parents=True)
    rows = chunked["rows"].copy()
    rows[:, 1] += old_docs
    all_rows = np.concatenate([store.chunks, rows]) if store is not None else rows
    with open(project.added_chunks_path(version), "wb") as f:
        np.save(f, all_rows)
        f.flush()
        os.fsync(f.fileno())
    new_table = pa.table({
        "doc_id": pa.array(np.arange(n_base_docs + old_docs, n_base_docs + old_docs + len(docs), dtype=np.int64)),
        "title": pa.array([d.title for d in docs], pa.string()),
        "digest": pa.array([d.digest for d in docs], pa.string()),
        "token_start": pa.array(chunked["starts"] + old_tokens, pa.int64()),
        "n_tokens": pa.array(chunked["n_tokens"], pa.int64()),
        "n_chunks": pa.array(chunked["chunks_per_doc"].astype(np.int64), pa.int64()),
        "version": pa.array(np.full(len(docs), version, dtype=np.int64)),
        "source": pa.array([d.source for d in docs], pa.string()),
    })
    if store is not None:
        new_table = pa.concat_tables([pq.read_table(project.added_doc_table_path(store.state["dir"])), new_table])
    pq.write_table(new_table, project.added_doc_table_path(version), compression="zstd")
    _fsync_path(project.added_doc_table_path(version))
    _fsync_path(vdir)
    _fsync_path(root)
    _maybe_kill("before-db-commit")
    # (2) the commit point of the chunk database.
    new_state = {
        "format": ADDED_FORMAT, "version": version, "dir": vdir.name,
        "docs": old_docs + len(docs), "chunks": old_chunks + len(rows),
        "tokens": old_tokens + len(chunked["tokens"]), "token_dtype": str(derived["token_dtype"]),
        "dim": int(vectors.shape[1]), "n_base_chunks": int(derived["chunks_per_split"]["train"]),
        "n_base_docs": n_base_docs,
        "embedder": {"model_dir": str(embedder.model_dir), "max_chunk_length": int(embedder.max_length),
                     "precision": str(getattr(embedder, "precision", "unknown"))},
        "committed_at": time.time(),
    }
    atomic_write_json(project.added_state_path, new_state)
    _maybe_kill("db-committed")
    for p in root.iterdir():  # keep this version and the previous one
        m = _VERSION_DIR.match(p.name)
        if m and p.is_dir() and int(m.group(1)) < version - 1:
            shutil.rmtree(p, ignore_errors=True)
    return new_state


def _docs_in_corpus(project: Project) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(project.docs_path).metadata.num_rows)


def add_documents(project: Project, source: str | os.PathLike | Sequence[dict], cfg: AddDocsConfig | None = None, *,
                  retriever=None, embedder=None, progress: bool = True) -> Report:
    """Add documents to the retrieval database and the index; returns a ``Report``.

    ``source``: a .jsonl / .jsonl.gz / .parquet / text file or a directory of them (read like the
    corpus), or a list of ``{"title": ..., "text": ...}`` records. ``retriever``: a live
    ``Retriever`` of this project to bring up to date after the commit (its embedder is used too).
    ``embedder``: an already-loaded embedder to use (checked against the project's). See the module
    docstring for what is skipped, the commit order and recovery. (``add_docs.run(project, cfg,
    source=..., retriever=..., embedder=...)``, the stage's own ``run``, is the same.)
    """
    return STAGE.run(project, cfg, source=source, retriever=retriever, embedder=embedder, progress=progress)


class AddDocs(Stage):
    """Runs every time it is asked to (what it adds is idempotent per document): never marked done."""

    spec = STAGES["add-docs"]
    run_config = AddDocsConfig
    marks_done = False
    inputs = ("source", "retriever", "embedder")

    def work(self, run: StageRun) -> Report:
        t_start = time.perf_counter()
        project, cfg, pcfg, progress = run.project, run.cfg, run.config, run.progress
        source, retriever, embedder = run.inputs["source"], run.inputs.get("retriever"), run.inputs.get("embedder")
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        docs, counts = read_documents(source, cfg.text_field or pcfg.corpus.text_field,
                                      cfg.title_field or pcfg.corpus.title_field, pcfg.corpus.normalization)
        timings["read"] = time.perf_counter() - t0
        if retriever is not None:
            if Path(retriever.project.root) != project.root:
                raise RetroRayError(
                    f"the retriever serves {retriever.project.root}, not {project.root}; pass a retriever of this project"
                )
            embedder = embedder or retriever.embedder
        if embedder is not None:
            _check_embedder(embedder, project)

        root = project.added_dir
        with _store_lock(project):
            t0 = time.perf_counter()
            state = read_added_state(project)
            n_base = int(project.derived()["chunks_per_split"]["train"])
            if state is not None and int(state["n_base_chunks"]) != n_base:
                raise RetroRayError(
                    f"{root} extends a database of {state['n_base_chunks']} chunks but the train database now has "
                    f"{n_base}; the database was rebuilt: delete {root} and add the documents again"
                )
            _clean_uncommitted(project, state)
            store = load_added(project, state)
            recovered = _complete_index(project, store)
            if recovered:
                log.info("add-docs: finished an interrupted add: %d vectors added to the index files", recovered)
            timings["recover"] = time.perf_counter() - t0

            # Skip what the database holds already, and repeats within this input.
            corpus = _corpus_keys(project)
            known = set(store.digests) if store is not None else set()
            new: list[NewDocument] = []
            seen: set[str] = set()
            skipped = {"docs_skipped_already_added": 0, "docs_skipped_in_corpus": 0, "docs_skipped_repeated": 0}
            for d in docs:
                if d.digest in known:
                    skipped["docs_skipped_already_added"] += 1
                elif d.digest in seen:
                    skipped["docs_skipped_repeated"] += 1
                elif _in_sorted(corpus, _key64(bytes.fromhex(d.digest))):
                    skipped["docs_skipped_in_corpus"] += 1
                else:
                    seen.add(d.digest)
                    new.append(d)

            chunks_added = tokens_added = 0
            first_chunk_id = n_base + (len(store) if store is not None else 0)
            if new:
                t0 = time.perf_counter()
                chunked = _tokenize_and_chunk(project, new)
                timings["tokenize"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                if embedder is None:
                    embedder = _project_embedder(project, cfg)
                    _check_embedder(embedder, project)
                vectors = _embed(embedder, chunked["texts"], group_size(project.read_config().embedder.batch_size), progress)
                timings["embed"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                state = _commit_db(project, state, store, new, chunked, vectors, embedder)
                store = load_added(project, state)
                timings["commit_db"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                _complete_index(project, store)
                timings["index"] = time.perf_counter() - t0
                chunks_added, tokens_added = len(chunked["rows"]), len(chunked["tokens"])
                m = stage_metrics("index")
                m.rows(chunks_added)
                m.chunks(chunks_added)
                if timings["embed"] > 0:
                    stage_metrics("embed").chunks_per_second(chunks_added / timings["embed"])

        if retriever is not None:
            t0 = time.perf_counter()
            retriever.sync_added()
            timings["sync_retriever"] = time.perf_counter() - t0
        n_added_total = len(store) if store is not None else 0
        report_counts = {
            **counts,
            "docs_added": len(new),
            "docs_skipped": counts["docs_skipped_empty"] + sum(skipped.values()),
            **skipped,
            "chunks_added": chunks_added,
            "tokens_added": tokens_added,
            "first_chunk_id": first_chunk_id if chunks_added else -1,
            "vectors_recovered": recovered,
            "added_docs_total": int(state["docs"]) if state else 0,
            "added_chunks_total": n_added_total,
            "total_chunks": n_base + n_added_total,
        }
        timings["total"] = time.perf_counter() - t_start
        stage_metrics("index").seconds(timings["total"], step="add-docs")
        report = Report(stage=self.name, counts=report_counts, timings=timings,
                        outputs=[str(root), str(project.index_dir)], skipped=not new and not recovered)
        if new:
            log.info("add-docs: %d documents added (%d chunks, ids %d..%d); %d skipped; the database now has %d chunks",
                     len(new), chunks_added, first_chunk_id, first_chunk_id + chunks_added - 1, report_counts["docs_skipped"],
                     report_counts["total_chunks"])
        else:
            log.info("add-docs: nothing to add: all %d documents are already in the database (%d already added, "
                     "%d in the corpus, %d repeated, %d empty)", counts["docs_read"], skipped["docs_skipped_already_added"],
                     skipped["docs_skipped_in_corpus"], skipped["docs_skipped_repeated"], counts["docs_skipped_empty"])
        return report

    def finish(self, run: StageRun, report: Report) -> None:
        pass  # work() recorded its time (as the `index` metrics' "add-docs" step)


STAGE = AddDocs()
run = STAGE.run
