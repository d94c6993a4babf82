"""Stage ``db``: cut every document into non-overlapping chunks; the retrieval chunk database.

For each split (train, valid) the token dataset is cut, block of documents by block, in Ray
tasks: document d of n text tokens gives ceil(n / chunk_length) chunks, the last possibly short
(the end-of-document token is not part of any chunk: it is not text, and a chunk holding only it
would be retrieved for nothing). Each chunk is a row::

    (dataset_idx, doc_idx, token_start, token_end, bert_len)      uint32, offsets within the document

where ``bert_len`` is the length of the chunk's text under the embedder's wordpiece tokenizer (the
text is the chunk's GPT tokens decoded). Both are computed the cheap way where that is exact: the
text from a per-token byte table (byte-level BPE), the length as a sum of per-word counts from a
cache (BERT's wordpiece works word by word); see ``ByteLevelDecoder`` and ``WordpieceCounter``.
Output, as Megatron lays it out:

    db/merged/train.hdf5    chunks [n, 5] uint32; doc_offsets [n_docs, 3] uint64 =
                            (dataset_idx, doc_idx, end chunk id, exclusive); n_written [1]
    db/merged/valid.hdf5    the same for the valid split
    db/merged/sampled.hdf5  a seeded uniform sample of index.ntrain train chunks (Megatron takes
                            the first N, which biases the index towards the start of the corpus);
                            chunks [m, 5] plus chunk_ids [m] int64, the rows of train.hdf5

hdf5 files are written without timestamps so that a rerun produces byte-identical files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from retro_ray import config as C
from retro_ray.chunking import chunk_bounds, text_lengths
from retro_ray.embedder import load_wordpiece_tokenizer
from retro_ray.errors import RetroRayError
from retro_ray.indexed import IndexedDataset
from retro_ray.metrics import stage_metrics
from retro_ray.project import Report, tmp_path_for
from retro_ray.retrieval.chunks import map_h5_dataset
from retro_ray.runtime import connect, count_by_node, run_block_tasks
from retro_ray.stages import STAGES
from retro_ray.stages.base import Stage, StageRun
from retro_ray.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
NAME = "db"
DB_SPLITS = ("train", "valid")
DEFAULT_MAX_NTRAIN = 1_000_000


def _tokenizer_json(tok) -> dict:
    return json.loads(tok.to_str())


def _encode_batch_fast(tok):
    """``encode_batch_fast`` (tokenizers >= 0.20: no offsets) where there is one."""
    return getattr(tok, "encode_batch_fast", tok.encode_batch)


# Characters that Python's str.split() splits on but BERT does not: they are control characters, which
# BERT's clean_text deletes before it maps whitespace to spaces (and without clean_text, \x1c-\x1f are
# not whitespace to its pre-tokenizer). Around one of them BERT joins what split() parts.
_SPLIT_BUT_JOINED_BY_BERT = re.compile("[\x0b\x0c\x1c-\x1f\x85]")


class WordpieceCounter:
    """Wordpiece length of texts under a BERT tokenizer, as the sum of the counts of their words.

    BERT tokenizes word by word: its normalizer works character by character (clean-up, CJK padding,
    accent stripping, lowercasing), its pre-tokenizer splits on whitespace and then on punctuation,
    and WordPiece encodes each piece alone. So a text's length is the sum, over its whitespace-separated
    words (``str.split()``), of each word's length under the full tokenizer, and a word's length can be
    cached. Texts that hold a character split() and BERT disagree on (``_SPLIT_BUT_JOINED_BY_BERT``) are
    encoded whole, and so is everything when the tokenizer is not that pipeline (another normalizer,
    pre-tokenizer or model, added tokens that hold whitespace or strip it, truncation, padding).

    The cache keeps the first ``max_words`` words it sees; words past that are counted per call.
    """

    def __init__(self, tokenizer, max_words: int = 1 << 19) -> None:
        self.tokenizer = tokenizer
        self.max_words = max_words
        self._counts: dict[str, int] = {}
        self._encode = _encode_batch_fast(tokenizer)
        self.per_word = self._is_word_by_word(tokenizer)

    @staticmethod
    def _is_word_by_word(tok) -> bool:
        if tok.truncation is not None or tok.padding is not None:
            return False
        spec = _tokenizer_json(tok)
        normalizer, pre, model = spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("model") or {}
        if normalizer is not None and normalizer.get("type") != "BertNormalizer":
            return False
        if (pre or {}).get("type") != "BertPreTokenizer" or model.get("type") != "WordPiece":
            return False
        for t in spec.get("added_tokens") or []:
            content = t.get("content", "")
            if t.get("lstrip") or t.get("rstrip") or content.split() != [content]:
                return False
        return True

    def _count(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self._encode(list(texts), add_special_tokens=False)]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not self.per_word:
            return np.array(self._count(texts), dtype=np.int64).reshape(-1)
        whole = []  # texts to encode whole
        if _SPLIT_BUT_JOINED_BY_BERT.search("".join(texts)):
            whole = [i for i, t in enumerate(texts) if _SPLIT_BUT_JOINED_BY_BERT.search(t)]
        words = [t.split() for t in texts]
        for i in whole:
            words[i] = []
        counts = self._counts
        uniq = set(chain.from_iterable(words))
        missing = list(uniq.difference(counts))
        lookup = counts
        if missing:
            fresh = dict(zip(missing, self._count(missing)))
            room = self.max_words - len(counts)
            if len(fresh) <= room:
                counts.update(fresh)
            else:
                counts.update(kv for kv, _ in zip(fresh.items(), range(max(room, 0))))
                lookup = {w: counts[w] if w in counts else fresh[w] for w in uniq}
        get = lookup.__getitem__
        out = np.fromiter((sum(map(get, ws)) for ws in words), dtype=np.int64, count=len(words))
        if whole:
            out[whole] = self._count([texts[i] for i in whole])
        return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE spells its tokens in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


class ByteLevelDecoder:
    """``tok.decode_batch(pieces, skip_special_tokens=True)`` for pieces of one token array, from a byte table.

    A byte-level BPE token decodes to fixed bytes (its characters mapped back through the byte-level
    alphabet, or its UTF-8 when it is not spelled in that alphabet, as an added token may be; a special
    token to nothing), and a piece decodes to its tokens' bytes joined and read as UTF-8 with invalid
    bytes replaced, as Rust's from_utf8_lossy (and Python's "replace") does. ``usable`` is False when
    the tokenizer's decoder is not plain ByteLevel; then ``decode`` calls the tokenizer.
    """

    def __init__(self, tokenizer, pieces_per_batch: int = 8192) -> None:
        self.tokenizer = tokenizer
        self.pieces_per_batch = pieces_per_batch
        self.usable = (_tokenizer_json(tokenizer).get("decoder") or {}).get("type") == "ByteLevel"
        if not self.usable:
            return
        char_byte = {c: b for b, c in _bytes_to_unicode().items()}
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        table, known = [], []
        for i in range(tokenizer.get_vocab_size()):
            tok = tokenizer.id_to_token(i)
            known.append(tok is not None)
            if tok is None or i in special:
                table.append(b"")
            elif all(c in char_byte for c in tok):
                table.append(bytes(char_byte[c] for c in tok))
            else:
                table.append(tok.encode("utf-8"))
        lengths = np.fromiter(map(len, table), dtype=np.int64, count=len(table))
        self._known = np.array(known, dtype=bool)
        self._lengths = lengths
        self._offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._bytes = np.frombuffer(b"".join(table), dtype=np.uint8)

    def decode(self, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[str]:
        """The text of tokens[starts[i]:ends[i]] for every i."""
        tokens = np.asarray(tokens)
        if not self.usable or (len(tokens) and (int(tokens.max()) >= len(self._lengths)
                                                or not self._known[tokens].all())):
            ids = tokens.tolist()
            return self.tokenizer.decode_batch([ids[a:b] for a, b in zip(starts.tolist(), ends.tolist())],
                                               skip_special_tokens=True)
        starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        out: list[str] = []
        # a batch of pieces at a time, so that the byte index below stays small for any block size
        for i in range(0, len(starts), self.pieces_per_batch):
            s, e = starts[i:i + self.pieces_per_batch], ends[i:i + self.pieces_per_batch]
            lo, hi = int(s.min()), int(max(e.max(), s.min()))
            out += self._decode_span(tokens[lo:hi], s - lo, e - lo)
        return out

    def _decode_span(self, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[str]:
        lengths = self._lengths[tokens]
        ends_b = np.cumsum(lengths)
        n = int(ends_b[-1]) if len(ends_b) else 0
        # byte k of the span lies at offset(token) + (k - first byte of that token) in the table
        gather = np.repeat(self._offsets[tokens] - (ends_b - lengths), lengths) + np.arange(n, dtype=np.int64)
        buf = self._bytes[gather].tobytes()
        bounds = np.concatenate([[0], ends_b])
        return [buf[a:b].decode("utf-8", "replace") for a, b in zip(bounds[starts].tolist(), bounds[ends].tolist())]


_CACHE: dict[str, object] = {}


def _cached(key: str, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def chunk_block(item: dict) -> dict:
    """Chunk documents [first, last) of one split; write the rows of the block to a .npy file."""
    t0 = time.perf_counter()
    out = Path(item["out"])
    ds = _cached("ds:" + item["prefix"], lambda: IndexedDataset(item["prefix"]))
    gpt = _cached("gpt:" + item["tokenizer"], lambda: ByteLevelDecoder(load_tokenizer(Path(item["tokenizer"]))))
    bert = _cached("bert:" + str(item["bert_dir"]), lambda: WordpieceCounter(load_wordpiece_tokenizer(item["bert_dir"])))
    first, last = item["first"], item["last"]
    lengths = text_lengths(ds, first, last, item["eod_id"])
    doc, start, end = chunk_bounds(lengths, item["chunk_length"])
    doc_starts = (ds.sequence_pointers[first:last] // ds.dtype.itemsize).astype(np.int64)
    # One read of the tokens the block's documents span, then offsets within it.
    base = int(doc_starts.min()) if len(doc_starts) else 0
    block_end = int((doc_starts + ds.sequence_lengths[first:last]).max()) if len(doc_starts) else 0
    block = np.array(ds.bin[base:block_end])
    texts = gpt.decode(block, doc_starts[doc] - base + start, doc_starts[doc] - base + end)
    bert_len = bert(texts)
    rows = np.empty((len(doc), 5), dtype=np.uint32)
    rows[:, 0] = 0  # dataset_idx: one dataset (Megatron blends several)
    rows[:, 1] = doc + first
    rows[:, 2] = start
    rows[:, 3] = end
    rows[:, 4] = np.minimum(bert_len, np.iinfo(np.uint32).max)
    # The driver made out.parent (see prep.tokenize_block for why tasks do not).
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, rows)
    os.replace(tmp, out)
    m = stage_metrics(NAME)
    m.rows(last - first)
    m.chunks(len(rows))
    m.seconds(time.perf_counter() - t0)
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


def write_merged(path: Path, blocks: Sequence[tuple[int, int, Path]]) -> int:
    """Write a split's merged database from its block files, one block in memory at a time; the
    number of chunks.

    ``blocks``: (first doc, last doc, rows file) in document order. ``chunks`` is the blocks' rows
    concatenated; ``doc_offsets[d] = (0, d, chunks of documents 0..d)``. The datasets are written in
    that order, each as one contiguous run, so the file is the one ``_write_h5`` writes from whole
    arrays, byte for byte; the driver holds one block instead of the split (20 B a chunk, 24 B a
    document: 625 + 48 GB at 2 T tokens).
    """
    n = sum(int(np.load(f, mmap_mode="r").shape[0]) for _, _, f in blocks)
    n_docs = blocks[-1][1] if blocks else 0
    tmp = tmp_path_for(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w", track_order=False) as f:
            dset = f.create_dataset("chunks", shape=(n, 5), dtype=np.uint32, track_times=False)
            at = 0
            for _, _, rows_file in blocks:
                rows = np.load(rows_file)
                if len(rows):
                    dset[at:at + len(rows)] = rows
                at += len(rows)
            offsets = f.create_dataset("doc_offsets", shape=(n_docs, 3), dtype=np.uint64, track_times=False)
            done = 0
            for first, last, rows_file in blocks:
                docs = np.load(rows_file, mmap_mode="r")[:, 1].astype(np.int64) - first
                part = np.zeros((last - first, 3), dtype=np.uint64)
                part[:, 1] = np.arange(first, last)
                part[:, 2] = done + np.cumsum(np.bincount(docs, minlength=last - first))
                if len(part):
                    offsets[first:last] = part
                done += len(docs)
            f.create_dataset("n_written", data=np.array([n], dtype=np.uint64), track_times=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


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


class Db(Stage):
    spec = STAGES["db"]
    run_config = C.DbRunConfig

    def temporaries(self, run: StageRun) -> list[Path]:
        p = run.project
        return [p.db_dir, p.merged_db_dir, *(p.db_blocks_dir(split) for split in DB_SPLITS)]

    def work(self, run: StageRun) -> Report:
        project, cfg, run_cfg = run.project, run.config, run.cfg
        derived = project.derived()
        timings: dict[str, float] = {}
        counts: dict[str, Any] = {}

        t0 = time.perf_counter()
        plans: dict[str, list[tuple[dict, Path]]] = {}
        for split in DB_SPLITS:
            ds = IndexedDataset(project.token_prefix(split))
            plans[split] = []
            for b, first in enumerate(range(0, len(ds), run_cfg.docs_per_block)):
                out = project.db_block(split, b)
                item = {"block_key": f"{split}/{b}", "out": str(out), "prefix": str(project.token_prefix(split)),
                        "tokenizer": str(project.tokenizer_path), "bert_dir": cfg.embedder.model_dir,
                        "first": first, "last": min(first + run_cfg.docs_per_block, len(ds)),
                        "chunk_length": cfg.chunk_length, "eod_id": derived["eod_id"]}
                plans[split].append((item, out))
        todo = [item for plan in plans.values() for item, out in plan if not out.is_file()]
        if todo:
            for split in DB_SPLITS:
                project.db_blocks_dir(split).mkdir(parents=True, exist_ok=True)
            connect(run.address, run.progress)
            # Fail here, once, with a clear message, rather than in every task.
            load_wordpiece_tokenizer(cfg.embedder.model_dir)
            counts["blocks_by_node"] = count_by_node(
                r["node_id"] for r in run_block_tasks(chunk_block, todo, run_cfg.cpus_per_task, "chunk"))
        timings["chunk"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for split in DB_SPLITS:
            n_docs = len(IndexedDataset(project.token_prefix(split)))
            n_chunks = write_merged(project.merged_db_path(split),
                                    [(item["first"], item["last"], out) for item, out in plans[split]])
            counts[f"{split}_chunks"] = n_chunks
            counts[f"{split}_docs"] = n_docs
            if split == "train":
                if n_chunks == 0:
                    raise RetroRayError("the train split produced no chunks; the corpus or the train split is empty.")
                ids = sample_chunks(n_chunks, cfg.index.ntrain, cfg.seed)
                chunks = map_h5_dataset(project.merged_db_path(split), "chunks")
                _write_h5(project.merged_db_path("sampled"), {"chunks": np.asarray(chunks[ids]), "chunk_ids": ids})
                del chunks
                counts["sampled_chunks"] = int(len(ids))
        timings["merge"] = time.perf_counter() - t0
        project.update_derived(chunks_per_split={s: counts[f"{s}_chunks"] for s in DB_SPLITS},
                               sampled_chunks=counts["sampled_chunks"])
        report = Report(stage=NAME, counts=counts, timings=timings,
                        outputs=[str(project.merged_db_path(n)) for n in ("train", "valid", "sampled")])
        return report

    def finish(self, run: StageRun, report: Report) -> None:
        super().finish(run, report)
        run.project.remove_scratch_dir(run.project.db_scratch_dir)  # the blocks only served a resume


STAGE = Db()
run = STAGE.run
