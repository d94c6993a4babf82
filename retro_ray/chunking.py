"""How a document is cut into retrieval chunks: shared by the db stage, add-docs and the chunk readers.

A document of n text tokens (its end-of-document token is not text) gives ceil(n / chunk_length)
non-overlapping chunks, the last possibly short; a chunk is a row (doc, token_start, token_end) of
offsets within its document.
"""

from __future__ import annotations

import numpy as np

from retro_ray.indexed import IndexedDataset


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
