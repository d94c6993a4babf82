"""A real multi-node Ray cluster on this machine: a head and a worker node (ray.cluster_utils.Cluster,
each its own raylet, object store and 1 CPU), all on loopback. Every data stage runs through it from
the CLI with RAY_ADDRESS, and each stage's report says which nodes ran its blocks: both. The outputs
equal, byte for byte, those of the same pipeline on a single-node cluster. Training places its two
Ray Train workers on the two nodes."""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import torch

from retro_ray.cli import STAGE_HELP
from retro_ray.project import Project
from tests.support import SMALL_PIPELINE, write_jsonl

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


# --- A worker node dies mid-stage -----------------------------------------------------------------
# Each test starts its own two-node cluster, runs one stage from the CLI through it, and kills the
# worker node (Cluster.remove_node without grace: SIGKILL to its raylet, object store and workers)
# once the stage has written part of its outputs. The stage's outputs must then equal those of an
# uninterrupted single-node run, whether the stage finished by itself or after the rerun its error
# asked for.

STAGES = ("prep", "db", "embed", "index", "query")
STAGE_OUTPUTS = {"embed": ("embeddings/*/*.npy",),
                 "index": ("index/*/*/*.faissindex", "index/*/*/shards/*.faissindex"),
                 "query": ("query/*/*.npy",)}


@pytest.fixture(scope="module")
def snapshots(wiki_docs, tmp_path_factory):
    """The small pipeline on a single-node cluster, stage by stage; a copy of the project after each."""
    root = tmp_path_factory.mktemp("reference")
    corpus = write_jsonl(root / "corpus.jsonl", [{"title": t, "text": x} for t, x in wiki_docs[:N_DOCS]])
    work = root / "work"
    out = {}
    for stage in STAGES:
        settings = [f"corpus.path={corpus}", *SMALL_PIPELINE, *BLOCKS] if stage == "prep" else BLOCKS
        r = _stage(stage, work, None, *settings)
        assert r.returncode == 0, r.stderr[-3000:]
        out[stage] = root / f"after-{stage}"
        shutil.copytree(work, out[stage])
    return out


