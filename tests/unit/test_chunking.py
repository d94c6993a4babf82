import numpy as np
import pytest

from retro_ray.chunking import chunk_bounds, text_lengths
from retro_ray.errors import RetroRayError
from retro_ray.indexed import IndexedDataset, IndexedDatasetWriter
from retro_ray.stages.db import sample_chunks
from retro_ray.stages.prep import assign_splits, split_sizes


def test_chunk_bounds_short_exact_and_long():
    doc, start, end = chunk_bounds(np.array([10, 64, 130, 1]), 64)
    assert doc.tolist() == [0, 1, 2, 2, 2, 3]
    assert start.tolist() == [0, 0, 0, 64, 128, 0]
    assert end.tolist() == [10, 64, 64, 128, 130, 1]


@pytest.mark.parametrize("n", [1, 63, 64, 65, 127, 128, 1000])
def test_chunk_count_is_ceil(n):
    doc, start, end = chunk_bounds(np.array([n]), 64)
    assert len(doc) == -(-n // 64)
    assert start[0] == 0 and end[-1] == n
    assert np.all(end - start <= 64) and np.all(end[:-1] - start[:-1] == 64)
    assert np.all(start[1:] == end[:-1])  # consecutive, non-overlapping


def test_chunk_bounds_empty_doc_list():
    doc, start, end = chunk_bounds(np.array([], dtype=np.int64), 64)
    assert len(doc) == len(start) == len(end) == 0


def test_text_lengths_excludes_trailing_eod(tmp_path):
    eod = 0
    docs = [np.array([5, 6, 0]), np.array([7, 0]), np.array([8, 9])]  # last has no EOD
    w = IndexedDatasetWriter(tmp_path / "d", np.uint16)
    w.add_documents(np.concatenate(docs), [3, 2, 2])
    w.finalize()
    ds = IndexedDataset(tmp_path / "d")
    assert text_lengths(ds, 0, 3, eod).tolist() == [2, 1, 2]
    assert text_lengths(ds, 1, 3, eod).tolist() == [1, 2]


def test_split_sizes_add_up():
    for n in (1, 7, 100, 10033):
        sizes = split_sizes(n, (0.98, 0.02, 0.0))
        assert sum(sizes) == n
    assert split_sizes(100, (0.98, 0.02, 0.0)) == (98, 2, 0)


def test_assign_splits_is_seeded():
    a = assign_splits(1000, (0.8, 0.1, 0.1), seed=3)
    b = assign_splits(1000, (0.8, 0.1, 0.1), seed=3)
    c = assign_splits(1000, (0.8, 0.1, 0.1), seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(a).tolist() == [800, 100, 100]
    assert not np.array_equal(np.flatnonzero(a == 1), np.arange(800, 900))  # shuffled, not a range


def test_sample_chunks_uniform_and_seeded():
    ids = sample_chunks(10_000, 500, seed=1)
    assert len(ids) == 500 and len(set(ids.tolist())) == 500 and np.all(np.diff(ids) > 0)
    assert ids.max() > 9000  # spread over the whole database, not the first 500 (Megatron's defect)
    assert np.array_equal(ids, sample_chunks(10_000, 500, seed=1))
    assert len(sample_chunks(300, None, seed=1)) == 300
    with pytest.raises(RetroRayError, match=r"index.ntrain=500 but the train database has only 300 chunks"):
        sample_chunks(300, 500, seed=1)
