"""The chunk database as the retrieval side reads it: chunk id → tokens, text, document.

Chunk rows come from ``db/merged/<split>.hdf5`` (read once, as one array: 20 bytes a chunk);
tokens come from the memory-mapped token dataset. A neighbour, as RETRO feeds it to the encoder,
is the chunk plus its continuation — the next ``chunk_length`` tokens of the SAME document — padded
with the end-of-document token to ``2 × chunk_length``. (Megatron reads the continuation from the
next row of the database, which crosses into the next document at a document's last chunk.)
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from retro_ray.indexed import IndexedDataset
from retro_ray.project import Project


def decode_chunks(ds: IndexedDataset, rows: np.ndarray, tokenizer) -> list[str]:
    """Text of chunk rows (dataset_idx, doc_idx, token_start, token_end, bert_len) of ``ds``."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return []
    token0 = (ds.sequence_pointers[rows[:, 1]] // ds.dtype.itemsize).astype(np.int64)
    lists = [ds.bin[a:b].tolist() for a, b in zip(token0 + rows[:, 2], token0 + rows[:, 3])]
    return tokenizer.decode_batch(lists, skip_special_tokens=True)


class ChunkDatabase:
    """Read access to the chunks of one split's database."""

    def __init__(self, project: Project, split: str = "train") -> None:
        from retro_ray.prep.db import text_lengths

        self.project = project
        self.split = split
        cfg = project.read_config()
        derived = project.derived()
        self.chunk_length = cfg.chunk_length
        self.eod_id = int(derived["eod_id"])
        with h5py.File(project.merged_db_path(split), "r") as f:
            self.chunks = f["chunks"][:]                       # uint32 [n, 5]
            self.doc_offsets = f["doc_offsets"][:]             # uint64 [n_docs, 3]
        self.ds = IndexedDataset(project.token_prefix(split))
        self.doc_ids = np.load(project.doc_ids_path(split))  # split-local doc → docs.parquet row
        self._token0 = (self.ds.sequence_pointers // self.ds.dtype.itemsize).astype(np.int64)
        self._text_len = text_lengths(self.ds, 0, len(self.ds), self.eod_id)
        self._tokenizer = None
        self._titles = None

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from retro_ray.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.project.tokenizer_path)
        return self._tokenizer

    def global_doc_ids(self, chunk_ids: np.ndarray) -> np.ndarray:
        """docs.parquet row of each chunk's document; -1 where the chunk id is -1."""
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        valid = chunk_ids >= 0
        out = np.full(chunk_ids.shape, -1, dtype=np.int64)
        out[valid] = self.doc_ids[self.chunks[chunk_ids[valid], 1].astype(np.int64)]
        return out

    def neighbor_tokens(self, chunk_ids: np.ndarray) -> np.ndarray:
        """int64 [..., 2 × chunk_length]: chunk + same-document continuation, EOD-padded.

        Vectorised over any shape of ids; an id of -1 gives a row of EOD tokens.
        """
        ids = np.asarray(chunk_ids, dtype=np.int64)
        r = 2 * self.chunk_length
        flat = ids.reshape(-1)
        valid = flat >= 0
        rows = self.chunks[np.where(valid, flat, 0)].astype(np.int64)
        doc, start = rows[:, 1], rows[:, 2]
        avail = np.minimum(self._text_len[doc] - start, r)
        avail[~valid] = 0
        pos = np.arange(r, dtype=np.int64)[None, :]
        keep = pos < avail[:, None]
        idx = np.where(keep, (self._token0[doc] + start)[:, None] + pos, 0)
        out = np.where(keep, self.ds.bin[idx] if len(self.ds.bin) else 0, self.eod_id).astype(np.int64)
        return out.reshape(*ids.shape, r)

    def texts(self, chunk_ids: np.ndarray) -> list[str]:
        return decode_chunks(self.ds, self.chunks[np.asarray(chunk_ids, dtype=np.int64)], self.tokenizer)

    def titles(self, chunk_ids: np.ndarray) -> list[str]:
        if self._titles is None:
            import pyarrow.parquet as pq

            self._titles = pq.read_table(self.project.docs_path, columns=["title"]).column("title").to_pylist()
        return [self._titles[g] if g >= 0 else "" for g in self.global_doc_ids(chunk_ids)]

    @staticmethod
    def path_of(project: Project, split: str) -> Path:
        return project.merged_db_path(split)
