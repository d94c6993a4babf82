"""Benchmark of ``add-docs`` (knowledge update without retraining) against rebuilding the index.

What is measured, on a copy of a finished project (``--project``; the original is only read):

add-docs, one call     ``add_documents(project, records)`` with ``--docs`` (200) new documents: the
                       default corpus's documents that are not in the project's corpus. The embedder
                       is loaded before the clock starts (its load time is printed apart), as in a
                       server; the report's own breakdown (tokenize, embed, commit, index) is printed.
add-docs, one by one   ``--single`` (20) further documents, one ``add_documents`` call each, as
                       ``POST /documents`` would: latency per call (median, max). Each call rewrites
                       every index file, so this grows with the index.
baseline: rebuild      what adding documents costs without add-docs: prep (with the project's own
                       tokenizer, so no tokenizer training) → db → embed → index of the project's
                       corpus plus the same ``--docs`` documents, in a new project directory, on
                       ``ray.init(num_cpus=2)`` started before the clock. Same settings as the project.

Checked before any number is printed: every added document's first chunk is the top hit for its own
text (``Retriever.local``), and the rebuilt index holds as many vectors as train chunks.

Run:  .venv/bin/python benchmarks/bench_add_docs.py --project /path/to/finished/project
      [--docs 200] [--single 20] [--work-dir /tmp/bench_add_docs]
Writes <work-dir>/bench_add_docs.json. Takes a few minutes on 2 CPUs (most of it the rebuild).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retro_ray.project import Project  # noqa: E402


def new_documents(project: Project, n: int) -> list[dict]:
    """Documents of the default corpus that the project's corpus does not hold."""
    import pyarrow.parquet as pq

    from retro_ray.config import CorpusConfig
    from retro_ray.corpus import IngestStats, iter_raw_documents, normalize_text

    have = set(pq.read_table(project.docs_path, columns=["text"]).column("text").to_pylist())
    out = []
    for title, text in iter_raw_documents(CorpusConfig(), IngestStats()):
        t = normalize_text(text, "NFC")
        if t and t not in have:
            out.append({"title": title, "text": text})
            if len(out) == n:
                break
    if len(out) < n:
        raise SystemExit(f"only {len(out)} documents of the default corpus are not in the project; lower --docs")
    return out


def check_found(project: Project, embedder, first_ids: list[int]) -> None:
    from retro_ray.retrieval.retriever import Retriever

    r = Retriever.local(project, embedder=embedder)
    texts = r.db.texts(np.array(first_ids))
    top = r.search_texts(texts, 1).ids[:, 0]
    hit = float(np.mean(top == np.array(first_ids)))
    print(f"  check: {hit:.1%} of added documents' first chunks are the top hit for their own text", flush=True)
    assert hit > 0.95, hit


