"""kill -9 of an IndexShard actor during ``index-add``, on a real local Ray cluster with real Faiss and files.

The stage must fail loudly (a ``RetroRayError`` that says what happened and to rerun), mark nothing
done, leave no merged index and no file of the killed shard; a shard file that exists is always
complete (saves are temporary file + rename); and a rerun finishes with the index an uninterrupted
run builds.

The project is made by hand (random "embeddings" in the layout the embed stage writes, a sampled
chunk list) so that the test takes seconds; index-train and index-add then run for real.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.project import Project, Report
from retro_ray.retrieval import index as ix
from retro_ray.retrieval.shards import shard_ranges
from retro_ray.stages import index_add, index_train
from retro_ray.stages.index_add import KILL_SHARD_ENV

N, DIM, PER = 2400, 48, 200  # train chunks, embedding dimension, chunks per embedding block
SHARDS = 2  # shard 1 holds chunks 1200..2399: six blocks
INDEX_STR = "IVF16,Flat"
RUN = C.IndexRunConfig(num_shards=SHARDS, cpus_per_shard=0.5, use_gpu="false")
K, NPROBE = 10, 4


def assert_added_everything(rep) -> None:
    """An index-add report: every vector, every shard; the shards this run filled on this one-node cluster."""
    assert rep.counts == {"vectors": N, "shards": SHARDS, "shards_by_node": rep.counts["shards_by_node"]}
    assert len(rep.counts["shards_by_node"]) == 1 and 1 <= sum(rep.counts["shards_by_node"].values()) <= SHARDS


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def trained(ray_address, vectors, tmp_path_factory) -> Path:
    """A project that has finished embed and index-train (a real index-train run); copy it before use."""
    p = Project(tmp_path_factory.mktemp("index-crash") / "proj")
    p.write_config(C.ProjectConfig(), derived={"chunks_per_split": {"train": N, "valid": 0}, "embed_dim": DIM})
    for b in range(-(-N // PER)):
        path = p.embedding_block("train", b)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors[b * PER:(b + 1) * PER])
    p.mark_done(Report(stage="embed", counts={"chunks_per_block": PER, "train_chunks": N, "valid_chunks": 0}))
    sampled = p.merged_db_path("sampled")
    sampled.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(sampled, "w") as f:
        f["chunk_ids"] = np.sort(np.random.default_rng(1).choice(N, 1200, replace=False)).astype(np.int64)
    rep = index_train.run(p, RUN, {"index": {"index_str": INDEX_STR}}, progress=False)
    assert p.is_done("index-train") and rep.counts["index_str"] == INDEX_STR
    assert rep.counts["kmeans"] == "torch-cpu"  # no GPU in this Ray cluster; on CPUs torch's k-means is the default
    assert rep.counts["cpu_threads"] == 2  # the whole (idle) 2-CPU cluster, not a task's default 1
    return p.root


def copy_of(trained: Path, dest: Path) -> Project:
    shutil.copytree(trained, dest / "proj")
    return Project(dest / "proj")


@pytest.fixture(scope="module")
def clean(trained, tmp_path_factory) -> Path:
    """The merged index file of an uninterrupted index-add of the same project."""
    p = copy_of(trained, tmp_path_factory.mktemp("clean"))
    rep = index_add.run(p, RUN, progress=False)
    assert_added_everything(rep)
    return p.added_index_path


def assert_same_index(p: Project, clean_path: Path, vectors: np.ndarray) -> None:
    """p's added.faissindex equals the clean build's: same bytes, vectors, ids and search results."""
    assert p.is_done("index-add")
    got, clean = ix.load_index(p.added_index_path), ix.load_index(clean_path)
    assert got.ntotal == clean.ntotal == N
    np.testing.assert_array_equal(ix.index_to_bytes(got), ix.index_to_bytes(clean))
    # every chunk's own embedding finds itself (distance 0, in its nearest list)
    D, I = ix.search(got, vectors, 1, nprobe=1)
    np.testing.assert_array_equal(I[:, 0], np.arange(N))
    np.testing.assert_allclose(D[:, 0], 0, atol=1e-4)
    queries = np.random.default_rng(2).standard_normal((64, DIM)).astype(np.float32)
    D, I = ix.search(got, queries, K, nprobe=NPROBE)
    Dc, Ic = ix.search(clean, queries, K, nprobe=NPROBE)
    np.testing.assert_array_equal(I, Ic)
    np.testing.assert_array_equal(D, Dc)


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*.tmp*")) if directory.is_dir() else []


def test_kill_9_of_a_shard_mid_add_fails_loudly_and_rerun_completes(trained, clean, vectors, tmp_path, monkeypatch):
    p = copy_of(trained, tmp_path)
    assert "index_num_shards" not in p.derived()  # index-add has never run here
    # Shard 1's actor SIGKILLs its own worker process right after adding its first of six blocks.
    monkeypatch.setattr(index_add, "ADD_BATCH", PER)
    monkeypatch.setenv(KILL_SHARD_ENV, "1:1")
    with pytest.raises(RetroRayError) as err:
        index_add.run(p, RUN, progress=False)
    msg = str(err.value)
    assert "an IndexShard actor died while adding shard 1 (" in msg, msg
    assert "nothing was marked done" in msg and "rerun `retro-ray index-add`" in msg, msg
    monkeypatch.delenv(KILL_SHARD_ENV)

    # nothing half-done is left to be mistaken for a result
    assert not p.is_done("index-add") and not p.marker_path("index-add").exists()
    assert p.report("index-add") is None
    assert not p.added_index_path.exists()
    files = p.shard_paths()
    assert not files[1].exists()  # the killed shard
    assert not any(f.exists() for f in files)  # saves start only once every block of every shard is added
    assert p.derived()["index_num_shards"] == SHARDS  # a rerun keeps the sharding

    # the rerun (no crash point) redoes the missing shards and finishes with the clean build's index
    rep = index_add.run(p, RUN, progress=False)
    assert not rep.skipped
    assert_added_everything(rep)
    assert all(f.is_file() for f in files)
    for f, (lo, hi) in zip(files, shard_ranges(N, SHARDS)):
        assert ix.load_index(f).ntotal == hi - lo
    assert_same_index(p, clean, vectors)
    assert temporaries(p.index_shards_dir) == [] and temporaries(p.index_dir) == []
    assert index_add.run(p, RUN, progress=False).skipped


# Saves shard 0 with save_index, then shard 1 with os.replace made a SIGKILL of this process: the state
# of a kill -9 after shard 0's save and while shard 1's file was written (the temporary file is complete
# and fsynced, only the rename is missing: the worst moment for a non-atomic save).
_KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    from retro_ray.stages.embed import load_embeddings
    from retro_ray.retrieval.shards import shard_ranges
    from retro_ray.project import Project
    from retro_ray.retrieval import index as ix

    p = Project(sys.argv[1])
    files = p.shard_paths()
    ranges = shard_ranges(int(p.derived()["chunks_per_split"]["train"]), len(files))
    empty = ix.index_to_bytes(ix.load_index(p.empty_index_path))
    shard = lambda i: ix.add_range(empty, load_embeddings(p, "train", start=ranges[i][0], end=ranges[i][1]), ranges[i][0])
    ix.save_index(shard(0), files[0])
    ix.os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    ix.save_index(shard(1), files[1])
    print("not killed")
""")


