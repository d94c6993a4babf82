"""add-docs: documents added to a finished project's retrieval database, found by every retrieval path.

A real project (the whole pipeline through the CLI on 150 documents), a real local Ray cluster (shard
actors), real Faiss files, the real embedder, and real SIGKILLed processes for the crash tests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from retro_ray.corpus import normalize_text
from retro_ray.errors import RetroRayError
from retro_ray.project import Project
from retro_ray.retrieval.chunks import read_added_state
from retro_ray.retrieval.index import load_index
from retro_ray.retrieval.retriever import Retriever
from retro_ray.stages.add_docs import KILL_AT_ENV, add_documents
from tests.support import SMALL_DOCS, copy_project, write_jsonl

N_CORPUS = SMALL_DOCS  # the small project's documents: the first SMALL_DOCS of wiki_docs
# Old chunks' search results must not change: queries whose answers are train chunks.
OLD_QUERIES = ["a painting by a French artist", "the history of mathematics", "a river in Africa"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _training_files(project: Project) -> list[Path]:
    files = [project.token_prefix("train").with_suffix(s) for s in (".bin", ".idx")]
    files += [project.merged_db_path(n) for n in ("train", "valid", "sampled")]
    files += [project.docs_path, project.doc_ids_path("train"), project.marker_path("query")]
    files += sorted((project.root / "query").rglob("*.npy"))
    return files


@pytest.fixture(scope="module")
def project(ray_address, small_project, tmp_path_factory) -> Project:
    """A copy of the session's small project (N_CORPUS documents), for this module to add documents to."""
    return copy_project(small_project, tmp_path_factory.mktemp("add_docs"))


@pytest.fixture(scope="module")
def baseline(project):
    """What the project looks like before any add: search results of old queries, files, sizes."""
    r = Retriever.local(project)
    found = r.search_texts(OLD_QUERIES, 5)
    return {"retriever": r, "embedder": r.embedder, "ids": found.ids, "distances": found.distances,
            "n_train": len(r.db), "training": {str(p): _digest(p) for p in _training_files(project)},
            "index": {str(p): _digest(p) for p in [project.added_index_path, *project.shard_paths()]}}


def _old_results_unchanged(r: Retriever, baseline: dict) -> None:
    """Old queries rank the train chunks as before, at the same distances; added chunks may come in between."""
    found = r.search_texts(OLD_QUERIES, 5 + len(r.db) - baseline["n_train"])
    for ids, dist, want_ids, want_dist in zip(found.ids, found.distances, baseline["ids"], baseline["distances"]):
        old = ids < baseline["n_train"]
        assert ids[old][:5].tolist() == want_ids.tolist()
        assert np.allclose(dist[old][:5], want_dist, atol=1e-5)


def _top_hits_are_own_chunks(r: Retriever, first_ids: list[int], titles: list[str]) -> None:
    """Searching the text of each added document's first chunk finds that chunk first, with its title."""
    texts = r.db.texts(np.array(first_ids))
    found = r.search_texts(texts, 3)
    assert found.ids[:, 0].tolist() == first_ids
    assert r.db.titles(found.ids[:, 0]) == titles


def _first_chunks(project: Project, titles: list[str]) -> list[int]:
    """Chunk id of the first chunk of each added document with these titles (from the store's tables)."""
    import pyarrow.parquet as pq

    state = read_added_state(project)
    table = pq.read_table(project.added_doc_table_path(state["dir"])).to_pydict()
    first = np.concatenate([[0], np.cumsum(table["n_chunks"])[:-1]]) + state["n_base_chunks"]
    by_title = dict(zip(table["title"], first.tolist()))
    return [by_title[t] for t in titles]


