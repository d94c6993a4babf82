"""The db stage merges a split one block at a time: the file must be the one written from whole arrays."""

from __future__ import annotations

import numpy as np

from retro_ray.stages.db import _write_h5, write_merged


def _blocks(tmp_path, sizes_docs, seed=0):
    rng = np.random.default_rng(seed)
    blocks, first, all_rows = [], 0, []
    for b, n_docs in enumerate(sizes_docs):
        per_doc = rng.integers(0, 4, size=n_docs)  # some documents give no chunk
        doc = np.repeat(np.arange(first, first + n_docs), per_doc)
        rows = np.zeros((len(doc), 5), np.uint32)
        rows[:, 1] = doc
        rows[:, 2] = rng.integers(0, 1000, size=len(doc))
        rows[:, 3] = rows[:, 2] + 64
        rows[:, 4] = rng.integers(1, 200, size=len(doc))
        f = tmp_path / f"{b:06d}.npy"
        np.save(f, rows)
        blocks.append((first, first + n_docs, f))
        all_rows.append(rows)
        first += n_docs
    return blocks, (np.concatenate(all_rows) if all_rows else np.zeros((0, 5), np.uint32)), first


def test_block_by_block_merge_writes_the_whole_array_file_byte_for_byte(tmp_path):
    for sizes in ([7, 1, 12, 5], [3], []):
        blocks, chunks, n_docs = _blocks(tmp_path, sizes)
        counts = np.bincount(chunks[:, 1].astype(np.int64), minlength=n_docs)
        doc_offsets = np.zeros((n_docs, 3), np.uint64)
        doc_offsets[:, 1] = np.arange(n_docs)
        doc_offsets[:, 2] = np.cumsum(counts)
        whole, merged = tmp_path / "whole.hdf5", tmp_path / "merged.hdf5"
        _write_h5(whole, {"chunks": chunks, "doc_offsets": doc_offsets,
                          "n_written": np.array([len(chunks)], dtype=np.uint64)})
        assert write_merged(merged, blocks) == len(chunks)
        assert merged.read_bytes() == whole.read_bytes(), sizes
        assert not list(tmp_path.glob(".*.tmp*"))
