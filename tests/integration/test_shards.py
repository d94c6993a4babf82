"""Sharded Faiss search on a real local Ray cluster."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time

import faiss
import numpy as np
import pytest
import ray

from retro_ray.errors import RetroRayError
from retro_ray.retrieval import index as ix
from retro_ray.retrieval.shards import IndexShard, ShardedIndex, start_shard

DIM = 32
N = 3000
BOUNDS = [0, 1000, 2200, 3000]  # three contiguous chunk-id ranges
K = 10


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((N, DIM)).astype(np.float32), rng.standard_normal((50, DIM)).astype(np.float32)


def start_and_fill(empty: faiss.Index, vectors: np.ndarray) -> list:
    blob = ray.put(ix.index_to_bytes(empty))
    shards = [start_shard(i, blob) for i in range(len(BOUNDS) - 1)]
    counts = ray.get([s.add.remote(vectors[lo:hi], lo) for s, lo, hi in zip(shards, BOUNDS[:-1], BOUNDS[1:])])
    assert counts == [hi - lo for lo, hi in itertools.pairwise(BOUNDS)]
    return shards


def merged_reference(empty: faiss.Index, vectors: np.ndarray) -> faiss.Index:
    blob = ix.index_to_bytes(empty)
    return ix.merge_shards([ix.add_range(blob, vectors[lo:hi], lo) for lo, hi in itertools.pairwise(BOUNDS)])


def test_index_shard_plain_class(data):
    vectors, _queries = data
    shard = IndexShard(0, ix.index_to_bytes(ix.train_index("Flat", vectors[:10])))
    assert shard.add(vectors[:100], 500) == 100
    assert shard.search(vectors[:3], 1)[1][:, 0].tolist() == [500, 501, 502]
    with pytest.raises(RetroRayError, match="exactly one"):
        IndexShard(1)


def test_flat_sharded_equals_merged(ray_address, data, tmp_path):
    vectors, queries = data
    empty = ix.train_index("Flat", vectors[:10])
    shards = start_and_fill(empty, vectors)
    sharded = ShardedIndex(shards)
    try:
        assert sharded.ntotal() == N and sharded.dim == DIM and sharded.metric == "l2"
        D, I = sharded.search(queries, K)
        Dm, Im = ix.search(merged_reference(empty, vectors), queries, K)
        np.testing.assert_array_equal(I, Im)
        np.testing.assert_allclose(D, Dm, rtol=1e-5, atol=1e-4)
        # every vector finds itself, whichever shard holds it
        _, own = sharded.search(vectors[::97], 1)
        np.testing.assert_array_equal(own[:, 0], np.arange(N)[::97])
        with pytest.raises(RetroRayError, match=f"queries must be \\[n, {DIM}\\]"):
            sharded.search(queries[:, :8], K)
    finally:
        sharded.shutdown()


def test_ivf_nprobe_per_call(ray_address, data):
    vectors, queries = data
    nlist = 16
    empty = ix.train_index(f"IVF{nlist},Flat", vectors)
    sharded = ShardedIndex(start_and_fill(empty, vectors))
    try:
        exact = faiss.IndexFlatL2(DIM)
        exact.add(vectors)
        _, I_exact = exact.search(queries, K)

        _, I_full = sharded.search(queries, K, nprobe=nlist)
        np.testing.assert_array_equal(I_full, I_exact)

        merged = merged_reference(empty, vectors)
        _, I_one = sharded.search(queries, K, nprobe=1)
        np.testing.assert_array_equal(I_one, ix.search(merged, queries, K, nprobe=1)[1])
        recall_one = np.mean([len(set(a) & set(b)) / K for a, b in zip(I_one, I_exact)])
        assert recall_one < 0.9

        # nprobe=None means the index's own setting (1), not the previous call's
        _, I_default = sharded.search(queries, K)
        np.testing.assert_array_equal(I_default, I_one)
    finally:
        sharded.shutdown()


@pytest.mark.parametrize("index_str, shared", [("IVF16_HNSW32,Flat", True), ("IVF16,PQ8x4", True),
                                               ("OPQ8_32,IVF16,Flat", False)])
def test_coarse_lists_assigned_once_equal_merged(ray_address, data, index_str, shared):
    """Plain IVF shards get their lists from the client's one quantizer search; OPQ falls back to full
    per-shard searches. Either way the results are the merged index's, at every nprobe / efSearch."""
    vectors, queries = data
    empty = ix.train_index(index_str, vectors)
    sharded = ShardedIndex(start_and_fill(empty, vectors))
    try:
        assert (sharded._coarse is not None) == shared
        for nprobe, ef in [(1, 16), (3, 8), (16, 64), (40, None), (None, None)]:
            merged = merged_reference(empty, vectors)  # fresh: None means the index's own setting
            D, I = sharded.search(queries, K, nprobe=nprobe, ef_search=ef)
            D_ref, I_ref = ix.search(merged, queries, K, nprobe=nprobe, ef_search=ef)
            np.testing.assert_array_equal(I, I_ref, err_msg=f"nprobe={nprobe} ef={ef}")
            np.testing.assert_allclose(D, D_ref, rtol=1e-5)
    finally:
        sharded.shutdown()