def test_half_written_shard_is_never_taken_as_complete(trained, clean, vectors, tmp_path):
    p = copy_of(trained, tmp_path)
    p.update_derived(index_num_shards=SHARDS)  # as index-add's first (killed) run records it
    files = p.shard_paths()
    r = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(p.root)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == -9, (r.returncode, r.stdout, r.stderr[-2000:])
    assert files[0].is_file() and not files[1].exists()  # the killed save never produced shard 1's file
    left = temporaries(p.index_shards_dir)
    assert len(left) == 1 and left[0].startswith(f".{files[1].name}.tmp-"), left
    # and a kill in the middle of writing leaves a truncated temporary file: also never taken
    tmp = p.index_shards_dir / left[0]
    (p.index_shards_dir / f".{files[1].name}.tmp-1-deadbeef").write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
    before = files[0].stat()

    rep = index_add.run(p, RUN, progress=False)
    assert_added_everything(rep)
    after = files[0].stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # shard 0 was not redone
    assert temporaries(p.index_shards_dir) == []  # the killed run's temporaries are gone
    assert_same_index(p, clean, vectors)


def test_an_unknown_kmeans_choice_is_refused_before_any_work(tmp_path):
    p = Project(tmp_path / "proj")
    p.write_config(C.ProjectConfig(), derived={"chunks_per_split": {"train": N, "valid": 0}, "embed_dim": DIM})
    with pytest.raises(RetroRayError, match=r"index.kmeans='sklearn' is not one of auto, faiss, torch"):
        index_train.run(p, C.IndexRunConfig(num_shards=SHARDS, use_gpu="false", kmeans="sklearn"), progress=False)
    assert not p.is_done("index-train") and not (p.root / "index").exists()
