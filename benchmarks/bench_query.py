"""Benchmark of the ``query`` stage against a one-process loop, and of RetroDataset against a train step.

Part 1: query stage vs plain loop (same samples, same work, same outputs)
    stage     ``retro_ray.stages.query.run`` on a copy of the project with the query outputs removed and
              ``query.train_samples=--train-samples`` (valid: every sample), default run settings:
              Ray Data over blocks of 256 samples, an actor pool of ``QueryNeighbors`` (decode,
              ``Embedder.embed``, search through ``IndexShard`` actors, same-document filter,
              ``np.save``). Ray is started before the clock (``ray.init(num_cpus=2)`` + one no-op task
              per CPU); the shard actors' and query actors' start-up is inside the time.
    plain     one loop in this process over the same blocks of samples: GPT-decode every chunk of
              every sample, embed with an ``Embedder`` with the same settings (the project's
              recorded precision, batch 64, max length), search the merged ``added.faissindex``
              (same nprobe / efSearch, k = num_neighbors_query), drop candidates from any document
              the sample spans, keep num_neighbors_save (-1 padded). torch and Faiss on both cores.
              Timed twice: the loop alone, and with its set-up (model, index, chunk table loads).
    check     the neighbour ids of both are compared row by row (exact equality rate, and the mean
              overlap of the id sets in rows that differ).
    Goal: stage chunks/s >= 1.0x the plain loop's.

Part 2: RetroDataset vs the demo model's step (CPU)
    ``RetroDataset(project, "train", num_neighbors=2)`` indexed at random (items/s, and the time to
    fetch + collate one micro-batch of 4), against a forward + backward + grad-clip + AdamW step of
    ``RetroModel`` built from retro_ray/conf/train_demo.yaml with the project's seq/chunk length and
    vocabulary (padded to a multiple of 64), micro batch 4, dropout on (with the CPU workers' fast
    masks, cpu_tuning.tune_model), with torch on 2 threads and on 1 thread (the demo's workers have
    one CPU each). Goal: data time per step < 5% of the step.

Run:  .venv/bin/python benchmarks/bench_query.py [--project runs/demo] [--train-samples 1000]
      [--work-dir /tmp/bench_query]
--project must have finished `index` (it is only read). Writes <work-dir>/bench_query.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import BlockWatcher, Region, say, start_ray, work_copy

NUM_CPUS = 2
GOAL_QUERY = 1.0
GOAL_DATA_PCT = 5.0


# ------------------------------------------------------------------------------------------------
# project copy
# ------------------------------------------------------------------------------------------------
def copy_project_without_query(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("query", "_blocks", "blocks"))
    (dst / ".stages" / "query.json").unlink(missing_ok=True)
    for stage in ("index-add", "embed"):
        if not (dst / ".stages" / f"{stage}.json").is_file():
            raise SystemExit(f"{src} has not finished `{stage}`; run `retro-ray index` there first")
    cfg = json.loads((dst / "config.json").read_text())
    cfg.get("_derived", {}).pop("neighbor_dirs", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


# ------------------------------------------------------------------------------------------------
# part 1
# ------------------------------------------------------------------------------------------------
def run_stage(project, train_samples: int) -> tuple[dict, dict]:
    from retro_ray import config as C
    from retro_ray.stages import query

    project.clear_done("query")
    shutil.rmtree(project.query_root, ignore_errors=True)
    # query/<split>_<hash>/<block>.npy -> "<split>/<block number>"
    watcher = BlockWatcher(project.query_root, key=lambda p: f"{p.parent.name.split('_')[0]}/{p.stem.lstrip('0') or '0'}")
    with Region() as r:
        watcher.t0 = r.t0
        watcher.start()
        report = query.run(project, C.QueryRunConfig(), {"query": {"train_samples": train_samples}}, progress=False)
    watcher.stop.set()
    watcher.join()
    n = report.counts["chunks_queried_this_run"]
    say(f"stage: {n} chunks in {r.seconds:.1f} s = {n / r.seconds:.1f} chunks/s | {r.line()}")
    say("stage: block files appeared at (s): " + ", ".join(f"{k}@{v:.1f}" for k, v in
                                                          sorted(watcher.seen.items(), key=lambda kv: kv[1])))
    out = {s: np.concatenate([np.asarray(b) for b in query.load_neighbors(project, s)[0]])
           for s in query.QUERY_SPLITS}
    return {"seconds": r.seconds, "chunks": n, "chunks_per_s": n / r.seconds, "util": r.util}, out


class PlainQuery:
    """Everything the loop needs, loaded once (the set-up is timed separately)."""

    def __init__(self, project, batch_size: int) -> None:
        import faiss

        from retro_ray.embedder import Embedder, EmbedderConfig
        from retro_ray.retrieval.chunks import ChunkDatabase
        from retro_ray.retrieval.index import load_index
        from retro_ray.stages.query import QUERY_SPLITS, make_samples

        faiss.omp_set_num_threads(NUM_CPUS)
        cfg = project.read_config()
        self.cfg = cfg
        precision = str(project.derived().get("embed_precision", "auto")).split(",")[0]
        self.embedder = Embedder(EmbedderConfig(model_dir=cfg.embedder.model_dir,
                                                max_chunk_length=cfg.embedder.max_chunk_length,
                                                batch_size=batch_size, precision=precision, device="cpu"))
        self.index = load_index(project.added_index_path)
        self.db = ChunkDatabase(project, "train")
        self.gpt = self.db.tokenizer
        self.samples = {s: make_samples(project, s) for s in QUERY_SPLITS}
        self.doc_ids = {s: np.load(project.doc_ids_path(s)) for s in QUERY_SPLITS}
        # db chunk id -> global document id, once
        self.chunk_doc = self.doc_ids["train"][self.db.chunks[:, 1].astype(np.int64)]

    def block(self, split: str, start: int, end: int, times: dict) -> np.ndarray:
        from retro_ray.retrieval.index import search
        from retro_ray.stages.query import samples_per_group

        m = self.cfg.chunk_length
        q = self.cfg.query
        t = time.perf_counter()
        spans = [self.samples[split].span(i) for i in range(start, end)]
        per = self.cfg.seq_length // m
        chunks = np.concatenate([sp.tokens[:-1].reshape(per, m) for sp in spans])
        texts = self.gpt.decode_batch(chunks.tolist(), skip_special_tokens=True)
        t1 = time.perf_counter()
        g = samples_per_group(self.cfg) * per  # query chunks embedded and searched together, as the stage does
        emb = self.embedder.embed_groups(texts, g)
        t2 = time.perf_counter()
        ids = np.concatenate([search(self.index, emb[a:a + g], q.num_neighbors_query, nprobe=q.nprobe,
                                     ef_search=q.ef_search)[1] for a in range(0, len(emb), g)])
        t3 = time.perf_counter()
        # Same-document filter: a candidate is dropped when its document is one the sample spans.
        # As in the stage, chunks added later with add-docs (ids >= n_train) are never pretraining neighbours.
        valid = (ids >= 0) & (ids < len(self.chunk_doc))
        cand_doc = np.where(valid, self.chunk_doc[np.where(valid, ids, 0)], -1)
        out = np.full((len(chunks), q.num_neighbors_save), -1, np.int64)
        for s_i, sp in enumerate(spans):
            own = self.doc_ids[split][sp.docs]
            for r in range(s_i * per, (s_i + 1) * per):
                ok = ids[r][valid[r] & ~np.isin(cand_doc[r], own)][: q.num_neighbors_save]
                out[r, : len(ok)] = ok
        t4 = time.perf_counter()
        for key, dt in (("samples+decode", t1 - t), ("embed", t2 - t1), ("search", t3 - t2), ("filter", t4 - t3)):
            times[key] = times.get(key, 0.0) + dt
        return out


def run_plain(project, train_samples: int, samples_per_block: int, batch_size: int) -> tuple[dict, dict]:
    from retro_ray.stages.query import QUERY_SPLITS

    t0 = time.perf_counter()
    pq = PlainQuery(project, batch_size)
    t_setup = time.perf_counter() - t0
    times: dict = {}
    outs = {}
    with Region() as r:
        for split in QUERY_SPLITS:
            n = len(pq.samples[split])
            outs[split] = np.concatenate([pq.block(split, lo, min(lo + samples_per_block, n), times)
                                          for lo in range(0, n, samples_per_block)])
    n_chunks = sum(len(v) for v in outs.values())
    say(f"plain loop: {n_chunks} chunks in {r.seconds:.1f} s = {n_chunks / r.seconds:.1f} chunks/s "
        f"(+ set-up {t_setup:.1f} s -> {n_chunks / (r.seconds + t_setup):.1f} chunks/s) | {r.line()}")
    say("plain loop breakdown: " + ", ".join(f"{k} {v:.1f} s ({100 * v / r.seconds:.0f}%)" for k, v in times.items()))
    return {"seconds": r.seconds, "setup_s": t_setup, "chunks": n_chunks, "chunks_per_s": n_chunks / r.seconds,
            "chunks_per_s_with_setup": n_chunks / (r.seconds + t_setup), "breakdown": times, "util": r.util}, outs


def diagnostics(project, batch_size: int) -> dict:
    """Where a query actor's time goes: its set-up, and one block's search through the shard actors
    (as the stage does, 0.25-CPU actors) vs the merged index in this process, same embeddings."""
    import faiss

    from retro_ray.retrieval.index import load_index, search
    from retro_ray.retrieval.retriever import Retriever
    from retro_ray.retrieval.shards import ShardedIndex
    from retro_ray.stages.query import QUERY_SPLITS, make_samples

    out = {}
    cfg = project.read_config()
    t = time.perf_counter()
    sharded = ShardedIndex.from_paths(project.shard_paths())
    out["shard_actors_start_s"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        retr = Retriever(project, sharded, device="cpu", batch_size=batch_size)
        {s: make_samples(project, s) for s in QUERY_SPLITS}
        out["query_actor_state_s"] = time.perf_counter() - t
        samples = make_samples(project, "train")
        m = cfg.chunk_length
        chunks = np.concatenate([samples.span(i).tokens[:-1].reshape(-1, m) for i in range(256)])
        texts = retr.db.tokenizer.decode_batch(chunks.tolist(), skip_special_tokens=True)
        emb = retr.embedder.embed(texts[:64])
        emb = retr.embedder.embed(texts)
        k = cfg.query.num_neighbors_query
        merged = load_index(project.added_index_path)
        for threads in (1, NUM_CPUS):
            faiss.omp_set_num_threads(threads)
            t = time.perf_counter()
            search(merged, emb, k, nprobe=cfg.query.nprobe, ef_search=cfg.query.ef_search)
            out[f"search_merged_{threads}thr_s"] = time.perf_counter() - t
        faiss.omp_set_num_threads(NUM_CPUS)
        t = time.perf_counter()
        sharded.search(emb, k, nprobe=cfg.query.nprobe, ef_search=cfg.query.ef_search)
        out["search_sharded_s"] = time.perf_counter() - t
        out["block_chunks"] = len(emb)
    finally:
        sharded.shutdown()
    say(f"diagnostics: {len(project.shard_paths())} shard actors start in {out['shard_actors_start_s']:.1f} s; "
        f"a query actor's state (Embedder, ChunkDatabase, samples) {out['query_actor_state_s']:.1f} s in-process; "
        f"search of one block ({out['block_chunks']} chunks, k={k}): shard actors {out['search_sharded_s']:.2f} s, "
        f"merged index in-process {out['search_merged_1thr_s']:.2f} s (1 thread) / "
        f"{out[f'search_merged_{NUM_CPUS}thr_s']:.2f} s ({NUM_CPUS} threads)")
    return out


def compare(stage: dict, plain: dict) -> dict:
    res = {}
    for split in stage:
        a, b = stage[split], plain[split]
        assert a.shape == b.shape, (split, a.shape, b.shape)
        same = np.all(a == b, axis=1)
        overlap = [len(np.intersect1d(x[x >= 0], y[y >= 0])) / max(1, (x >= 0).sum()) for x, y in zip(a[~same], b[~same])]
        res[split] = {"rows": len(a), "identical_rows": float(same.mean()),
                      "overlap_in_differing_rows": float(np.mean(overlap)) if overlap else 1.0,
                      "filled": float((a >= 0).mean())}
        say(f"check {split}: {len(a)} rows, identical {100 * same.mean():.2f}%"
            + (f"; differing rows share {100 * np.mean(overlap):.1f}% of their ids" if overlap else "")
            + f"; {100 * (a >= 0).mean():.1f}% of neighbour slots filled")
    return res


# ------------------------------------------------------------------------------------------------
# part 2
# ------------------------------------------------------------------------------------------------
def dataset_and_step(project, n_items: int, steps: int, seed: int) -> dict:
    import torch

    from retro_ray.model.retro import RetroModel
    from retro_ray.train.config import load_train_config, resolve_model_config
    from retro_ray.train.cpu_tuning import tune_model
    from retro_ray.train.dataset import RetroDataset
    from retro_ray.train.loop import collate, param_groups

    torch.set_num_threads(NUM_CPUS)
    ds = RetroDataset(project, "train", num_neighbors=2)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ds), n_items)
    ds[int(idx[0])]
    t = time.perf_counter()
    for i in idx:
        ds[int(i)]
    t_items = time.perf_counter() - t
    items_per_s = n_items / t_items
    tcfg = load_train_config("demo")
    mb = tcfg.model.micro_batch_size
    t = time.perf_counter()
    batches = [collate([ds[int(i)] for i in rng.integers(0, len(ds), mb)]) for _ in range(50)]
    data_per_step = (time.perf_counter() - t) / 50
    pcfg = project.read_config()
    mcfg = resolve_model_config(tcfg, pcfg.seq_length, pcfg.chunk_length, int(project.derived()["vocab_size"]))
    say(f"RetroDataset train: {len(ds)} samples, k=2: {items_per_s:.0f} items/s at random ({1e3 / items_per_s:.2f} ms "
        f"an item); fetch + collate of a micro-batch of {mb}: {1e3 * data_per_step:.2f} ms")
    say(f"model from train_demo.yaml: {mcfg.num_layers} layers, d={mcfg.hidden_size}, heads "
        f"{mcfg.num_attention_heads}, ffn {mcfg.ffn_hidden_size}, seq {mcfg.seq_length}, chunk {mcfg.chunk_length}, "
        f"retro layers {mcfg.decoder_retro_layers}, k={mcfg.retro.retro_num_neighbors}, vocab {mcfg.vocab_size}")
    res = {"items_per_s": items_per_s, "data_ms_per_step": 1e3 * data_per_step, "micro_batch": mb, "steps": {}}
    o = tcfg.model.optim
    for threads in (NUM_CPUS, 1):
        torch.manual_seed(0)
        torch.set_num_threads(threads)
        model = tune_model(RetroModel(mcfg)).train()  # as retro-ray train's CPU workers
        opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        times = []
        for s in range(steps + 2):
            b = batches[s % len(batches)]
            t = time.perf_counter()
            out = model(**b)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.trainer.gradient_clip_val)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if s >= 2:
                times.append(time.perf_counter() - t)
        step = float(np.median(times))
        pct = 100 * data_per_step / step
        res["steps"][threads] = {"step_ms": 1e3 * step, "data_pct": pct}
        say(f"train step (fwd+bwd+clip+AdamW, micro batch {mb}, torch {threads} thread(s), "
            f"{model.num_parameters() / 1e6:.1f}M params): {1e3 * step:.0f} ms median of {steps}; "
            f"data {1e3 * data_per_step:.2f} ms = {pct:.2f}% of the step")
    torch.set_num_threads(NUM_CPUS)
    return res


# ------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", default="runs/demo", help="a project that has finished `index` (only read)")
    ap.add_argument("--train-samples", type=int, default=1000)
    ap.add_argument("--work-dir", default="/tmp/bench_query")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; odd rounds run the plain loop first")
    ap.add_argument("--items", type=int, default=2000, help="random RetroDataset items to time")
    ap.add_argument("--steps", type=int, default=8, help="timed train steps per thread count")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch

    from retro_ray import config as C

    work = Path(args.work_dir)
    project = work_copy(args.project, args.work_dir, copy_project_without_query, "without query outputs")
    # Both sides read the sample count from config.json: record it before either runs.
    project.check_overrides({"query": {"train_samples": args.train_samples}}, changeable=("query.",))
    qrun = C.QueryRunConfig()
    say(f"index {project.derived().get('index_str')}, {project.derived().get('index_num_shards')} shards; "
        f"query settings {C.to_dict(project.read_config().query)}; run settings {C.to_dict(qrun)}")

    say(f"ray.init(num_cpus={NUM_CPUS}) -- not timed")
    start_ray(NUM_CPUS, warm_workers=True)
    torch.set_num_threads(NUM_CPUS)

    rounds = []
    for rnd in range(args.repeat):
        order = ["stage", "plain"] if rnd % 2 == 0 else ["plain", "stage"]
        say(f"--- round {rnd + 1}/{args.repeat}: {', '.join(order)}")
        res, outs = {}, {}
        for who in order:
            if who == "stage":
                res["stage"], outs["stage"] = run_stage(project, args.train_samples)
            else:
                res["plain"], outs["plain"] = run_plain(project, args.train_samples, qrun.samples_per_block,
                                                        project.read_config().embedder.batch_size)
        res["check"] = compare(outs["stage"], outs["plain"])
        rounds.append(res)
    diag = diagnostics(project, project.read_config().embedder.batch_size)
    ray.shutdown()

    say("part 2: RetroDataset vs train step")
    part2 = dataset_and_step(project, args.items, args.steps, args.seed)

    stage = float(np.median([r["stage"]["chunks_per_s"] for r in rounds]))
    plain = float(np.median([r["plain"]["chunks_per_s"] for r in rounds]))
    plain_setup = float(np.median([r["plain"]["chunks_per_s_with_setup"] for r in rounds]))
    ratio = stage / plain
    print()
    print(f"query benchmark: {rounds[0]['stage']['chunks']} chunks ({args.train_samples} train samples + all valid), "
          f"{args.repeat} round(s), medians")
    print(f"  stage (Ray Data + query actors + IndexShard actors, start-up included) {stage:8.1f} chunks/s")
    print(f"  plain loop (1 process, torch+faiss {NUM_CPUS} threads, set-up excluded)   {plain:8.1f} chunks/s "
          f"({plain_setup:.1f} with set-up)")
    print(f"  RATIO stage / plain loop {ratio:5.3f} (goal >= {GOAL_QUERY}: {'met' if ratio >= GOAL_QUERY else 'MISSED'}); "
          f"vs plain incl. set-up {stage / plain_setup:5.3f}")
    chk = rounds[-1]["check"]
    print("  neighbour ids identical: " + ", ".join(f"{s} {100 * v['identical_rows']:.2f}% of rows" for s, v in chk.items()))
    print(f"  RetroDataset: {part2['items_per_s']:.0f} items/s; data per micro-batch of {part2['micro_batch']}: "
          f"{part2['data_ms_per_step']:.2f} ms")
    for threads, st in part2["steps"].items():
        print(f"  train step, torch {threads} thread(s): {st['step_ms']:.0f} ms; data = {st['data_pct']:.2f}% of it "
              f"(goal < {GOAL_DATA_PCT}%: {'met' if st['data_pct'] < GOAL_DATA_PCT else 'MISSED'})")
    out = {"rounds": rounds, "diagnostics": diag, "part2": part2, "summary": {"stage": stage, "plain": plain, "ratio": ratio}}
    (work / "bench_query.json").write_text(json.dumps(out, indent=2, default=float))
    print(f"  wrote {work / 'bench_query.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
