"""prep + db on a real local Ray cluster, on real files, including a kill -9 and a rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.indexed import IndexedDataset
from retro_ray.project import Project
from retro_ray.stages import db, prep
from retro_ray.tokenizer import load_tokenizer
from tests.support import write_jsonl

CHUNK = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, wiki_docs) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    records = [{"title": t, "text": x} for t, x in wiki_docs]
    records.insert(5, {"title": "dup", "text": wiki_docs[0][1]})  # an exact duplicate
    records.insert(9, {"title": "empty", "text": "  "})
    return write_jsonl(path, records)


def _cfg(corpus: Path, **kw) -> C.ProjectConfig:
    return C.ProjectConfig(corpus=C.CorpusConfig(path=str(corpus)), tokenizer=C.TokenizerConfig(vocab_size=1024),
                           split="90,10,0", seq_length=256, chunk_length=CHUNK, **kw)


@pytest.fixture(scope="module")
def built(ray_address, corpus, tmp_path_factory) -> Project:
    project = Project(tmp_path_factory.mktemp("proj"))
    rep = prep.run(project, C.PrepRunConfig(docs_per_block=64), _cfg(corpus), progress=False)
    assert rep.counts["documents_kept"] == 400
    assert rep.counts["documents_duplicate_dropped"] == 1 and rep.counts["documents_empty_dropped"] == 1
    db.run(project, C.DbRunConfig(docs_per_block=50), progress=False)
    return project


def test_token_datasets_hold_every_document(built):
    p = built
    docs = pq.read_table(p.docs_path).column("text").to_pylist()
    tok = load_tokenizer(p.tokenizer_path)
    eod = p.derived()["eod_id"]
    seen = []
    for split in ("train", "valid", "test"):
        ds = IndexedDataset(p.token_prefix(split))
        ids = np.load(p.doc_ids_path(split))
        assert len(ds) == len(ids)
        assert np.all(np.diff(ids) > 0)
        for i in range(len(ds)):
            toks = ds[i]
            assert toks[-1] == eod
            assert tok.decode(toks[:-1].tolist()) == docs[ids[i]]
        seen += ids.tolist()
    assert sorted(seen) == list(range(len(docs)))
    assert p.derived()["docs_per_split"] == {"train": 360, "valid": 40, "test": 0}


def test_chunk_database_layout_and_content(built):
    p = built
    tok = load_tokenizer(p.tokenizer_path)
    eod = p.derived()["eod_id"]
    docs = pq.read_table(p.docs_path).column("text").to_pylist()
    for split in ("train", "valid"):
        ds = IndexedDataset(p.token_prefix(split))
        ids = np.load(p.doc_ids_path(split))
        with h5py.File(p.merged_db_path(split), "r") as f:
            chunks = f["chunks"][:]
            doc_offsets = f["doc_offsets"][:]
            assert f["chunks"].dtype == np.uint32 and chunks.shape[1] == 5
            assert f["doc_offsets"].dtype == np.uint64 and doc_offsets.shape == (len(ds), 3)
            assert int(f["n_written"][0]) == len(chunks)
        assert np.all(chunks[:, 0] == 0)
        # chunk count per document = ceil(text tokens / 64), and doc_offsets agree
        n_text = np.array([len(ds[i]) - 1 for i in range(len(ds))])
        per_doc = np.bincount(chunks[:, 1], minlength=len(ds))
        assert np.array_equal(per_doc, -(-n_text // CHUNK))
        assert np.array_equal(doc_offsets[:, 2], np.cumsum(per_doc))
        # every chunk's tokens decode to a byte substring of its document; chunks tile the doc
        for d, s, e, _blen in chunks[:, 1:].astype(np.int64):
            piece = ds[d][s:e]
            assert eod not in piece.tolist()
            raw = b"".join(tok.id_to_token(int(t)).encode() for t in piece)  # byte-level symbols
            text = tok.decode(piece.tolist())
            if "\ufffd" not in text:  # a chunk may end inside a multi-byte character
                assert text in docs[ids[d]]
            assert len(raw) > 0
        starts = chunks[:, 2].astype(np.int64)
        assert np.all(starts % CHUNK == 0)
        assert np.all(chunks[:, 4] > 0)  # every chunk has some text for BERT
    with h5py.File(p.merged_db_path("sampled"), "r") as f, h5py.File(p.merged_db_path("train"), "r") as t:
        ids = f["chunk_ids"][:]
        assert np.array_equal(f["chunks"][:], t["chunks"][:][ids])


def test_bert_len_is_the_wordpiece_length(built):
    from retro_ray.embedder import load_wordpiece_tokenizer

    p = built
    tok = load_tokenizer(p.tokenizer_path)
    bert = load_wordpiece_tokenizer(None)
    ds = IndexedDataset(p.token_prefix("valid"))
    with h5py.File(p.merged_db_path("valid"), "r") as f:
        chunks = f["chunks"][:50].astype(np.int64)
    for _, d, s, e, blen in chunks:
        text = tok.decode(ds[d][s:e].tolist())
        assert len(bert.encode(text, add_special_tokens=False).ids) == blen


def test_rerun_is_a_no_op_and_conflicts_are_refused(built, corpus):
    p = built
    before = p.merged_db_path("train").read_bytes()
    rep = prep.run(p, C.PrepRunConfig(docs_per_block=64), _cfg(corpus), progress=False)
    assert rep.skipped
    assert db.run(p, C.DbRunConfig(), progress=False).skipped
    assert p.merged_db_path("train").read_bytes() == before
    with pytest.raises(RetroRayError, match=r"holds a project with another configuration \(chunk_length: 64 there, 32 now"):
        prep.run(p, settings=C.ProjectConfig(**{**_cfg(corpus).__dict__, "chunk_length": 32}), progress=False)
    with pytest.raises(RetroRayError, match=r"chunk_length=32 was given but .*config.json has chunk_length=64"):
        db.run(p, C.DbRunConfig(), {"chunk_length": 32}, progress=False)
    # repeating a recorded value is fine
    assert db.run(p, C.DbRunConfig(), {"chunk_length": 64}, progress=False).skipped


def test_db_before_prep_and_bad_corpus(tmp_path, ray_address):
    with pytest.raises(RetroRayError, match="not a retro-ray project"):
        db.run(Project(tmp_path / "new"), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops}\n')
    with pytest.raises(RetroRayError, match=r"bad.jsonl:2"):
        prep.run(Project(tmp_path / "p"), settings=_cfg(bad), progress=False)
    assert not (tmp_path / "p" / "data" / "docs.parquet").exists()


def _run_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "retro_ray.cli", *args], capture_output=True, text=True, **kw)


def test_cli_errors_are_one_line(tmp_path, corpus):
    r = _run_cli(["prep", "--project-dir", str(tmp_path / "p"), f"corpus.path={tmp_path / 'missing.jsonl'}"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"retro-ray: error: corpus path {tmp_path / 'missing.jsonl'} does not exist; give corpus.path=<file or "
        "directory> (JSONL, Parquet or text), or leave it empty for the default corpus."
    ]
    r = _run_cli(["prep", "--project-dir", str(tmp_path / "p"), "split=a,b"])
    assert r.returncode == 2 and "split='a,b' does not parse" in r.stderr and "Traceback" not in r.stderr
    r = _run_cli(["prep", "--project-dir", str(tmp_path / "p"), "prep.docs_per_blok=3"])
    assert r.returncode == 2 and "unknown config key prep.docs_per_blok" in r.stderr
    r = _run_cli(["prep", "--help"])
    assert r.returncode == 0 and "corpus.text_field" in r.stdout and "prep.docs_per_block" in r.stdout


def _kill_when_blocks_appear(cmd, blocks_dir: Path, marker: Path, env) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if blocks_dir.is_dir() and any(blocks_dir.rglob("*.np*")):
                break
            if proc.poll() is not None:
                pytest.fail(f"{cmd} ended before any block was written")
            time.sleep(0.02)
        else:
            pytest.fail("no block was written in 120 s")
        assert not marker.exists(), "the stage finished before it could be killed; the test proves nothing"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


@pytest.mark.timeout(600)
def test_kill_minus_9_then_rerun_completes_identically(ray_address, corpus, built, tmp_path):
    """prep and db killed mid-way, then rerun: outputs byte-identical to an uninterrupted run."""
    p = Project(tmp_path / "killed")
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    overrides = [f"corpus.path={corpus}", "tokenizer.vocab_size=1024", "split=90,10,0", "seq_length=256",
                 f"chunk_length={CHUNK}"]
    cli = [sys.executable, "-m", "retro_ray.cli"]
    _kill_when_blocks_appear(cli + ["prep", "--project-dir", str(p.root), "--no-progress", "prep.docs_per_block=8",
                                    *overrides], p.prep_blocks_dir, p.marker_path("prep"), env)
    assert not p.is_done("prep")
    prep.run(p, C.PrepRunConfig(docs_per_block=8), _cfg(corpus), progress=False)
    _kill_when_blocks_appear(cli + ["db", "--project-dir", str(p.root), "--no-progress", "db.docs_per_block=5"],
                             p.db_dir / "blocks", p.marker_path("db"), env)
    assert not p.is_done("db")
    db.run(p, C.DbRunConfig(docs_per_block=5), progress=False)

    # The uninterrupted reference used other block sizes: the merged outputs must not depend on them.
    for split in ("train", "valid", "test"):
        for ext in (".bin", ".idx"):
            a = built.token_prefix(split).with_suffix(ext).read_bytes()
            b = p.token_prefix(split).with_suffix(ext).read_bytes()
            assert a == b, f"{split}{ext} differs"
    for name in ("train", "valid", "sampled"):
        assert built.merged_db_path(name).read_bytes() == p.merged_db_path(name).read_bytes(), name
    assert not list(p.root.rglob(".*tmp*"))
    assert json.loads(p.config_path.read_text())["_derived"]["chunks_per_split"] == \
        built.derived()["chunks_per_split"]
