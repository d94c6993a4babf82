"""Stage ``db``: cut every document into non-overlapping chunks; the retrieval chunk database.

For each split (train, valid) the token dataset is cut, block of documents by block, in Ray Data
tasks: document d of n text tokens gives ceil(n / chunk_length) chunks, the last possibly short
(the end-of-document token is not part of any chunk: it is not text, and a chunk holding only it
would be retrieved for nothing). Each chunk is a row::

    (dataset_idx, doc_idx, token_start, token_end, bert_len)      uint32, offsets within the document

where ``bert_len`` is the length of the chunk's text under the embedder's wordpiece tokenizer (the
text is the chunk's GPT tokens decoded). Output, as Megatron lays it out:

    db/merged/train.hdf5    chunks [n, 5] uint32; doc_offsets [n_docs, 3] uint64 =
                            (dataset_idx, doc_idx, end chunk id, exclusive); n_written [1]
    db/merged/valid.hdf5    the same for the valid split
    db/merged/sampled.hdf5  a seeded uniform sample of index.ntrain train chunks (Megatron takes
                            the first N, which biases the index towards the start of the corpus);
                            chunks [m, 5] plus chunk_ids [m] int64, the rows of train.hdf5

hdf5 files are written without timestamps so that a rerun produces byte-identical files.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from retro_ray import config as C
from retro_ray.embedder import load_wordpiece_tokenizer, wordpiece_lengths
from retro_ray.errors import RetroRayError
from retro_ray.indexed import IndexedDataset
from retro_ray.metrics import stage_metrics
from retro_ray.project import Project, Report, tmp_path_for
from retro_ray.runtime import connect, run_block_tasks
from retro_ray.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
STAGE = "db"
DB_SPLITS = ("train", "valid")
DEFAULT_MAX_NTRAIN = 1_000_000


def chunk_bounds(doc_lengths: np.ndarray, chunk_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunk rows of documents with ``doc_lengths`` text tokens each.

    Returns (doc index, token_start, token_end) per chunk, vectorised; document i has
    ceil(doc_lengths[i] / chunk_length) chunks.
    """
    doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
    n_chunks = -(-doc_lengths // chunk_length)  # ceil division
    doc = np.repeat(np.arange(len(doc_lengths), dtype=np.int64), n_chunks)
    first_chunk = np.concatenate([[0], np.cumsum(n_chunks)[:-1]]) if len(n_chunks) else np.zeros(0, np.int64)
    k = np.arange(int(n_chunks.sum()), dtype=np.int64) - np.repeat(first_chunk, n_chunks)
    start = k * chunk_length
    end = np.minimum(start + chunk_length, doc_lengths[doc])
    return doc, start, end


def text_lengths(ds: IndexedDataset, first: int, last: int, eod_id: int) -> np.ndarray:
    """Text tokens of documents first..last-1: their length without a trailing end-of-document."""
    lengths = ds.sequence_lengths[first:last].astype(np.int64)
    if len(lengths) == 0:
        return lengths
    starts = ds.sequence_pointers[first:last] // ds.dtype.itemsize
    last_tokens = ds.bin[np.maximum(starts + lengths - 1, 0)] if ds.num_tokens else np.zeros(len(lengths))
    has_eod = (lengths > 0) & (last_tokens == eod_id)
    return lengths - has_eod.astype(np.int64)


_CACHE: dict[str, object] = {}


def _cached(key: str, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def chunk_block(item: dict) -> dict:
    """Chunk documents [first, last) of one split; write the rows of the block to a .npy file."""
    out = Path(item["out"])
    ds = _cached("ds:" + item["prefix"], lambda: IndexedDataset(item["prefix"]))
    gpt = _cached("gpt:" + item["tokenizer"], lambda: load_tokenizer(Path(item["tokenizer"])))
    bert = _cached("bert:" + str(item["bert_dir"]), lambda: load_wordpiece_tokenizer(item["bert_dir"]))
    first, last = item["first"], item["last"]
    lengths = text_lengths(ds, first, last, item["eod_id"])
    doc, start, end = chunk_bounds(lengths, item["chunk_length"])
    doc_starts = (ds.sequence_pointers[first:last] // ds.dtype.itemsize).astype(np.int64)
    token_lists = [ds.bin[s:e].tolist() for s, e in zip(doc_starts[doc] + start, doc_starts[doc] + end)]
    texts = gpt.decode_batch(token_lists, skip_special_tokens=True)
    bert_len = wordpiece_lengths(bert, texts)
    rows = np.empty((len(doc), 5), dtype=np.uint32)
    rows[:, 0] = 0  # dataset_idx: one dataset (Megatron blends several)
    rows[:, 1] = doc + first
    rows[:, 2] = start
    rows[:, 3] = end
    rows[:, 4] = np.minimum(bert_len, np.iinfo(np.uint32).max)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        np.save(f, rows)
    os.replace(tmp, out)
    m = stage_metrics(STAGE)
    m.rows(last - first)
    m.chunks(len(rows))
    return {"block_key": item["block_key"], "chunks": len(rows), "docs": last - first}


def _write_h5(path: Path, datasets: dict[str, np.ndarray]) -> None:
    """Write an hdf5 file atomically and reproducibly (no timestamps in object headers)."""
    tmp = tmp_path_for(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w", track_order=False) as f:
            for name, arr in datasets.items():
                f.create_dataset(name, data=arr, track_times=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def merge_split(block_files: list[Path], n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate block rows in order; doc_offsets from the per-document chunk counts."""
    chunks = np.concatenate([np.load(p) for p in block_files]) if block_files else np.zeros((0, 5), np.uint32)
    counts = np.bincount(chunks[:, 1].astype(np.int64), minlength=n_docs) if len(chunks) else np.zeros(n_docs, np.int64)
    doc_offsets = np.zeros((n_docs, 3), dtype=np.uint64)
    doc_offsets[:, 1] = np.arange(n_docs)
    doc_offsets[:, 2] = np.cumsum(counts)
    return chunks, doc_offsets


def sample_chunks(n_chunks: int, ntrain: int | None, seed: int) -> np.ndarray:
    """Sorted ids of a seeded uniform sample of train chunks for index training."""
    if ntrain is None:
        ntrain = min(n_chunks, DEFAULT_MAX_NTRAIN)
    if ntrain > n_chunks:
        raise RetroRayError(
            f"index.ntrain={ntrain} but the train database has only {n_chunks} chunks; "
            f"lower index.ntrain to at most {n_chunks} (or leave it empty): "
            "`retro-ray prep --overwrite ... index.ntrain=N`."
        )
    rng = np.random.default_rng(seed + 1)  # +1: not the stream that shuffled the split
    return np.sort(rng.choice(n_chunks, size=ntrain, replace=False)).astype(np.int64)


def run(project: Project, run_cfg: C.DbRunConfig = C.DbRunConfig(), overrides: dict | None = None, *,
        progress: bool = True, address: str | None = None) -> Report:
    cfg = project.check_overrides(overrides or {})
    project.require("prep", STAGE)
    if run_cfg.docs_per_block <= 0:
        raise RetroRayError(f"db.docs_per_block={run_cfg.docs_per_block} must be positive.")
    if project.is_done(STAGE):
        report = project.report(STAGE)
        report.skipped = True
        return report
    derived = project.derived()
    project.remove_stale_temporaries(project.db_dir / "merged")
    for split in DB_SPLITS:
        project.remove_stale_temporaries(project.db_blocks_dir(split))
    timings: dict[str, float] = {}
    counts: dict[str, int] = {}

    t0 = time.perf_counter()
    plans: dict[str, list[tuple[dict, Path]]] = {}
    for split in DB_SPLITS:
        ds = IndexedDataset(project.token_prefix(split))
        bdir = project.db_blocks_dir(split)
        plans[split] = []
        for b, first in enumerate(range(0, len(ds), run_cfg.docs_per_block)):
            out = bdir / f"{b:06d}.npy"
            item = {"block_key": f"{split}/{b}", "out": str(out), "prefix": str(project.token_prefix(split)),
                    "tokenizer": str(project.tokenizer_path), "bert_dir": cfg.embedder.model_dir,
                    "first": first, "last": min(first + run_cfg.docs_per_block, len(ds)),
                    "chunk_length": cfg.chunk_length, "eod_id": derived["eod_id"]}
            plans[split].append((item, out))
    todo = [item for plan in plans.values() for item, out in plan if not out.is_file()]
    if todo:
        connect(address, progress)
        # Fail here, once, with a clear message, rather than in every task.
        load_wordpiece_tokenizer(cfg.embedder.model_dir)
        run_block_tasks(chunk_block, todo, run_cfg.cpus_per_task, "chunk")
    timings["chunk"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for split in DB_SPLITS:
        n_docs = len(IndexedDataset(project.token_prefix(split)))
        chunks, doc_offsets = merge_split([out for _, out in plans[split]], n_docs)
        _write_h5(project.merged_db_path(split), {
            "chunks": chunks, "doc_offsets": doc_offsets,
            "n_written": np.array([len(chunks)], dtype=np.uint64),
        })
        counts[f"{split}_chunks"] = int(len(chunks))
        counts[f"{split}_docs"] = n_docs
        if split == "train":
            if len(chunks) == 0:
                raise RetroRayError("the train split produced no chunks; the corpus or the train split is empty.")
            ids = sample_chunks(len(chunks), cfg.index.ntrain, cfg.seed)
            _write_h5(project.merged_db_path("sampled"), {"chunks": chunks[ids], "chunk_ids": ids})
            counts["sampled_chunks"] = int(len(ids))
    timings["merge"] = time.perf_counter() - t0
    project.update_derived(chunks_per_split={s: counts[f"{s}_chunks"] for s in DB_SPLITS},
                           sampled_chunks=counts["sampled_chunks"])
    report = Report(stage=STAGE, counts=counts, timings=timings,
                    outputs=[str(project.merged_db_path(n)) for n in ("train", "valid", "sampled")])
    project.mark_done(report)
    stage_metrics(STAGE).seconds(sum(timings.values()), step="run")
    for plan in plans.values():
        for _, out in plan:
            out.unlink(missing_ok=True)
    shutil.rmtree(project.db_dir / "blocks", ignore_errors=True)
    return report