@pytest.mark.parametrize("index_str,exact", [("Flat", True), ("IVF8,Flat", True), ("HNSW16", True), ("IVF4,PQ8x4", False)])
def test_round_robin_ids_and_compare_and_add(index_str, exact, tmp_path):
    from retro_ray.retrieval import index as ix
    from retro_ray.retrieval.retriever import LocalIndex
    from retro_ray.retrieval.shards import IndexShard, added_chunk_ids

    x = np.random.default_rng(0).standard_normal((1100, 32)).astype(np.float32)
    empty = ix.train_index(index_str, x[:1000])
    assert [added_chunk_ids(s, 3, 1000, 11).tolist() for s in range(3)] == [
        [1000, 1003, 1006, 1009], [1001, 1004, 1007, 1010], [1002, 1005, 1008]]
    assert added_chunk_ids(1, 3, 1000, 11, start=2).tolist() == [1007, 1010]
    shard = IndexShard(1, ix.index_to_bytes(empty))
    shard.add(x[:400], 0)
    ids = added_chunk_ids(1, 3, 1000, 11)
    assert shard.add_with_ids(x[ids], ids, expected_ntotal=400) == 404
    assert shard.add_with_ids(x[ids], ids, expected_ntotal=400) == 404  # a stale expectation adds nothing
    local = LocalIndex(ix.save_index(ix.add_range(ix.index_to_bytes(empty), x[:1000], 0), tmp_path / "m.faissindex"))
    new = np.arange(1000, 1011)
    assert local.add_with_ids(x[new], new, expected_ntotal=1000) == 1011 == local.ntotal
    assert local.add_with_ids(x[new], new, expected_ntotal=1000) == 1011
    for found in (shard.search(x[ids], 3)[1], local.search(x[ids], 3)[1]):
        assert found.max() < 1011 and found.min() >= 0
        if exact:
            assert found[:, 0].tolist() == ids.tolist()
    with pytest.raises(RetroRayError, match=r"add_ids got vectors of shape \(2, 32\) for 3 ids"):
        local.add_with_ids(x[:2], np.arange(3))