def rebuild(project: Project, records: list[dict], work: Path) -> tuple[float, dict]:
    """prep → db → embed → index of corpus + records in a new project; returns (seconds, timings per stage)."""
    import pyarrow.parquet as pq

    from retro_ray.cli import run_stage
    from tests.support import write_jsonl

    table = pq.read_table(project.docs_path, columns=["title", "text"]).to_pydict()
    corpus = [{"title": a, "text": b} for a, b in zip(table["title"], table["text"])] + records
    path = write_jsonl(work / "rebuild_corpus.jsonl", corpus)
    settings = project.read_config_dict()
    settings.pop("_derived")
    settings["corpus"] = {**settings["corpus"], "path": str(path)}
    settings["tokenizer"] = {**settings["tokenizer"], "path": str(project.tokenizer_path)}
    settings["index"] = {**settings["index"], "num_shards": int(project.derived()["index_num_shards"])}
    target = Project(work / "rebuilt")
    if target.root.exists():
        shutil.rmtree(target.root)
    per = {}
    t0 = time.perf_counter()
    for i, stage in enumerate(("prep", "db", "embed", "index")):
        t = time.perf_counter()
        run_stage(stage, target, settings, progress=False, address=None, recorded=i > 0)
        per[stage] = round(time.perf_counter() - t, 2)
    seconds = time.perf_counter() - t0
    from retro_ray.retrieval.index import load_index

    n = load_index(target.added_index_path).ntotal
    assert n == target.derived()["chunks_per_split"]["train"], n
    return seconds, per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", required=True, help="a finished project (index-add done); copied, not changed")
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--single", type=int, default=20)
    ap.add_argument("--work-dir", default="/tmp/bench_add_docs")
    ap.add_argument("--skip-rebuild", action="store_true", help="measure add-docs only")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from retro_ray.stages.add_docs import AddDocsConfig, _project_embedder, add_documents

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    src = Project(args.project)
    src.require("index-add", "bench_add_docs")
    copy = Project(work / "project")
    if copy.root.exists():
        shutil.rmtree(copy.root)
    shutil.copytree(src.root, copy.root, ignore=shutil.ignore_patterns("added", "added_docs.json"))
    records = new_documents(src, args.docs + args.single)
    batch, singles = records[:args.docs], records[args.docs:]
    n_train = int(copy.derived()["chunks_per_split"]["train"])
    print(f"project {src.root}: {n_train} train chunks, index {copy.derived()['index_str']}, "
          f"{copy.derived()['index_num_shards']} shards; adding {len(batch)} + {len(singles)} documents", flush=True)

    t = time.perf_counter()
    embedder = _project_embedder(copy, AddDocsConfig())
    t_load = time.perf_counter() - t
    print(f"embedder load: {t_load:.1f} s ({embedder.precision})", flush=True)
    t = time.perf_counter()
    rep = add_documents(copy, batch, embedder=embedder, progress=False)
    t_batch = time.perf_counter() - t
    c = rep.counts
    print(f"add-docs, one call: {c['docs_added']} docs, {c['chunks_added']} chunks in {t_batch:.2f} s = "
          f"{c['docs_added'] / t_batch:.1f} docs/s, {c['chunks_added'] / t_batch:.1f} chunks/s", flush=True)
    print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in rep.timings.items()), flush=True)
    import pyarrow.parquet as pq

    from retro_ray.retrieval.chunks import read_added_state

    state = read_added_state(copy)
    table = pq.read_table(copy.added_doc_table_path(state["dir"]), columns=["n_chunks"]).to_pydict()
    first = (np.concatenate([[0], np.cumsum(table["n_chunks"])[:-1]]) + n_train).tolist()
    check_found(copy, embedder, first)

    lat = []
    for r in singles:
        t = time.perf_counter()
        add_documents(copy, [r], embedder=embedder, progress=False)
        lat.append(time.perf_counter() - t)
    if lat:
        print(f"add-docs, one by one: {len(lat)} calls, median {statistics.median(lat) * 1000:.0f} ms, "
              f"max {max(lat) * 1000:.0f} ms per document", flush=True)

    result = {"project": str(src.root), "n_train_chunks": n_train, "docs": len(batch), "chunks": c["chunks_added"],
              "embedder_load_s": round(t_load, 2), "add_s": round(t_batch, 2),
              "add_docs_per_s": round(c["docs_added"] / t_batch, 2), "add_timings": {k: round(v, 3) for k, v in rep.timings.items()},
              "single_median_s": round(statistics.median(lat), 3) if lat else None,
              "single_max_s": round(max(lat), 3) if lat else None}
    if not args.skip_rebuild:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            t_rebuild, per = rebuild(src, batch, work)
        finally:
            ray.shutdown()
        print(f"baseline, rebuild prep→index with the new documents: {t_rebuild:.1f} s ({per}) = "
              f"{len(batch) / t_rebuild:.1f} new docs/s", flush=True)
        print(f"add-docs is {t_rebuild / t_batch:.1f}x faster than rebuilding", flush=True)
        result.update({"rebuild_s": round(t_rebuild, 2), "rebuild_stages_s": per, "speedup": round(t_rebuild / t_batch, 2)})
    out = work / "bench_add_docs.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
