"""embed → index → search → query → RetroDataset on a real local Ray cluster, real Faiss, real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.project import Project
from retro_ray.stages import embed, index_train, query
from tests.support import write_jsonl

CHUNK, SEQ = 64, 256


PIPELINE_OVERRIDES = ["tokenizer.vocab_size=1024", "split=90,10,0", f"seq_length={SEQ}", f"chunk_length={CHUNK}",
                      "query.num_neighbors_query=20", "query.num_neighbors_save=4", "query.train_samples=120",
                      # small blocks, so that several actors, blocks and shards are exercised
                      "embed.chunks_per_block=200", "index.num_shards=3", "query.samples_per_block=40",
                      # bf16 (emulated where the CPU lacks it) is where a batch's make-up moves vectors most
                      "embed.precision=bf16",
                      # groups of 16 x 8 = 128 chunks (32 samples in query): block edges cut groups
                      "embedder.batch_size=8"]


@pytest.fixture(scope="module")
def project(ray_address, wiki_docs, tmp_path_factory) -> Project:
    """The whole data pipeline through the CLI (`retro-ray pipeline`), on the module's Ray cluster."""
    root = tmp_path_factory.mktemp("retrieval")
    corpus = write_jsonl(root / "corpus.jsonl", [{"title": t, "text": x} for t, x in wiki_docs[:250]])
    p = Project(root / "proj")
    cmd = [sys.executable, "-m", "retro_ray.cli", "pipeline", "--project-dir", str(p.root), "--no-progress",
           f"corpus.path={corpus}", *PIPELINE_OVERRIDES]
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("prep", "db", "embed", "index-train", "index-add", "query"):
        assert p.is_done(stage), stage
    rep = p.report("embed")
    assert rep.counts["chunks_embedded_this_run"] == rep.counts["train_chunks"] + rep.counts["valid_chunks"]
    assert p.report("index-add").counts["shards"] == 3
    # a second run finds everything done
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.count("already complete, nothing to do") == 5, r.stdout
    return p


def test_embeddings_equal_the_embedder_alone(project):
    from retro_ray.embedder import Embedder, EmbedderConfig
    from retro_ray.retrieval.chunks import ChunkDatabase

    chunkdb = ChunkDatabase(project, "train")
    ids = np.array([0, 1, 199, 200, 201, len(chunkdb) - 1])
    stored = embed.load_embeddings(project, "train", chunk_ids=ids)
    alone = Embedder(EmbedderConfig(precision="fp32")).embed(chunkdb.texts(ids))
    cos = np.sum(stored * alone, axis=1) / np.linalg.norm(stored, axis=1) / np.linalg.norm(alone, axis=1)
    assert np.all(cos >= 0.999), cos
    n = project.derived()["chunks_per_split"]["train"]
    assert embed.load_embeddings(project, "train").shape == (n, 384)


def test_every_chunk_finds_itself_and_sharded_equals_merged(project):
    from retro_ray.retrieval.retriever import LocalIndex
    from retro_ray.retrieval.shards import ShardedIndex

    assert project.derived()["index_str"] == "Flat"  # auto, for a tiny database
    vectors = embed.load_embeddings(project, "train")
    merged = LocalIndex(project.added_index_path)
    D, I = merged.search(vectors, 5)
    # Near-duplicate chunks can tie at distance ~0: the chunk itself must be among the zero-distance hits.
    assert np.mean(I[:, 0] == np.arange(len(vectors))) > 0.99
    assert all(i in row[d <= d[0] + 1e-5] for i, (row, d) in enumerate(zip(I, D)))
    sharded = ShardedIndex.from_paths(project.shard_paths())
    try:
        Ds, Is = sharded.search(vectors[:300], 10)
    finally:
        sharded.shutdown()
    Dm, Im = merged.search(vectors[:300], 10)
    assert np.allclose(Ds, Dm, atol=1e-5)
    assert np.mean(Is == Im) > 0.99  # equal up to the order of exact ties