def _kill_once_busy(pid: int, cpu_s: float = 0.05, timeout_s: float = 60.0) -> None:
    """kill -9 ``pid`` once it has used ``cpu_s`` seconds of CPU from now: an idle shard uses none, so
    it is then in the middle of the search."""
    import psutil

    proc = psutil.Process(pid)
    start = sum(proc.cpu_times()[:2])
    deadline = time.monotonic() + timeout_s
    while sum(proc.cpu_times()[:2]) - start < cpu_s and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)


def test_killed_shard_restarts_from_saved_file(ray_address, data, tmp_path):
    vectors, queries = data
    empty = ix.train_index("Flat", vectors[:10])
    shards = start_and_fill(empty, vectors)
    sharded = ShardedIndex(shards)
    paths = sharded.save([tmp_path / f"shard{i}.faissindex" for i in range(len(shards))])
    assert all(os.path.isfile(p) for p in paths)
    try:
        want = sharded.search(queries, K)
        victim = sharded.shards[1]
        pid = ray.get(victim.info.remote())["pid"]
        os.kill(pid, signal.SIGKILL)  # kill -9 of the shard's worker process
        D, I = sharded.search(queries, K)
        np.testing.assert_array_equal(I, want[1])
        np.testing.assert_allclose(D, want[0], rtol=1e-5, atol=1e-4)
        assert sharded.shards[1] is not victim
        assert ray.get(sharded.shards[1].info.remote())["pid"] != pid

        # kill -9 while a long search is running on the shard
        many = np.repeat(queries, 10000, axis=0)  # 500k queries: each shard computes 16-32 GFLOP
        want_many = ix.search(merged_reference(empty, vectors), many, K)[1]
        victim = sharded.shards[0]
        pid = ray.get(victim.info.remote())["pid"]
        killer = threading.Thread(target=_kill_once_busy, args=(pid,))  # not a fixed delay: on a loaded
        killer.start()  # machine the search may start late, or end before a timer fires
        _, I_many = sharded.search(many, K)
        killer.join()
        np.testing.assert_array_equal(I_many, want_many)
        assert sharded.shards[0] is not victim
    finally:
        sharded.shutdown()


def test_from_paths_and_dead_shard_without_file(ray_address, data, tmp_path):
    vectors, queries = data
    empty = ix.train_index("Flat", vectors[:10])
    blob = ix.index_to_bytes(empty)
    paths = [
        ix.save_index(ix.add_range(blob, vectors[lo:hi], lo), tmp_path / f"s{i}.faissindex")
        for i, (lo, hi) in enumerate(itertools.pairwise(BOUNDS))
    ]
    sharded = ShardedIndex.from_paths(paths)
    try:
        _, I = sharded.search(queries, K)
        np.testing.assert_array_equal(I, ix.search(merged_reference(empty, vectors), queries, K)[1])
    finally:
        sharded.shutdown()

    # shards that were never saved: a dead one is an error naming it, never partial results
    unsaved = ShardedIndex(start_and_fill(empty, vectors))
    try:
        ray.kill(unsaved.shards[2], no_restart=True)
        with pytest.raises(RetroRayError, match=r"index shard 2 died during search .*no saved shard file"):
            unsaved.search(queries, K)
    finally:
        unsaved.shutdown()

    with pytest.raises(RetroRayError, match="missing"):
        ShardedIndex.from_paths([tmp_path / "nope.faissindex"])
    bad = tmp_path / "bad.faissindex"
    bad.write_bytes(b"not an index")
    with pytest.raises(RetroRayError, match=r"index shard 1 could not start: could not read Faiss index .*corrupt"):
        ShardedIndex.from_paths([paths[0], bad])


def test_stale_saved_file_is_not_used(ray_address, data, tmp_path):
    vectors, queries = data
    empty = ix.train_index("Flat", vectors[:10])
    shard = start_shard(0, ix.index_to_bytes(empty))
    ray.get(shard.add.remote(vectors[:100], 0))
    path = ray.get(shard.save.remote(str(tmp_path / "s0.faissindex")))
    ray.get(shard.add.remote(vectors[100:200], 100))  # added after the save
    sharded = ShardedIndex([shard])
    assert sharded.paths == [path] and sharded.ntotal() == 200
    try:
        ray.kill(shard, no_restart=True)
        with pytest.raises(RetroRayError, match=r"holds 100 vectors, not the 200"):
            sharded.search(queries, K)
    finally:
        sharded.shutdown()
