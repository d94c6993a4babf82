"""Benchmark of the ``embed`` stage against a one-process loop and against sentence-transformers.

What is timed (all three embed the same chunks: every chunk of db/merged/train.hdf5 and valid.hdf5)
    stage     ``retro_ray.stages.embed.run`` on a copy of the project with the embed outputs removed:
              Ray Data over blocks of chunk ids, an actor pool of ``EmbedChunks`` (h5py read, GPT
              decode, ``Embedder.embed``, ``np.save`` per block). Ray is started before the clock
              (``ray.init(num_cpus=2)`` plus one no-op task per CPU so the worker processes exist);
              everything else is inside the time: Ray Data planning, the actors' start-up (process,
              imports, model load) and the driver's waits.
    plain     one loop in this process over the same blocks doing the same work with the same
              ``Embedder`` (same precision, batch size, max length): h5py read, decode, embed,
              ``np.save``; torch on both cores (``torch.set_num_threads(2)``). The model is loaded
              before the clock (its load time is printed on its own).
    st        ``SentenceTransformer(<bundled model dir>).encode(texts, batch_size=64)`` on the same,
              already decoded texts (decode not timed; its cost is printed), torch on both cores.

Checks: the plain loop's vectors must equal the stage's bit for bit (same groups and precision), and
sentence-transformers' must match them in cosine (min printed).

Diagnostics printed with every run: the machine's CPU utilisation during each timed region (from
/proc/stat, 100% = both cores busy), the load average, the time the stage took to write its first
block, when each block file appeared, and a one-thread embedding rate measured in this process (an
actor runs torch with one thread), so the stage's time can be split into start-up, compute and tail.

Run:  .venv/bin/python benchmarks/bench_embed.py [--project runs/demo] [--work-dir /tmp/bench_embed]
      [--repeat 1]
--project must have finished `db` (its embeddings are not read). Writes <work-dir>/bench_embed.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from benchlib import BlockWatcher, Region, say, start_ray, work_copy

NUM_CPUS = 2
GOAL_VS_PLAIN = 0.9
GOAL_VS_ST = 1.0


# ------------------------------------------------------------------------------------------------
# project copy
# ------------------------------------------------------------------------------------------------
def copy_project_without_embed(src: Path, dst: Path) -> None:
    """config.json, data/, tokenizer/, db/ and the prep/db markers of ``src``; nothing of embed or later."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    for d in ("data", "tokenizer", "db"):
        shutil.copytree(src / d, dst / d, ignore=shutil.ignore_patterns("_blocks", "blocks"))
    (dst / ".stages").mkdir()
    for stage in ("prep", "db"):
        marker = src / ".stages" / f"{stage}.json"
        if not marker.is_file():
            raise SystemExit(f"{src} has not finished `{stage}`; run `retro-ray {stage}` there first")
        shutil.copy2(marker, dst / ".stages" / f"{stage}.json")
    cfg = json.loads((dst / "config.json").read_text())
    for k in ("embed_dim", "embed_precision", "index_str", "index_num_shards", "neighbor_dirs"):
        cfg.get("_derived", {}).pop(k, None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def reset_embed(project) -> None:
    shutil.rmtree(project.embeddings_dir, ignore_errors=True)
    project.clear_done("embed")


# ------------------------------------------------------------------------------------------------
# the three contenders
# ------------------------------------------------------------------------------------------------
def run_stage(project, n_chunks: int) -> dict:
    from retro_ray import config as C
    from retro_ray.stages import embed

    reset_embed(project)
    watcher = BlockWatcher(project.embeddings_dir)
    watcher.start()
    with Region("stage") as r:
        watcher.t0 = r.t0
        report = embed.run(project, C.EmbedRunConfig(), progress=False)
    watcher.stop.set()
    watcher.join()
    assert report.counts["chunks_embedded_this_run"] == n_chunks, report.counts
    timeline = dict(sorted(watcher.seen.items(), key=lambda kv: kv[1]))
    say(f"stage: {n_chunks} chunks, {n_chunks / r.seconds:.1f} chunks/s | {r.line()}")
    say("stage: block files appeared at (s): " + ", ".join(f"{k}@{v:.1f}" for k, v in timeline.items()))
    return {"seconds": r.seconds, "chunks_per_s": n_chunks / r.seconds, "util": r.util,
            "precision": report.counts["precision"], "timeline": timeline,
            "first_block_s": min(timeline.values()) if timeline else None}


def plan(project, per_block: int) -> list[dict]:
    from retro_ray.stages.embed import plan_blocks

    return plan_blocks(project, per_block)


def read_and_decode(project, items: list[dict], datasets: dict, gpt) -> list[list[str]]:
    from retro_ray.retrieval.chunks import decode_chunks

    out = []
    for it in items:
        with h5py.File(project.merged_db_path(it["split"]), "r") as f:
            rows = f["chunks"][it["start"]:it["end"]]
        out.append(decode_chunks(datasets[it["split"]], rows, gpt))
    return out


def run_plain(project, embedder, items: list[dict], datasets: dict, gpt, out_dir: Path) -> dict:
    from retro_ray.project import save_npy_atomic
    from retro_ray.retrieval.chunks import decode_chunks

    n = sum(it["end"] - it["start"] for it in items)
    t_embed = 0.0
    with Region("plain") as r:
        for it in items:
            with h5py.File(project.merged_db_path(it["split"]), "r") as f:
                rows = f["chunks"][it["start"]:it["end"]]
            texts = decode_chunks(datasets[it["split"]], rows, gpt)
            t = time.perf_counter()
            emb = embedder.embed_groups(texts, embedder.cfg.batch_size)  # blocks start on a group edge
            t_embed += time.perf_counter() - t
            save_npy_atomic(out_dir / it["split"] / Path(it["out"]).name, emb)
    say(f"plain loop: {n} chunks, {n / r.seconds:.1f} chunks/s (embed calls {t_embed:.1f} s, "
        f"read+decode+save {r.seconds - t_embed:.1f} s) | {r.line()}")
    return {"seconds": r.seconds, "chunks_per_s": n / r.seconds, "embed_seconds": t_embed, "util": r.util,
            "cores_used": r.own_cpu / r.seconds}


def run_st(st_model, texts: list[str]) -> tuple[dict, np.ndarray]:
    with Region("st") as r:
        emb = st_model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    n = len(texts)
    say(f"sentence-transformers: {n} chunks, {n / r.seconds:.1f} chunks/s | {r.line()}")
    return {"seconds": r.seconds, "chunks_per_s": n / r.seconds, "util": r.util,
            "cores_used": r.own_cpu / r.seconds}, emb


def load_outputs(root: Path, items: list[dict]) -> np.ndarray:
    return np.concatenate([np.load(root / it["split"] / Path(it["out"]).name) for it in items])


# ------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", default="runs/demo", help="a project that has finished `db` (only read)")
    ap.add_argument("--work-dir", default="/tmp/bench_embed")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds; round r runs plain, stage, st (odd rounds in reverse order)")
    ap.add_argument("--one-thread-sample", type=int, default=1024,
                    help="chunks embedded with one torch thread in this process (diagnostic; 0 = skip)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch
    from sentence_transformers import SentenceTransformer

    from retro_ray import config as C
    from retro_ray.embedder import Embedder, EmbedderConfig, resolve_model_dir
    from retro_ray.indexed import IndexedDataset
    from retro_ray.tokenizer import load_tokenizer

    work = Path(args.work_dir)
    project = work_copy(args.project, args.work_dir, copy_project_without_embed, "prep + db only")
    pcfg = project.read_config()
    run_cfg = C.EmbedRunConfig()
    items = plan(project, run_cfg.chunks_per_block)
    n_chunks = sum(it["end"] - it["start"] for it in items)
    say(f"{n_chunks} chunks in {len(items)} blocks of {run_cfg.chunks_per_block} "
        f"(train {sum(it['end'] - it['start'] for it in items if it['split'] == 'train')}, "
        f"valid {sum(it['end'] - it['start'] for it in items if it['split'] == 'valid')})")

    say(f"ray.init(num_cpus={NUM_CPUS}) -- not timed")
    start_ray(NUM_CPUS, warm_workers=True)

    torch.set_num_threads(NUM_CPUS)
    gpt = load_tokenizer(project.tokenizer_path)
    datasets = {s: IndexedDataset(project.token_prefix(s)) for s in ("train", "valid")}
    t = time.perf_counter()
    texts_per_block = read_and_decode(project, items, datasets, gpt)
    t_decode = time.perf_counter() - t
    texts = [x for block in texts_per_block for x in block]
    say(f"read + decode of all chunks in this process: {t_decode:.2f} s ({n_chunks / t_decode:.0f} chunks/s)")

    results: dict = {"n_chunks": n_chunks, "blocks": len(items), "chunks_per_block": run_cfg.chunks_per_block,
                     "decode_seconds": t_decode, "rounds": []}
    # The stage decides its precision in each actor ("auto"); the plain loop must use the same one. On a
    # CPU without native bf16 "auto" is fp32 without trying anything else; check what it picks here.
    t = time.perf_counter()
    probe = Embedder(EmbedderConfig(model_dir=pcfg.embedder.model_dir, max_chunk_length=pcfg.embedder.max_chunk_length,
                                    batch_size=pcfg.embedder.batch_size, precision=run_cfg.precision, device="cpu"))
    t_load = time.perf_counter() - t
    say(f"Embedder load (precision={run_cfg.precision} -> {probe.precision}: {probe.precision_reason}): {t_load:.1f} s")
    embedder = probe
    model_dir = str(resolve_model_dir(pcfg.embedder.model_dir))
    t = time.perf_counter()
    st_model = SentenceTransformer(model_dir, device="cpu")
    st_model.max_seq_length = pcfg.embedder.max_chunk_length
    say(f"SentenceTransformer load: {time.perf_counter() - t:.1f} s (max_seq_length {st_model.max_seq_length}, "
        f"model dtype {next(st_model.parameters()).dtype})")
    if probe.precision != "fp32":
        say(f"NOTE: the stage embeds in {probe.precision}; sentence-transformers runs in fp32")
    results["embedder_load_seconds"] = t_load
    results["precision"] = probe.precision

    if args.one_thread_sample:
        # An actor runs torch with one thread: its rate, measured here on the first block's longest chunks.
        sample = texts_per_block[0][: args.one_thread_sample]
        embedder.embed(sample[:64])
        for threads in (1, NUM_CPUS):
            torch.set_num_threads(threads)
            with Region(f"threads{threads}") as r:
                embedder.embed(sample)
            say(f"diagnostic: Embedder.embed of {len(sample)} chunks with torch threads={threads}: "
                f"{len(sample) / r.seconds:.1f} chunks/s | {r.line()}")
            results[f"rate_threads{threads}"] = len(sample) / r.seconds
        torch.set_num_threads(NUM_CPUS)

    plain_dir = work / "plain_out"
    for rnd in range(args.repeat):
        order = ["plain", "stage", "st"] if rnd % 2 == 0 else ["st", "stage", "plain"]
        say(f"--- round {rnd + 1}/{args.repeat}: {', '.join(order)}")
        res: dict = {}
        for name in order:
            if name == "plain":
                shutil.rmtree(plain_dir, ignore_errors=True)
                res["plain"] = run_plain(project, embedder, items, datasets, gpt, plain_dir)
            elif name == "stage":
                res["stage"] = run_stage(project, n_chunks)
            else:
                res["st"], st_emb = run_st(st_model, texts)
        results["rounds"].append(res)

        stage_emb = load_outputs(project.embeddings_dir, items)
        plain_emb = load_outputs(plain_dir, items)
        diff = float(np.abs(stage_emb - plain_emb).max())
        cos = np.sum(stage_emb * st_emb, axis=1) / (np.linalg.norm(stage_emb, axis=1) * np.linalg.norm(st_emb, axis=1))
        say(f"check: max |stage - plain| = {diff:.2e}; cosine(stage, sentence-transformers) "
            f"min {cos.min():.6f} mean {cos.mean():.6f}")
        assert diff == 0.0, "the stage's vectors differ from the plain loop's (same groups, same precision)"
        res["max_abs_diff_plain"] = diff
        res["min_cos_st"] = float(cos.min())

    # ---- summary ---------------------------------------------------------------------------------
    def med(key: str) -> float:
        return float(np.median([r[key]["chunks_per_s"] for r in results["rounds"]]))

    stage, plain, st = med("stage"), med("plain"), med("st")
    r_plain, r_st = stage / plain, stage / st
    plain_with_load = n_chunks / (float(np.median([r["plain"]["seconds"] for r in results["rounds"]])) + t_load)
    first = [r["stage"]["first_block_s"] for r in results["rounds"]]
    print()
    print(f"embed benchmark: {n_chunks} chunks ({results['precision']}), {len(items)} blocks, "
          f"{args.repeat} round(s), medians")
    print(f"  stage (Ray Data + {NUM_CPUS} EmbedChunks actors, actor start-up included) {stage:8.1f} chunks/s")
    print(f"  plain loop (1 process, torch {NUM_CPUS} threads, model load excluded)   {plain:8.1f} chunks/s"
          f"   ({plain_with_load:.1f} with its {t_load:.1f} s model load)")
    print(f"  sentence-transformers encode(batch_size=64), decode excluded      {st:8.1f} chunks/s")
    print(f"  RATIO stage / plain loop            {r_plain:5.3f}  (goal >= {GOAL_VS_PLAIN}: "
          f"{'met' if r_plain >= GOAL_VS_PLAIN else 'MISSED'}); vs plain incl. model load "
          f"{stage / plain_with_load:5.3f}")
    print(f"  RATIO stage / sentence-transformers {r_st:5.3f}  (goal >= {GOAL_VS_ST}: "
          f"{'met' if r_st >= GOAL_VS_ST else 'MISSED'})")
    if "rate_threads1" in results:
        per_actor = results["rate_threads1"]
        print(f"  one torch thread: {per_actor:.1f} chunks/s; two threads: {results['rate_threads2']:.1f} chunks/s "
              f"(2-thread speed-up {results['rate_threads2'] / per_actor:.2f}x); "
              f"2 actors x 1 thread ideal ~{2 * per_actor:.1f} chunks/s")
    print(f"  stage's first block file after {np.median(first):.1f} s (start-up + one block of compute)")
    results.update(summary={"stage": stage, "plain": plain, "plain_with_load": plain_with_load, "st": st,
                            "ratio_plain": r_plain, "ratio_st": r_st})
    (work / "bench_embed.json").write_text(json.dumps(results, indent=2))
    print(f"  wrote {work / 'bench_embed.json'}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