def _stage(stage: str, project_dir: Path, address: str | None, *settings: str, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if address:
        env["RAY_ADDRESS"] = address
    cmd = [sys.executable, "-m", "retro_ray.cli", stage, "--project-dir", str(project_dir), "--no-progress",
           *[s for s in settings if s.split("=")[0].split(".")[0] in (stage, "corpus") or stage == "prep"]]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture
def two_nodes():
    """A head and one worker node of 1 CPU each, for one test (a node of it gets killed)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c, worker
    c.shutdown()


def _wait_for(what, check, timeout=300.0, proc=None):
    t0 = time.monotonic()
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the stage ended before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.parametrize("stage,started,replaced", [
    ("embed", "embeddings/*/*.npy", False),
    ("index", "index/*/*/empty.faissindex", False),  # index-train is done; index-add is starting its shards
    # What is left (1 CPU) cannot hold a query actor (1 CPU) beside the restarted index shard (0.25 CPU):
    # the stage waits for room, which an autoscaler's replacement node brings.
    ("query", "query/*/*.npy", True),
], ids=["embed", "index-add", "query"])
def test_a_worker_node_killed_mid_stage(stage, started, replaced, two_nodes, snapshots, tmp_path):
    cluster, worker = two_nodes
    before = STAGES[STAGES.index(stage) - 1]
    project_dir = tmp_path / "p"
    shutil.copytree(snapshots[before], project_dir)
    proc = _stage(stage, project_dir, cluster.address, *BLOCKS, wait=False)
    t_kill = _wait_for(f"{stage} to start writing", lambda: any(project_dir.glob(started)), proc=proc)
    cluster.remove_node(worker, allow_graceful=False)
    assert proc.poll() is None, "the stage had ended before its node was killed"
    if replaced:
        time.sleep(5)  # the stage meets the loss first
        cluster.add_node(num_cpus=1)
    stdout, stderr = proc.communicate(timeout=900)
    outcome = {"stage": stage, "killed_after_s": round(t_kill, 1), "replaced": replaced, "exit": proc.returncode}
    if proc.returncode != 0:
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("retro-ray: error: ") and "rerun" in last, stderr[-3000:]
        outcome["error"] = last
        rerun = re.search(r"rerun `retro-ray ([\w-]+)", last)
        assert rerun and rerun.group(1) in STAGE_HELP, last
        r = _stage(rerun.group(1), project_dir, cluster.address, *BLOCKS)  # on what is left: the head alone
        assert r.returncode == 0, r.stderr[-3000:]
    print("node-kill:", json.dumps(outcome))
    want = snapshots[stage]
    globs = STAGE_OUTPUTS[stage]
    a = {str(p.relative_to(project_dir)): p for g in globs for p in project_dir.glob(g)}
    b = {str(p.relative_to(want)): p for g in globs for p in want.glob(g)}
    assert a.keys() == b.keys() and a, sorted(set(a) ^ set(b))
    assert not [k for k in a if not filecmp.cmp(a[k], b[k], shallow=False)]


_TRAIN = """
import json, sys
import ray
from retro_ray.train import trainer
from retro_ray.train.config import load_train_config
from retro_ray.train.synthetic import SyntheticDatasetFactory

ray.init(address=sys.argv[1], log_to_driver=False)
factory = SyntheticDatasetFactory(n_train=512, n_valid=32)
cfg = load_train_config("tiny", sys.argv[3:])
report = trainer.run(cfg, factory, factory.model_data(), sys.argv[2])
print(json.dumps({"final_step": report.final_step, "restarts": report.restarts}))
"""
TRAIN_SETTINGS = ["trainer.num_workers=2", "trainer.use_gpu=false", "trainer.max_steps=16",
                  "trainer.checkpoint_interval=8", "trainer.val_check_interval=16", "trainer.log_every_n_steps=2",
                  "trainer.zero_stage=2", "trainer.max_failures=1"]


@pytest.mark.slow
def test_a_worker_node_killed_mid_training(two_nodes, tmp_path):
    """Rank 1's node dies after checkpoint 8: Ray Train restarts both workers once a node replaces it (as an
    autoscaler's would: what is left has 1 CPU for 2 workers), they resume from checkpoint 8 and end at
    step 16, and the exported model gives the logits of an uninterrupted run, exactly."""
    from retro_ray.train.export import export, load_exported
    from retro_ray.train.loop import collate
    from retro_ray.train.synthetic import SyntheticDatasetFactory

    cluster, worker = two_nodes
    exp = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _TRAIN, cluster.address, str(exp), *TRAIN_SETTINGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t_kill = _wait_for("checkpoint 8", lambda: any(exp.rglob("global_step8")), proc=proc)
    time.sleep(1.0)  # into step 9 or later: the work after the checkpoint is lost with the node
    cluster.remove_node(worker, allow_graceful=False)
    assert proc.poll() is None, "training had ended before its node was killed"
    time.sleep(5)
    cluster.add_node(num_cpus=1)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    got = json.loads(stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    events = [(r["event"], r["step"]) for r in records if r["kind"] == "event"]
    print("node-kill:", json.dumps({"stage": "train", "killed_after_s": round(t_kill, 1), **got, "events": events}))
    assert got == {"final_step": 16, "restarts": 1} and events == [("start", 0), ("resume", 8)]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(2, 17, 2))

    clean = tmp_path / "clean"  # the same run, uninterrupted, on the same cluster
    r = subprocess.run([sys.executable, "-c", _TRAIN, cluster.address, str(clean), *TRAIN_SETTINGS],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ds = SyntheticDatasetFactory(n_train=512, n_valid=32)("valid")
    batch = collate([ds[0], ds[1]])
    logits = []
    for e in (exp, clean):
        model = load_exported(export(e, tmp_path / f"{e.name}.pt"))
        with torch.no_grad():
            logits.append(model(batch["tokens"], batch["neighbor_tokens"], batch["neighbor_mask"]).logits)
    assert torch.equal(*logits)