def test_search_cli_prints_titles(project):
    r = subprocess.run([sys.executable, "-m", "retro_ray.cli", "search", "--project-dir", str(project.root),
                        "-k", "3", "a painting by a French artist"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip().startswith(("1.", "2.", "3."))]
    assert len(lines) == 3 and all("[" in ln and "chunk" in ln for ln in lines)


def test_index_before_embed_and_bad_index_string(tmp_path, project, ray_address):
    bare = Project(tmp_path / "bare")
    shutil.copytree(project.root, bare.root, ignore=shutil.ignore_patterns("embeddings", "index", "query"))
    for stage in ("embed", "index-train", "index-add", "query"):
        bare.clear_done(stage)
    with pytest.raises(RetroRayError, match="`index-train` needs the `embed` stage"):
        index_train.run(bare, progress=False)
    with pytest.raises(RetroRayError, match="`query` needs the `index-add` stage"):
        query.run(bare, progress=False)
    # give it embeddings, then an index string Faiss rejects, then one that needs more training points
    shutil.copytree(project.embeddings_dir, bare.embeddings_dir)
    shutil.copy(project.marker_path("embed"), bare.marker_path("embed"))
    d = bare.derived()
    bare.update_derived(embed_dim=project.derived()["embed_dim"], embed_precision=d.get("embed_precision", "fp32"))
    with pytest.raises(RetroRayError, match="Faiss rejected index string 'IVF-nonsense'"):
        index_train.run(bare, settings={"index": {"index_str": "IVF-nonsense"}}, progress=False)
    with pytest.raises(RetroRayError, match=r"needs at least 4096 training vectors .* lower nlist"):
        index_train.run(bare, settings={"index": {"index_str": "IVF4096,Flat"}}, progress=False)
    assert not bare.is_done("index-train")


@pytest.fixture(scope="module")
def queried(project) -> Project:
    assert project.report("query").counts["train_samples"] == 120
    return project


def test_no_neighbour_comes_from_a_document_the_sample_spans(queried):
    from retro_ray.retrieval.chunks import ChunkDatabase

    chunkdb = ChunkDatabase(queried, "train")
    for split in ("train", "valid"):
        blocks, meta = query.load_neighbors(queried, split)
        ids = np.concatenate(blocks)
        samples = query.make_samples(queried, split)
        C_ = SEQ // CHUNK
        assert ids.shape == (len(samples) * C_, 4) and ids.dtype == np.int64
        doc_ids = np.load(queried.doc_ids_path(split))
        found = 0
        for i in range(len(samples)):
            own = set(doc_ids[samples.span(i).docs].tolist())
            rows = ids[i * C_:(i + 1) * C_]
            nb_docs = chunkdb.global_doc_ids(rows)
            assert not (set(nb_docs[rows >= 0].tolist()) & own)
            # -1 only as trailing padding
            for r in rows:
                valid = r >= 0
                assert not np.any(valid[1:] & ~valid[:-1])
            found += int((rows >= 0).sum())
        assert found > 0.9 * ids.size  # 20 candidates leave plenty after filtering


def test_retro_dataset_items_and_continuations(queried):
    from retro_ray.train.dataset import RetroDataset

    ds = RetroDataset(queried, "train", num_neighbors=2)
    eod = queried.derived()["eod_id"]
    item = ds[7]
    assert item["text"].shape == (SEQ + 1,)
    assert item["neighbor_tokens"].shape == (SEQ // CHUNK, 2, 2 * CHUNK)
    assert item["neighbor_mask"].shape == (SEQ // CHUNK, 2) and item["neighbor_mask"].dtype == bool
    chunkdb = ds.db
    ids = ds.neighbor_ids(7)
    for c in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            cid = ids[c, j]
            if cid < 0:
                assert np.all(item["neighbor_tokens"][c, j] == eod)
                continue
            _, doc, start, _, _ = chunkdb.chunks[cid].astype(np.int64)
            text = chunkdb.ds[doc][:-1]  # the document without its EOD
            want = text[start:start + 2 * CHUNK]
            got = item["neighbor_tokens"][c, j]
            # neighbour + continuation from the same document, then EOD padding: never the next document
            assert np.array_equal(got[:len(want)], want)
            assert np.all(got[len(want):] == eod)
    assert np.array_equal(ds[7]["text"], item["text"])
    with pytest.raises(RetroRayError, match="5 neighbours per chunk were asked for but the query stage saved 4"):
        RetroDataset(queried, "train", num_neighbors=5)


def test_retro_dataset_as_ray_dataset(queried):
    from retro_ray.train.dataset import RetroDataset

    ds = RetroDataset(queried, "valid", num_neighbors=2)
    rows = ds.to_ray_dataset().take_all()
    assert len(rows) == len(ds)
    by_text = {tuple(r["text"][:16].tolist()): r for r in rows}
    for i in range(len(ds)):
        row = by_text[tuple(ds[i]["text"][:16].tolist())]
        assert np.array_equal(row["neighbor_tokens"], ds[i]["neighbor_tokens"])


def test_changed_setting_is_named(queried, tmp_path):
    from retro_ray.train.dataset import RetroDataset

    copy = Project(tmp_path / "copy")
    shutil.copytree(queried.root, copy.root)
    d = json.loads(copy.config_path.read_text())
    d["query"]["nprobe"] = 7
    copy.config_path.write_text(json.dumps(d))
    with pytest.raises(RetroRayError, match=r"computed with search.nprobe=64, but the project now has search.nprobe=7"):
        RetroDataset(copy, "train", num_neighbors=2)


@pytest.mark.timeout(600)
def test_query_is_deterministic_and_resumes_after_kill(queried, ray_address, tmp_path):
    ref = {s: np.concatenate(query.load_neighbors(queried, s)[0]) for s in ("train", "valid")}
    # (the reference was computed with 40 samples a block; the rerun uses 10: ids must not depend on it)
    copy = Project(tmp_path / "again")
    shutil.copytree(queried.root, copy.root, ignore=shutil.ignore_patterns("query"))
    copy.clear_done("query")
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    proc = subprocess.Popen([sys.executable, "-m", "retro_ray.cli", "query", "--project-dir", str(copy.root),
                             "--no-progress", "query.samples_per_block=10"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any((copy.root / "query").rglob("0*.npy")):
        assert proc.poll() is None, "query ended before writing a block"
        time.sleep(0.05)
    assert not copy.is_done("query")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    query.run(copy, C.QueryRunConfig(samples_per_block=10), progress=False)  # resumes with the same block size
    for s in ("train", "valid"):
        assert np.array_equal(np.concatenate(query.load_neighbors(copy, s)[0]), ref[s]), s


@pytest.mark.timeout(900)
def test_embed_and_query_outputs_do_not_depend_on_block_size_or_actors(queried, ray_address, tmp_path):
    """Run settings change how a stage runs, never what it writes: embeddings from blocks of 200 (two
    actors), 77 (one actor) and 333 (two actors), and neighbours from blocks of 40 (one actor), 7 (two
    actors) and 10 (the kill test above) are the same bytes. Groups are cut across block edges here."""
    assert queried.report("embed").counts["precision"] == "bf16"
    splits = ("train", "valid")
    ref = {s: embed.load_embeddings(queried, s) for s in splits}
    for per, actors in ((77, 1), (333, 2)):
        p = Project(tmp_path / f"embed-{per}")
        shutil.copytree(queried.root, p.root, ignore=shutil.ignore_patterns("embeddings"))
        p.clear_done("embed")
        rep = embed.run(p, C.EmbedRunConfig(chunks_per_block=per, num_actors=actors, precision="bf16"), progress=False)
        assert rep.counts["chunks_per_block"] == per and rep.counts["chunks_embedded_this_run"] > 0
        for s in splits:
            got = embed.load_embeddings(p, s)
            assert got.shape == ref[s].shape and got.tobytes() == ref[s].tobytes(), (per, s)
    ref_nb = {s: np.concatenate(query.load_neighbors(queried, s)[0]) for s in splits}
    p = Project(tmp_path / "query-7")
    shutil.copytree(queried.root, p.root, ignore=shutil.ignore_patterns("query"))
    p.clear_done("query")
    query.run(p, C.QueryRunConfig(samples_per_block=7, num_actors=2, cpus_per_actor=0.5), progress=False)
    for s in splits:
        assert np.array_equal(np.concatenate(query.load_neighbors(p, s)[0]), ref_nb[s]), s


def test_a_resumed_embed_keeps_its_group_size_and_precision(queried, tmp_path):
    p = Project(tmp_path / "resume")
    shutil.copytree(queried.root, p.root)
    p.clear_done("embed")
    layout = json.loads((p.embeddings_dir / "layout.json").read_text())
    assert layout == {"chunks_per_block": 200, "batch_size": 8, "precision": "bf16"}
    with pytest.raises(RetroRayError, match=r"embedder.batch_size=32 was given but the embeddings in .* are being "
                                            r"made with embedder.batch_size=8; drop the override"):
        embed.run(p, settings={"embedder": {"batch_size": 32}}, progress=False)
    with pytest.raises(RetroRayError, match=r"embed.precision=fp32 was given but the embeddings in .* are being "
                                            r"made in bf16"):
        embed.run(p, C.EmbedRunConfig(precision="fp32"), progress=False)
    assert json.loads(p.config_path.read_text())["embedder"]["batch_size"] == 8  # nothing was recorded