def test_bad_input_is_one_clear_error_and_writes_nothing(project, baseline, tmp_path):
    emb = baseline["embedder"]
    with pytest.raises(RetroRayError, match=r"documents file .*nope\.jsonl does not exist; give a \.jsonl"):
        add_documents(project, tmp_path / "nope.jsonl", embedder=emb, progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(RetroRayError, match=r"empty\.jsonl holds no documents \(0 read, 0 empty\)"):
        add_documents(project, tmp_path / "empty.jsonl", embedder=emb, progress=False)
    write_jsonl(tmp_path / "body.jsonl", [{"title": "x", "body": "some text"}])
    with pytest.raises(RetroRayError, match=r"body\.jsonl:1: no field 'text' \(this line has: body, title\); set text_field="):
        add_documents(project, tmp_path / "body.jsonl", embedder=emb, progress=False)
    with pytest.raises(RetroRayError, match=r"document 1 has no field 'text' \(it has: body\)"):
        add_documents(project, [{"text": "fine"}, {"body": "no text"}], embedder=emb, progress=False)
    with pytest.raises(RetroRayError, match=r"the request holds no documents \(0 read"):
        add_documents(project, [], embedder=emb, progress=False)
    # a project whose index-add stage has not run
    bare = Project(tmp_path / "bare")
    shutil.copytree(project.root, bare.root, ignore=shutil.ignore_patterns("index", "query", "embeddings"))
    for stage in ("index-train", "index-add", "query"):
        bare.clear_done(stage)
    with pytest.raises(RetroRayError, match=r"`add-docs` needs the `index-add` stage.*run `retro-ray index-add"):
        add_documents(bare, [{"text": "a new document"}], embedder=emb, progress=False)
    # an embedder that is not the one the index was built with
    from retro_ray.embedder import Embedder, EmbedderConfig

    other = Embedder(EmbedderConfig(max_chunk_length=128, precision="fp32"))
    with pytest.raises(RetroRayError, match=r"truncates chunks at 128 wordpieces but the index was built with 256"):
        add_documents(project, [{"text": "a new document"}], embedder=other, progress=False)
    # nothing was written
    assert read_added_state(project) is None and not project.added_dir.exists()
    assert {str(p): _digest(p) for p in [project.added_index_path, *project.shard_paths()]} == baseline["index"]


def test_added_file_is_found_by_local_and_sharded_search(project, baseline, wiki_docs, tmp_path):
    new = wiki_docs[N_CORPUS:N_CORPUS + 20]
    records = [{"title": t, "text": x} for t, x in new]
    records += [{"title": "copy of a corpus document", "text": wiki_docs[3][1]},  # in the corpus already
                {"title": "again", "text": new[0][1]},                             # repeated in the input
                {"title": "blank", "text": "  \n "}]                               # empty
    path = write_jsonl(tmp_path / "new.jsonl", records)
    rep = add_documents(project, path, embedder=baseline["embedder"], progress=False)
    c = rep.counts
    assert not rep.skipped
    assert (c["docs_read"], c["docs_added"], c["docs_skipped"]) == (23, 20, 3)
    assert (c["docs_skipped_in_corpus"], c["docs_skipped_repeated"], c["docs_skipped_empty"]) == (1, 1, 1)
    n_train = baseline["n_train"]
    assert c["first_chunk_id"] == n_train and c["total_chunks"] == n_train + c["chunks_added"] > n_train + 20

    titles = [t for t, _ in new]
    first = _first_chunks(project, titles)
    local = Retriever.local(project, embedder=baseline["embedder"])
    assert len(local.db) == c["total_chunks"] and local.searcher.ntotal == c["total_chunks"]
    _top_hits_are_own_chunks(local, first, titles)
    # a neighbour of an added chunk: its tokens then its own document's continuation, then EOD padding
    tok = local.db.tokenizer
    eod = project.derived()["eod_id"]
    doc_tokens = tok.encode(normalize_text(new[0][1], "NFC"), add_special_tokens=False).ids
    got = local.neighbor_tokens(np.array([first[0]]))[0]
    want = doc_tokens[:128]
    assert got[:len(want)].tolist() == want and np.all(got[len(want):] == eod)
    assert local.db.global_doc_ids(np.array(first)).tolist() == list(range(N_CORPUS, N_CORPUS + 20))
    # old chunks: same ids, same results
    _old_results_unchanged(local, baseline)
    assert local.db.texts(np.arange(5)) == baseline["retriever"].db.texts(np.arange(5))

    sharded = Retriever.sharded(project, embedder=baseline["embedder"])
    try:
        assert sharded.searcher.ntotal() == c["total_chunks"]
        _top_hits_are_own_chunks(sharded, first, titles)
        _old_results_unchanged(sharded, baseline)
    finally:
        sharded.searcher.shutdown()

    # what the model was trained on, and its neighbours, did not change
    assert {str(p): _digest(p) for p in _training_files(project)} == baseline["training"]

    # the same file again adds nothing, and says so
    again = add_documents(project, path, embedder=baseline["embedder"], progress=False)
    assert again.skipped and again.counts["docs_added"] == 0
    # the repeat within the file is now simply already added
    assert (again.counts["docs_skipped_already_added"], again.counts["docs_skipped_in_corpus"]) == (21, 1)
    assert "nothing to do" in again.format()
    assert load_index(project.added_index_path).ntotal == c["total_chunks"]


def test_text_directory_titles_come_from_file_names(project, baseline, tmp_path):
    d = tmp_path / "notes"
    (d / "sub").mkdir(parents=True)
    (d / "Zorblax fact.txt").write_text("Zorblax is a fictional moon of Neptune covered in blue glass dunes.")
    (d / "sub" / "Quennel.txt").write_text("Quennel is an invented river that flows uphill every second Tuesday.")
    rep = add_documents(project, d, embedder=baseline["embedder"], progress=False)
    assert rep.counts["docs_added"] == 2 and rep.counts["chunks_added"] == 2
    r = Retriever.local(project, embedder=baseline["embedder"])
    found = r.search_texts(["a moon of Neptune with glass dunes", "a river that flows uphill"], 1)
    assert r.db.titles(found.ids[:, 0]) == ["Zorblax fact", "sub/Quennel"]


def test_live_retrievers_see_new_documents_while_searching(project, baseline, wiki_docs):
    new = wiki_docs[N_CORPUS + 20:N_CORPUS + 30]
    titles = [t for t, _ in new]
    local = Retriever.local(project, embedder=baseline["embedder"])
    sharded = Retriever.sharded(project, embedder=baseline["embedder"])
    n_before = len(local.db)
    errors: list[BaseException] = []
    stop = threading.Event()

    def search_loop():  # a generation searching while documents are added
        try:
            while not stop.is_set():
                ids = local.search_texts([new[0][1][:300]], 5).ids
                local.db.titles(ids[0])  # every id returned must resolve
                local.neighbor_tokens(ids)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=search_loop)
    t.start()
    try:
        rep = add_documents(project, [{"title": a, "text": b} for a, b in new], retriever=local, progress=False)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert rep.counts["docs_added"] == 10 and "sync_retriever" in rep.timings
    assert len(local.db) == local.searcher.ntotal == n_before + rep.counts["chunks_added"]
    first = _first_chunks(project, titles)
    _top_hits_are_own_chunks(local, first, titles)
    try:
        # the sharded retriever was created before the add: it syncs from the store, shard by shard
        assert len(sharded.db) == n_before
        assert sharded.sync_added() == rep.counts["chunks_added"]
        assert sharded.searcher.ntotal() == len(sharded.db) == n_before + rep.counts["chunks_added"]
        _top_hits_are_own_chunks(sharded, first, titles)
        assert sharded.sync_added() == 0
        # a second client of the same shard actors adds nothing twice (compare-and-add)
        from retro_ray.retrieval.shards import ShardedIndex

        other = Retriever(project, ShardedIndex(sharded.searcher.shards, project.shard_paths()), embedder=baseline["embedder"])
        assert other.sync_added() == 0 and other.searcher.ntotal() == sharded.searcher.ntotal()
    finally:
        sharded.searcher.shutdown()


