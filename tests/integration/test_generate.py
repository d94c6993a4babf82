"""Generation with retrieval from a real project (real Faiss index, real chunk database), and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from retro_ray.serve.generate import GenerationRequest, Generator, InferenceConfig
from tests.support import copy_project, write_random_export

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def project(ray_address, small_project, tmp_path_factory):
    return copy_project(small_project, tmp_path_factory.mktemp("generate"))


@pytest.fixture(scope="module")
def model_pt(project):
    return write_random_export(project.root.parent / "model.pt", project)


def test_retrieval_at_every_chunk_boundary_and_cache_equals_recompute(project, model_pt):
    gen = Generator.load(model_pt, project.root)
    m = gen.m
    prompt = "The French Revolution was a period of political and societal change in France"
    reqs = [GenerationRequest(prompt, inference=InferenceConfig(tokens_to_generate=2 * m + 5, greedy=True)),
            GenerationRequest("Music", inference=InferenceConfig(tokens_to_generate=m, greedy=True))]
    cached = gen.generate(reqs)
    assert [c.tokens for c in cached] == [f.tokens for f in gen.generate(reqs, recompute=True)]
    first = cached[0]
    n0 = first.prompt_tokens
    # the prompt's end, then every completed chunk inside the generation
    want = [n0 - 1] + [p for p in range(m - 1, n0 + len(first.tokens) - 1, m) if p > n0 - 1]
    assert [e.position for e in first.retrievals] == want
    db = gen.retriever.db
    for ev in first.retrievals:
        assert len(ev.neighbors) == 2
        for n in ev.neighbors:
            assert n.title == db.titles([n.chunk_id])[0] and n.text == db.texts([n.chunk_id])[0]
            assert n.doc_id == db.global_doc_ids([n.chunk_id])[0]
    # a query that is a database chunk's own text finds that chunk first
    chunk_text = db.texts([5])[0]
    hit = gen.generate([GenerationRequest(chunk_text, inference=InferenceConfig(tokens_to_generate=1))])[0]
    assert hit.retrievals[0].neighbors[0].chunk_id == 5


def test_sharded_index_gives_the_same_generation(project, model_pt, ray_address):
    cfg = InferenceConfig(tokens_to_generate=70, greedy=True)
    local = Generator.load(model_pt, project.root, index="local").generate([GenerationRequest("The Moon", inference=cfg)])
    sharded = Generator.load(model_pt, project.root, index="sharded").generate([GenerationRequest("The Moon", inference=cfg)])
    assert local[0].tokens == sharded[0].tokens
    assert [[n.chunk_id for n in e.neighbors] for e in local[0].retrievals] == \
           [[n.chunk_id for n in e.neighbors] for e in sharded[0].retrievals]


def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retro_ray.cli", "generate", *args], capture_output=True, text=True,
                          env={**os.environ, **(env_extra or {})})


def test_cli_nemo_style_and_retrieving(project, model_pt):
    r = cli("--checkpoint", str(model_pt), "prompt=sample prompt", 'neighbors=["sample neighbor 1","sample neighbor 2"]',
            "inference.tokens_to_generate=10", "inference.greedy=false", "inference.temperature=1.0",
            # unseeded sampling: without the ban, one run in ~100 samples the end of document early
            "inference.min_tokens_to_generate=10",
            "inference.add_BOS=false", "inference.retro_inference.retro_num_neighbors=2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["tokens"]) == 10 and [n["text"] for n in out["retrievals"][0]["neighbors"]] == \
        ["sample neighbor 1", "sample neighbor 2"]
    r = cli("--checkpoint", str(model_pt), "--project-dir", str(project.root), "prompt=The Moon",
            "inference.tokens_to_generate=5", "inference.seed=1")
    assert r.returncode == 0, r.stderr
    assert "generated (5 tokens, length)" in r.stdout and "neighbours read from token" in r.stdout


@pytest.mark.parametrize(("args", "match"), [
    (["inference.temperature=0"], "inference.temperature=0.0: must be > 0"),
    (["inference.tokens_to_generate=-3"], "tokens_to_generate=-3"),
    (["prompt="], "the prompt is empty"),
    (["neighbors=[1, [2]]"], "neighbors"),
    (["inference.top_q=1"], "unknown config key inference.top_q"),
])
def test_cli_bad_settings(model_pt, args, match):
    r = cli("--checkpoint", str(model_pt), "prompt=hi", *args)
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_bad_checkpoint(tmp_path, project):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    r = cli("--checkpoint", str(junk), "prompt=hi")
    assert r.returncode == 2 and "is not a retro-ray export" in r.stderr
    r = cli("--checkpoint", str(tmp_path), "prompt=hi")
    assert r.returncode == 2 and "is a directory" in r.stderr
    r = cli("--checkpoint", str(tmp_path / "missing.pt"), "prompt=hi")
    assert r.returncode == 2 and "does not exist" in r.stderr
