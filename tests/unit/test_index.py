"""Faiss index helpers (no Ray)."""

from __future__ import annotations

import itertools
import math
import re

import faiss
import numpy as np
import pytest

from retro_ray.errors import RetroRayError
from retro_ray.retrieval import index as ix

FLT_MAX = float(np.finfo(np.float32).max)
DIM = 32


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def rand(n: int, d: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def build_shards(empty: faiss.Index, data: np.ndarray, bounds: list[int]) -> list[faiss.Index]:
    blob = ix.index_to_bytes(empty)
    return [ix.add_range(blob, data[lo:hi], lo) for lo, hi in itertools.pairwise(bounds)]


# --- choice of index string ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1_000, 500_000, 20_000_000])
def test_choose_index_string_sizes(n):
    s = ix.choose_index_string(n, 384)
    if n == 1_000:
        assert s == "Flat"
        return
    nlist = int(re.search(r"IVF(\d+)_HNSW32", s).group(1))
    assert nlist & (nlist - 1) == 0, "nlist is a power of two"
    assert 4 * math.sqrt(n) <= nlist <= 16 * math.sqrt(n)
    assert n / nlist >= ix.FAISS_MIN_POINTS_PER_CENTROID
    if n == 500_000:
        assert re.fullmatch(r"IVF\d+_HNSW32,Flat", s)
    else:
        m = re.fullmatch(r"OPQ(\d+)_(\d+),IVF\d+_HNSW32,PQ(\d+)", s)
        assert m and m.group(1) == m.group(3) and int(m.group(2)) % int(m.group(1)) == 0
        assert int(m.group(2)) <= 384


def test_choose_index_string_documented_examples():
    assert [ix.choose_index_string(n, 384) for n in (1_000, 500_000, 1_000_000, 20_000_000)] == [
        "Flat", "IVF4096_HNSW32,Flat", "IVF8192_HNSW32,Flat", "OPQ64_256,IVF32768_HNSW32,PQ64"]
    assert ix.choose_index_string(100_000, 384) == "IVF2048_HNSW32,Flat"  # the first size past Flat
    assert ix.choose_index_string(60_000_000 // 39 * 39, 8) == "IVF65536_HNSW32,Flat"  # small dim: IVF-Flat longer


def test_choose_index_string_is_valid_for_faiss():
    for n, d in [(150_000, 64), (20_000_000, 384), (20_000_000, 16)]:
        s = ix.choose_index_string(n, d)
        faiss.index_factory(d, s)  # parses


def test_index_type_and_dir_name():
    assert ix.index_type("Flat") == "faiss-flat"
    assert ix.index_type("IVF4096_HNSW32,Flat") == "faiss-ivf"
    assert ix.index_type("OPQ64_256,IVF32768_HNSW32,PQ64") == "faiss-opq-ivf-pq"
    assert ix.index_type("IVF1024,PQ32") == "faiss-ivf-pq"
    assert ix.index_type("HNSW32") == "faiss-hnsw"
    name = ix.index_dir_name("OPQ64_256,IVF32768_HNSW32,PQ64")
    assert name == "OPQ64_256__IVF32768_HNSW32__PQ64"
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", ix.index_dir_name("IVF 16,SQ8/x"))


# --- training errors -------------------------------------------------------------------------------
def test_rejected_index_string_passes_faiss_reason():
    with pytest.raises(RetroRayError) as e:
        ix.train_index("Bogus12,Flat", rand(100))
    msg = str(e.value)
    assert "could not parse index string" in msg and "'Bogus12,Flat'" in msg
    assert "Error in" not in msg and ".cpp" not in msg and "\n" not in msg
    with pytest.raises(RetroRayError, match="multiple of the number of subquantizers"):
        ix.train_index("PQ7", rand(300))


def test_too_few_training_points_names_numbers():
    with pytest.raises(RetroRayError) as e:
        ix.train_index("IVF64,Flat", rand(10))
    msg = str(e.value)
    assert "at least 64" in msg and "got 10" in msg and f"recommended {64 * 39}" in msg and "lower nlist" in msg
    with pytest.raises(RetroRayError, match=r"PQ8 with 256 centroids.*at least 256.*got 200"):
        ix.train_index("IVF4,PQ8", rand(200))


def test_dimension_mismatch():
    with pytest.raises(RetroRayError, match="dimension 32 but the index expects 384"):
        ix.train_index("Flat", rand(10), dim=384)
    empty = ix.train_index("Flat", rand(10))
    with pytest.raises(RetroRayError, match="dimension 16 but the index has dimension 32"):
        ix.add_range(empty, rand(5, 16), 0)
    with pytest.raises(RetroRayError, match="metric"):
        ix.train_index("Flat", rand(10), metric="cosine-ish")


# --- adding and searching --------------------------------------------------------------------------
def test_flat_every_id_is_found_at_rank_one():
    data = rand(500)
    empty = ix.train_index("Flat", data[:10])
    assert empty.ntotal == 0 and isinstance(empty, faiss.IndexIDMap2)
    index = ix.add_range(ix.index_to_bytes(empty), data, start_id=10_000)
    D, I = ix.search(index, data, 1)
    np.testing.assert_array_equal(I[:, 0], np.arange(10_000, 10_500))
    np.testing.assert_allclose(D[:, 0], 0.0, atol=1e-3)


def test_bare_flat_gets_wrapped_for_ids():
    index = ix.add_range(faiss.IndexFlatL2(DIM), rand(5), 7)
    assert ix.search(index, rand(5), 1)[1][:, 0].tolist() == [7, 8, 9, 10, 11]


def test_ivf_adds_ids_directly():
    data = rand(2000)
    empty = ix.train_index("IVF16,Flat", data)
    assert faiss.try_extract_index_ivf(empty) is not None and not isinstance(empty, faiss.IndexIDMap2)
    index = ix.add_range(empty, data, 5)
    _, I = ix.search(index, data[:50], 1, nprobe=16)
    np.testing.assert_array_equal(I[:, 0], np.arange(5, 55))


def test_padding_when_fewer_than_k():
    index = ix.add_range(ix.train_index("Flat", rand(3)), rand(3), 0)
    D, I = ix.search(index, rand(2, seed=1), 5)
    assert (I[:, 3:] == -1).all() and (D[:, 3:] == FLT_MAX).all()


@pytest.mark.parametrize("index_str", ["Flat", "IVF16,Flat"])
def test_merged_shards_equal_single_index(index_str):
    data, queries, k = rand(3000), rand(40, seed=7), 10
    empty = ix.train_index(index_str, data)
    single = ix.add_range(ix.index_to_bytes(empty), data, 0)
    shards = build_shards(empty, data, [0, 900, 2100, 3000])
    sizes = [s.ntotal for s in shards]
    merged = ix.merge_shards(shards)
    assert merged.ntotal == 3000 and [s.ntotal for s in shards] == sizes, "inputs untouched"
    nprobe = 16  # = nlist: exact for IVF
    D1, I1 = ix.search(single, queries, k, nprobe=nprobe)
    D2, I2 = ix.search(merged, queries, k, nprobe=nprobe)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_allclose(D1, D2, rtol=1e-5, atol=1e-4)
    # per-shard search + merge_topk gives the same answer
    parts = [ix.search(s, queries, k, nprobe=nprobe) for s in shards]
    _D3, I3 = ix.merge_topk([p[0] for p in parts], [p[1] for p in parts], k, "l2")
    np.testing.assert_array_equal(I1, I3)
    # and it is the exact answer
    exact = faiss.IndexFlatL2(DIM)
    exact.add(data)
    np.testing.assert_array_equal(exact.search(queries, k)[1], I1)


def test_merged_opq_ivf_hnsw_pq_equals_single(tmp_path):
    d = 16
    data, queries = rand(3000, d), rand(30, d, seed=3)
    blob = ix.index_to_bytes(ix.train_index("OPQ4_16,IVF8_HNSW32,PQ4x4", data[:300]))
    single = ix.add_range(blob, data, 0)
    paths = [
        ix.save_index(ix.add_range(blob, data[lo:hi], lo), tmp_path / f"shard{i}.faissindex")
        for i, (lo, hi) in enumerate([(0, 1000), (1000, 3000)])
    ]
    merged = ix.merge_shards(paths)
    assert merged.ntotal == single.ntotal == 3000
    a = ix.search(single, queries, 5, nprobe=8, ef_search=64)
    b = ix.search(merged, queries, 5, nprobe=8, ef_search=64)
    np.testing.assert_array_equal(a[1], b[1])


def test_set_search_params_through_wrappers():
    data = rand(2000)
    ivf_hnsw = ix.train_index("OPQ4_32,IVF16_HNSW32,Flat", data[:300])
    ix.set_search_params(ivf_hnsw, nprobe=7, ef_search=33)
    assert ix.get_search_params(ivf_hnsw) == (7, 33)
    hnsw = ix.train_index("HNSW16", data[:10])
    assert isinstance(hnsw, faiss.IndexIDMap2)
    ix.set_search_params(hnsw, nprobe=3, ef_search=99)  # nprobe ignored: no IVF
    assert ix.get_search_params(hnsw) == (None, 99)
    with pytest.raises(RetroRayError, match="nprobe must be >= 1"):
        ix.set_search_params(ivf_hnsw, nprobe=0)


# --- merge_topk ------------------------------------------------------------------------------------
def test_merge_topk_l2_with_padding_and_ties():
    D1 = np.array([[0.1, 0.5, FLT_MAX], [0.2, FLT_MAX, FLT_MAX]], np.float32)
    I1 = np.array([[10, 11, -1], [12, -1, -1]])
    D2 = np.array([[0.3, 0.5, 0.9], [FLT_MAX, FLT_MAX, FLT_MAX]], np.float32)
    I2 = np.array([[20, 5, 21], [-1, -1, -1]])
    D, I = ix.merge_topk([D1, D2], [I1, I2], 4, "l2")
    assert I.tolist() == [[10, 20, 5, 11], [12, -1, -1, -1]]  # tie at 0.5: smaller id first
    np.testing.assert_allclose(D[0], [0.1, 0.3, 0.5, 0.5])
    assert D[1, 0] == pytest.approx(0.2) and (D[1, 1:] == FLT_MAX).all()
    # k larger than all results: padded
    D, I = ix.merge_topk([D1[:1, :1]], [I1[:1, :1]], 3, "l2")
    assert I.tolist() == [[10, -1, -1]] and D[0, 1] == FLT_MAX


def test_merge_topk_inner_product():
    D1 = np.array([[0.9, 0.1]], np.float32)
    I1 = np.array([[1, 2]])
    D2 = np.array([[0.5, -FLT_MAX]], np.float32)
    I2 = np.array([[3, -1]])
    D, I = ix.merge_topk([D1, D2], [I1, I2], 4, "ip")
    assert I.tolist() == [[1, 3, 2, -1]]
    assert D[0, 3] == -FLT_MAX


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_merge_topk_matches_a_full_sort_by_distance_then_id(metric):
    """Many rows, coarse distances (so ties are everywhere, also across the k-th place), missing results."""
    rng = np.random.default_rng(3)
    pad = FLT_MAX if metric == "l2" else -FLT_MAX
    Ds, Is = [], []
    for _ in range(3):
        D = rng.integers(0, 12, (64, 9)).astype(np.float32) / 4
        D = np.sort(D, axis=1) if metric == "l2" else -np.sort(-D, axis=1)
        ids = rng.choice(10_000, (64, 9)).astype(np.int64)
        missing = rng.random((64, 9)) < 0.15
        Ds.append(np.where(missing, pad, D).astype(np.float32))
        Is.append(np.where(missing, -1, ids))
    for k in (1, 5, 12, 30):
        D, I = ix.merge_topk(Ds, Is, k, metric)
        allD, allI = np.concatenate(Ds, 1), np.concatenate(Is, 1)
        for r in range(64):
            valid = allI[r] >= 0
            want = sorted(zip(allD[r][valid] * (1 if metric == "l2" else -1), allI[r][valid]))[:k]
            got_ids = I[r][I[r] >= 0]
            assert got_ids.tolist() == [i for _, i in want], (k, r)
            assert (I[r][len(want):] == -1).all() and (D[r][len(want):] == pad).all()


# --- save / load -----------------------------------------------------------------------------------
def test_atomic_save_and_load(tmp_path):
    data = rand(100)
    index = ix.add_range(ix.train_index("Flat", data), data, 0)
    path = tmp_path / "sub" / "added.faissindex"
    ix.save_index(index, path)
    ix.save_index(index, path)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["added.faissindex"]
    loaded = ix.load_index(path)
    assert loaded.ntotal == 100
    np.testing.assert_array_equal(ix.search(loaded, data[:5], 1)[1][:, 0], np.arange(5))


def test_load_missing_or_corrupt(tmp_path):
    missing = tmp_path / "nope.faissindex"
    with pytest.raises(RetroRayError, match="does not exist") as e:
        ix.load_index(missing)
    assert str(missing) in str(e.value)
    bad = tmp_path / "bad.faissindex"
    bad.write_bytes(b"definitely not faiss")
    with pytest.raises(RetroRayError, match="corrupt or truncated"):
        ix.load_index(bad)


def test_the_training_dataset_does_not_load_faiss():
    """retro_ray.retrieval loads Faiss on first use of an index name; a train worker needs only chunks."""
    import subprocess
    import sys

    code = ("import sys, retro_ray.train.dataset, retro_ray.retrieval.chunks; assert 'faiss' not in sys.modules; "
            "from retro_ray.retrieval import train_index; assert 'faiss' in sys.modules; "
            "import retro_ray.retrieval as r; r.no_such_name")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "has no attribute 'no_such_name'" in r.stderr, r.stderr[-2000:]
