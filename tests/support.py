"""Builders shared by integration tests: a small real project (the whole data pipeline through the
CLI) and an exported model with random weights that fits it. Real files, a real Ray cluster."""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from retro_ray.project import Project
from tests.conftest import write_jsonl

SMALL_PIPELINE = ["tokenizer.vocab_size=1024", "split=90,10,0", "seq_length=256", "chunk_length=64",
                  "query.num_neighbors_query=20", "query.num_neighbors_save=4", "query.train_samples=60",
                  "index.num_shards=2"]


_built: dict[str, Path] = {}  # (docs, settings) digest -> a finished project, built once per test session


def build_small_project(root: Path, docs: list[tuple[str, str]], ray_address: str, *extra: str) -> Project:
    """`retro-ray pipeline` on (title, text) docs into root/proj; returns the finished Project.

    The first call for given docs and settings runs the pipeline (into a session-wide directory);
    later calls copy that project (seconds instead of a minute), so modules that change their
    project (add-docs, serving) still each get their own.
    """
    key = hashlib.sha256(json.dumps([docs, list(extra)]).encode()).hexdigest()[:16]
    if key not in _built:
        base = Path(tempfile.mkdtemp(prefix=f"retro-ray-test-project-{key}-"))
        corpus = write_jsonl(base / "corpus.jsonl", [{"title": t, "text": x} for t, x in docs])
        cmd = [sys.executable, "-m", "retro_ray.cli", "pipeline", "--project-dir", str(base / "proj"), "--no-progress",
               f"corpus.path={corpus}", *SMALL_PIPELINE, *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ray_address})
        assert r.returncode == 0, r.stderr[-3000:]
        atexit.register(shutil.rmtree, base, ignore_errors=True)
        _built[key] = base
    shutil.copytree(_built[key] / "proj", root / "proj")
    return Project(root / "proj")


def write_random_export(path: Path, project: Project, *, retro: bool = True, seed: int = 0, **model) -> Path:
    """A model.pt (the `retro-ray export` format) with random weights, sized for the project."""
    from retro_ray.model.retro import RetroConfig, RetroModel
    from retro_ray.train.export import EXPORT_FORMAT, EXPORT_VERSION
    from retro_ray.train.trainer import project_model_data

    cfg = project.read_config()
    data = project_model_data(project, num_neighbors_available=4)
    vocab = -(-data["vocab_size"] // 128) * 128
    base = RetroConfig.tiny(vocab_size=vocab, seq_length=cfg.seq_length, chunk_length=cfg.chunk_length)
    d = base.to_dict()
    d.update(model)
    d["retro"] = {**d["retro"], "enabled": retro}
    config = RetroConfig.from_dict(d)
    torch.manual_seed(seed)
    m = RetroModel(config)
    payload = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "config": config.to_dict(),
               "state_dict": m.state_dict(), "train_step": 0, "data": data, "weights_source": "random init (test)",
               "checkpoint": ""}
    buf = io.BytesIO()
    torch.save(payload, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path
