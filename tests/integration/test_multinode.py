"""A real multi-node Ray cluster on this machine: a head and a worker node (ray.cluster_utils.Cluster,
each its own raylet, object store and 1 CPU), all on loopback. Every data stage runs through it from
the CLI with RAY_ADDRESS, and each stage's report says which nodes ran its blocks: both. The outputs
equal, byte for byte, those of the same pipeline on a single-node cluster. Training places its two
Ray Train workers on the two nodes."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray

from retro_ray.project import Project
from tests.conftest import write_jsonl
from tests.support import SMALL_PIPELINE

N_DOCS = 120
# The files every stage writes (not reports, logs or temporaries, which hold times, node ids and paths).
OUTPUT_GLOBS = ("data/*.bin", "data/*.idx", "data/*_doc_ids.npy", "tokenizer/*.json", "db/merged/*.hdf5",
                "embeddings/*/*.npy", "index/*/*/*.faissindex", "index/*/*/shards/*.faissindex", "query/*/*.npy")
BLOCKS = ["prep.docs_per_block=20", "db.docs_per_block=20", "embed.chunks_per_block=64", "query.samples_per_block=16"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _pipeline(project_dir: Path, corpus: Path, address: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if address:
        env["RAY_ADDRESS"] = address
    else:  # a Ray temp directory of its own: ray.init() would otherwise find the Cluster's address file there
        env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rrs-", dir="/tmp")
    cmd = [sys.executable, "-m", "retro_ray.cli", "pipeline", "--project-dir", str(project_dir), "--no-progress",
           f"corpus.path={corpus}", *SMALL_PIPELINE, *BLOCKS]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    finally:
        if not address:
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def _outputs(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for g in OUTPUT_GLOBS for p in root.glob(g)}


def test_every_data_stage_runs_on_both_nodes_and_writes_what_one_node_writes(cluster, wiki_docs, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"title": t, "text": x} for t, x in wiki_docs[:N_DOCS]])
    r = _pipeline(tmp_path / "multi", corpus, cluster.address)
    assert r.returncode == 0, r.stderr[-3000:]
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    multi = Project(tmp_path / "multi")
    for stage, key in [("prep", "blocks_by_node"), ("db", "blocks_by_node"), ("embed", "blocks_by_node"),
                       ("index-add", "shards_by_node"), ("query", "blocks_by_node"), ("query", "shards_by_node")]:
        ran = multi.report(stage).counts[key]
        assert set(ran) == nodes, f"{stage}: {key} = {ran}, nodes {sorted(nodes)}"

    r = _pipeline(tmp_path / "single", corpus, None)  # its own local cluster, one node
    assert r.returncode == 0, r.stderr[-3000:]
    single = Project(tmp_path / "single")
    assert len(single.report("db").counts["blocks_by_node"]) == 1
    a, b = _outputs(multi.root), _outputs(single.root)
    assert a.keys() == b.keys() and len(a) > 20, sorted(set(a) ^ set(b))
    differ = [k for k in a if not filecmp.cmp(a[k], b[k], shallow=False)]
    assert not differ, differ


def test_training_workers_run_on_different_nodes(cluster, tmp_path):
    from retro_ray.train import trainer
    from retro_ray.train.config import load_train_config
    from retro_ray.train.synthetic import SyntheticDatasetFactory

    factory = SyntheticDatasetFactory(n_train=128, n_valid=16)
    cfg = load_train_config("tiny", ["trainer.num_workers=2", "trainer.use_gpu=false", "trainer.max_steps=4",
                                     "trainer.checkpoint_interval=4", "trainer.val_check_interval=4",
                                     "trainer.log_every_n_steps=2", "trainer.zero_stage=2"])
    report = trainer.run(cfg, factory, factory.model_data(), tmp_path / "exp")
    assert report.final_step == 4
    records = [json.loads(line) for line in (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["kind"] == "event" and r["event"] == "start")
    assert len(start["worker_nodes"]) == 2 and set(start["worker_nodes"]) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