def _add_in_subprocess(project: Project, path: Path, kill_at: str) -> subprocess.CompletedProcess:
    code = ("import sys; from retro_ray.project import Project; from retro_ray.stages.add_docs import add_documents; "
            "add_documents(Project(sys.argv[1]), sys.argv[2], progress=False)")
    env = {**os.environ, KILL_AT_ENV: kill_at}
    return subprocess.run([sys.executable, "-c", code, str(project.root), str(path)], capture_output=True, text=True,
                          env=env, timeout=240)


def test_kill_9_mid_add_leaves_old_index_usable_and_rerun_completes(project, baseline, wiki_docs, tmp_path):
    new = wiki_docs[N_CORPUS + 30:N_CORPUS + 45]
    titles = [t for t, _ in new]
    path = write_jsonl(tmp_path / "crash.jsonl", [{"title": t, "text": x} for t, x in new])
    before = read_added_state(project)
    merged_before = load_index(project.added_index_path).ntotal

    # 1. killed after appending tokens and embeddings, before the commit: the old contents, untouched
    r = _add_in_subprocess(project, path, "before-db-commit")
    assert r.returncode == -9, r.stderr[-2000:]
    assert read_added_state(project) == before
    itemsize = np.dtype(before["token_dtype"]).itemsize
    assert project.added_tokens_path.stat().st_size > before["tokens"] * itemsize  # the unfinished tail
    local = Retriever.local(project, embedder=baseline["embedder"])
    assert len(local.db) == merged_before == local.searcher.ntotal
    _old_results_unchanged(local, baseline)

    # 2. killed after the chunk database commit and the first index file's rename
    r = _add_in_subprocess(project, path, "index-partial")
    assert r.returncode == -9, r.stderr[-2000:]
    state = read_added_state(project)
    assert state["version"] == before["version"] + 1 and state["docs"] == before["docs"] + 15
    shard_counts = [load_index(p).ntotal for p in project.shard_paths()]
    assert load_index(project.added_index_path).ntotal == merged_before  # the merged index: not yet
    assert sum(shard_counts) > merged_before                                 # shard 0: already
    for r_ in (Retriever.local(project, embedder=baseline["embedder"]), Retriever.sharded(project, embedder=baseline["embedder"])):
        try:
            found = r_.search_texts([x[:400] for _, x in new], 10)
            assert found.ids.max() < len(r_.db)  # every id resolves
            assert all(title for row in found.ids for title in r_.db.titles(row))
            _old_results_unchanged(r_, baseline)
        finally:
            if hasattr(r_.searcher, "shutdown"):
                r_.searcher.shutdown()

    # 3. a rerun finishes the interrupted add (from the stored embeddings) and adds nothing twice
    rep = add_documents(project, path, embedder=baseline["embedder"], progress=False)
    assert rep.counts["docs_added"] == 0 and rep.counts["docs_skipped_already_added"] == 15
    assert rep.counts["vectors_recovered"] > 0 and not rep.skipped
    total = state["n_base_chunks"] + state["chunks"]
    assert load_index(project.added_index_path).ntotal == total
    assert sum(load_index(p).ntotal for p in project.shard_paths()) == total
    local = Retriever.local(project, embedder=baseline["embedder"])
    _top_hits_are_own_chunks(local, _first_chunks(project, titles), titles)
    assert not list(project.index_dir.rglob(".*.tmp*")) and not list(project.added_dir.glob(".*.tmp*"))
    again = add_documents(project, path, embedder=baseline["embedder"], progress=False)
    assert again.skipped and again.counts["vectors_recovered"] == 0


def test_cli_add_docs_then_search_finds_it(project, tmp_path):
    path = write_jsonl(tmp_path / "cli.jsonl", [{"name": "Vexilloid Bay", "body": "Vexilloid Bay is an invented harbour "
                                                 "where the tides are measured in flags rather than metres."}])
    cli = [sys.executable, "-m", "retro_ray.cli"]
    r = subprocess.run([*cli, "add-docs", "--project-dir", str(project.root), str(path), "--no-progress",
                        "text_field=body", "title_field=name"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "docs_added" in r.stdout and "1" in r.stdout
    r = subprocess.run([*cli, "search", "--project-dir", str(project.root), "-k", "1", "harbour tides measured in flags"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "[Vexilloid Bay]" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*cli, "add-docs", "--project-dir", str(project.root), str(tmp_path / "missing.jsonl")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr, r.stderr
