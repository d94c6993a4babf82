"""Benchmark of stage 1: ``prep`` (tokens) + ``db`` (chunk database) against a single-process loop.

What is timed
    pipeline  ``retro_ray.stages.prep.run`` then ``retro_ray.stages.db.run`` on a fresh project
              directory: ingest (JSONL -> normalised, de-duplicated docs.parquet), split, tokenizer
              (copying the given tokenizer.json), tokenization in Ray tasks into per-block files, merge
              into Megatron .bin/.idx, chunking in Ray tasks (64-token chunks + each chunk's wordpiece
              length), merge into db/merged/{train,valid,sampled}.hdf5.
    baseline  one Python loop in the driver process doing the same work with the same libraries:
              stream the JSONL, normalise, drop empty/duplicate docs, HF ``encode_batch`` (+ EOD),
              write .bin/.idx per split, numpy chunking, ``decode_batch`` + wordpiece
              ``encode_batch`` for bert_len, h5py writes of the same three hdf5 files.

Both sides use the same tokenizer.json, trained once up front (timed separately, not part of either
total), and the same seeded split; the benchmark asserts that their outputs are identical (token
files byte for byte, chunk tables element for element) before it reports a single number.

Ray is started once, ``ray.init(num_cpus=2, include_dashboard=False)``, before anything is timed,
and one no-op task per CPU is run so that the worker processes exist; that start-up is excluded.
Everything else (Ray Data planning, worker-side imports and tokenizer loads, the driver's waits) is
inside the pipeline's time.

Memory: the pipeline is run again at each of ``--sizes`` (MB of text) on a freshly started Ray, and
a thread samples every 0.2 s (a) the driver's RSS, (b) the sum of RSS and the sum of PSS over the
driver and all its descendants -- the Ray daemons (gcs_server, raylet, agents) and the Ray worker
processes ("ray::..." in their command line), which are children of the raylet, which is a child of
the driver -- and (c) that sum restricted to the worker processes. The driver's kernel high-water
mark (VmHWM, reset before each run through /proc/self/clear_refs) is reported too. RSS counts the
pages of the shared object store and of memory-mapped files in every process that touches them;
PSS divides shared pages between their users, so the PSS sum is the tree's real footprint.

Run:  .venv/bin/python benchmarks/bench_prep_db.py [--work-dir DIR] [--target-mb 40] [--repeat 1]
      [--sizes 20,40] [--skip-memory]
Writes <work-dir>/bench_prep_db.json.
"""

from __future__ import annotations

import argparse
import filecmp
import gc
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from retro_ray import config as C
from retro_ray.chunking import chunk_bounds
from retro_ray.corpus import IngestStats, iter_raw_documents, normalize_text
from retro_ray.embedder import load_wordpiece_tokenizer
from retro_ray.indexed import IndexedDatasetWriter
from retro_ray.project import SPLITS, Project
from retro_ray.stages import db as db_stage
from retro_ray.stages import prep as prep_stage
from retro_ray.stages.db import DB_SPLITS, sample_chunks
from retro_ray.stages.prep import assign_splits
from retro_ray.tokenizer import token_dtype, train_tokenizer

MB = 1_000_000  # corpus sizes are in decimal megabytes of UTF-8 text
NUM_CPUS = 2
SAMPLE_EVERY_S = 0.2
BASELINE_BATCH = 2000  # documents per encode_batch call in the baseline


# ------------------------------------------------------------------------------------------------
# corpus and tokenizer
# ------------------------------------------------------------------------------------------------
def build_corpus(path: Path, target_mb: float, copies: int | None = None) -> dict:
    """Write the default corpus, repeated until it holds ``target_mb`` MB of text (or ``copies``
    times), as JSONL.

    Copy 0 is the corpus as shipped; copy k > 0 prefixes every document with "Copy k." so that no
    document of one copy is an exact duplicate of a document of another.
    """
    meta_path = path.with_suffix(".meta.json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta.get("target_mb") == target_mb and meta.get("file_bytes") == path.stat().st_size
                and copies in (None, meta.get("copies"))):
            return meta
    docs = list(iter_raw_documents(C.CorpusConfig(), IngestStats()))
    copy_bytes = sum(len(t.encode("utf-8")) for _, t in docs)
    copies = copies or max(1, math.ceil(target_mb * MB / copy_bytes))
    text_bytes = n_docs = 0
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for k in range(copies):
            for title, text in docs:
                if k:
                    text = f"Copy {k}. {text}"
                    title = f"{title} ({k})"
                f.write(json.dumps({"title": title, "text": text}, ensure_ascii=False))
                f.write("\n")
                text_bytes += len(text.encode("utf-8"))
                n_docs += 1
    os.replace(tmp, path)
    meta = {"target_mb": target_mb, "copies": copies, "docs": n_docs, "text_bytes": text_bytes,
            "file_bytes": path.stat().st_size}
    meta_path.write_text(json.dumps(meta))
    return meta


def train_shared_tokenizer(path: Path, vocab_size: int = 8192) -> float:
    """Train byte-level BPE on the first copy of the corpus; seconds taken (0 when it already exists)."""
    if path.is_file():
        return 0.0
    t0 = time.perf_counter()
    texts = (normalize_text(t, "NFC") for _, t in iter_raw_documents(C.CorpusConfig(), IngestStats()))
    tok = train_tokenizer((t for t in texts if t), C.TokenizerConfig(vocab_size=vocab_size), progress=False)
    tok.save(str(path))
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# CPU accounting: this machine may be shared, so say how much CPU others took during each run
# ------------------------------------------------------------------------------------------------
def _tree_cpu_s() -> dict[int, float]:
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


class CpuMeter:
    """CPU-seconds used by this process tree, and by every other process, between enter and exit."""

    def __enter__(self):
        import psutil

        self._sys0 = psutil.cpu_times()
        self._tree0 = _tree_cpu_s()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import psutil

        wall = time.perf_counter() - self._t0
        sys1 = psutil.cpu_times()

        def busy(t) -> float:
            return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)

        tree1 = _tree_cpu_s()
        ours = sum(v - self._tree0.get(pid, 0.0) for pid, v in tree1.items())
        self.result = {"wall_s": wall, "ours_cpu_s": ours,
                       "others_cpu_s": max(0.0, busy(sys1) - busy(self._sys0) - ours),
                       "steal_s": getattr(sys1, "steal", 0.0) - getattr(self._sys0, "steal", 0.0)}


# ------------------------------------------------------------------------------------------------
# the two sides
# ------------------------------------------------------------------------------------------------
def run_pipeline(project_dir: Path, cfg: C.ProjectConfig, prep_run: C.PrepRunConfig,
                 db_run: C.DbRunConfig) -> dict:
    t0 = time.perf_counter()
    prep_report = prep_stage.run(Project(project_dir), prep_run, cfg, progress=False)
    t1 = time.perf_counter()
    db_report = db_stage.run(Project(project_dir), db_run, progress=False)
    t2 = time.perf_counter()
    phases = {f"prep.{k}": v for k, v in prep_report.timings.items()}
    phases["prep.other"] = (t1 - t0) - sum(prep_report.timings.values())
    phases.update({f"db.{k}": v for k, v in db_report.timings.items()})
    phases["db.other"] = (t2 - t1) - sum(db_report.timings.values())
    counts = prep_report.counts
    return {"total_s": t2 - t0, "phases": phases,
            "tokens": sum(int(counts[f"{s}_tokens"]) for s in SPLITS),
            "docs": int(counts["documents_kept"]),
            "prep_counts": prep_report.counts, "db_counts": db_report.counts}


def _write_h5(path: Path, datasets: dict[str, np.ndarray]) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name, arr in datasets.items():
            f.create_dataset(name, data=arr, track_times=False)


def run_baseline(out_dir: Path, cfg: C.ProjectConfig, tokenizer_path: Path) -> dict:
    """The same outputs as the pipeline from one loop in this process (no Ray, no intermediate files)."""
    from tokenizers import Tokenizer

    phases = dict.fromkeys(["read+normalise", "gpt encode", "write bin/idx", "chunk+decode",
                            "wordpiece", "write hdf5"], 0.0)
    t_start = time.perf_counter()

    # read, normalise, drop empty and duplicate documents
    t0 = time.perf_counter()
    texts: list[str] = []
    seen: set[str] = set()
    form = cfg.corpus.normalization
    with open(cfg.corpus.path, encoding="utf-8") as f:
        for line in f:
            text = normalize_text(json.loads(line)[cfg.corpus.text_field] or "", form)
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
    del seen
    phases["read+normalise"] += time.perf_counter() - t0
    split_of = assign_splits(len(texts), cfg.split_fractions(), cfg.seed)
    gpt = Tokenizer.from_file(str(tokenizer_path))
    bert = load_wordpiece_tokenizer(cfg.embedder.model_dir)
    eod = gpt.token_to_id(cfg.tokenizer.eod_token)
    dtype = np.dtype(token_dtype(gpt.get_vocab_size()))

    tokens = 0
    chunk_tables: dict[str, np.ndarray] = {}
    for s, name in enumerate(SPLITS):
        split_texts = [texts[i] for i in np.flatnonzero(split_of == s)]
        writer = IndexedDatasetWriter(out_dir / "data" / name, dtype)
        rows = []
        for first in range(0, len(split_texts), BASELINE_BATCH):
            batch = split_texts[first:first + BASELINE_BATCH]
            t0 = time.perf_counter()
            ids = [e.ids for e in gpt.encode_batch(batch, add_special_tokens=False)]
            t1 = time.perf_counter()
            text_lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            flat = np.empty(int(text_lengths.sum()) + len(ids), dtype=dtype)
            pos = 0
            for x in ids:
                flat[pos:pos + len(x)] = x
                flat[pos + len(x)] = eod
                pos += len(x) + 1
            writer.add_documents(flat, text_lengths + 1)
            tokens += len(flat)
            t2 = time.perf_counter()
            phases["gpt encode"] += t1 - t0
            phases["write bin/idx"] += t2 - t1
            if name not in DB_SPLITS:
                continue
            doc, start, end = chunk_bounds(text_lengths, cfg.chunk_length)
            pieces = [ids[d][a:b] for d, a, b in zip(doc.tolist(), start.tolist(), end.tolist())]
            chunk_texts = gpt.decode_batch(pieces, skip_special_tokens=True)
            t3 = time.perf_counter()
            # bert.encode_batch itself, not retro_ray.embedder.wordpiece_lengths: the baseline stays the
            # plain library call even if the project's helper changes.
            bert_len = np.fromiter((len(e.ids) for e in bert.encode_batch(chunk_texts, add_special_tokens=False)),
                                   dtype=np.int64, count=len(chunk_texts))
            t4 = time.perf_counter()
            table = np.empty((len(doc), 5), dtype=np.uint32)
            table[:, 0] = 0
            table[:, 1] = doc + first
            table[:, 2] = start
            table[:, 3] = end
            table[:, 4] = np.minimum(bert_len, np.iinfo(np.uint32).max)
            rows.append(table)
            phases["chunk+decode"] += t3 - t2
            phases["wordpiece"] += t4 - t3
        t0 = time.perf_counter()
        writer.finalize()
        phases["write bin/idx"] += time.perf_counter() - t0
        if name in DB_SPLITS:
            t0 = time.perf_counter()
            chunks = np.concatenate(rows) if rows else np.zeros((0, 5), np.uint32)
            n_docs = len(split_texts)
            doc_offsets = np.zeros((n_docs, 3), dtype=np.uint64)
            doc_offsets[:, 1] = np.arange(n_docs)
            doc_offsets[:, 2] = np.cumsum(np.bincount(chunks[:, 1].astype(np.int64), minlength=n_docs))
            _write_h5(out_dir / "db" / f"{name}.hdf5", {
                "chunks": chunks, "doc_offsets": doc_offsets,
                "n_written": np.array([len(chunks)], dtype=np.uint64)})
            if name == "train":
                ids_sampled = sample_chunks(len(chunks), cfg.index.ntrain, cfg.seed)
                _write_h5(out_dir / "db" / "sampled.hdf5",
                          {"chunks": chunks[ids_sampled], "chunk_ids": ids_sampled})
            chunk_tables[name] = chunks
            phases["write hdf5"] += time.perf_counter() - t0
    total = time.perf_counter() - t_start
    phases["other"] = total - sum(phases.values())
    return {"total_s": total, "phases": phases, "tokens": tokens, "docs": len(texts),
            "chunks": {k: len(v) for k, v in chunk_tables.items()},
            "bert_len_total": {k: int(v[:, 4].sum(dtype=np.int64)) for k, v in chunk_tables.items()}}


def check_same_outputs(project_dir: Path, baseline_dir: Path) -> dict:
    """Assert that both sides did the same work: identical token files and chunk tables."""
    import h5py

    project = Project(project_dir)
    for name in SPLITS:
        for ext in (".bin", ".idx"):
            a = project.token_prefix(name).with_suffix(ext)
            b = (baseline_dir / "data" / name).with_suffix(ext)
            assert filecmp.cmp(a, b, shallow=False), f"{a} and {b} differ"
    summary = {}
    for name in (*DB_SPLITS, "sampled"):
        with h5py.File(project.merged_db_path(name), "r") as fa, h5py.File(baseline_dir / "db" / f"{name}.hdf5", "r") as fb:
            for key in fa:
                assert np.array_equal(fa[key][()], fb[key][()]), f"{name}.hdf5/{key} differs"
            chunks = fa["chunks"][()]
            summary[name] = {"chunks": len(chunks), "bert_len_total": int(chunks[:, 4].sum(dtype=np.int64))}
    return summary


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MemorySampler:
    """Samples the RSS/PSS of the driver and of its process tree every ``interval`` seconds."""

    def __init__(self, interval: float = SAMPLE_EVERY_S) -> None:
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.me = psutil.Process()
        self.peak = {"driver_rss": 0, "tree_rss": 0, "tree_pss": 0, "workers_rss": 0, "workers_pss": 0}
        self.max_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> dict:
        ps = self._psutil
        now = {"driver_rss": self.me.memory_info().rss, "tree_rss": 0, "tree_pss": 0,
               "workers_rss": 0, "workers_pss": 0}
        procs = [self.me] + self.me.children(recursive=True)
        for p in procs:
            try:
                info = p.memory_full_info()  # rss and pss (from smaps_rollup)
                worker = " ".join(p.cmdline()).startswith("ray::")
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                continue
            now["tree_rss"] += info.rss
            now["tree_pss"] += getattr(info, "pss", info.rss)
            if worker:
                now["workers_rss"] += info.rss
                now["workers_pss"] += getattr(info, "pss", info.rss)
        self.max_processes = max(self.max_processes, len(procs))
        return now

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = self.sample()
            self.samples += 1
            for k, v in now.items():
                self.peak[k] = max(self.peak[k], v)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.idle = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def start_ray() -> float:
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=NUM_CPUS, include_dashboard=False, logging_level=logging.WARNING)

    @ray.remote(num_cpus=1)
    def _noop() -> int:
        return os.getpid()

    ray.get([_noop.remote() for _ in range(NUM_CPUS)])
    return time.perf_counter() - t0


def project_config(corpus_path: Path, tokenizer_path: Path) -> C.ProjectConfig:
    return C.ProjectConfig(corpus=C.CorpusConfig(path=str(corpus_path)),
                           tokenizer=C.TokenizerConfig(path=str(tokenizer_path)))


def _fmt_cpu(c: dict) -> str:
    return (f"(CPU-s: ours {c['ours_cpu_s']:.1f} = {c['ours_cpu_s'] / c['wall_s']:.2f} cores busy; "
            f"other processes on the machine {c['others_cpu_s']:.1f})")


def _fmt_phases(phases: dict[str, float]) -> str:
    return "\n".join(f"    {k:<22} {v:8.2f} s" for k, v in phases.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where the corpus, tokenizer, projects and the JSON result go (default: a new temp dir)")
    ap.add_argument("--target-mb", type=float, default=40.0, help="MB of text in the timed corpus (default 40)")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs of each side (default 1); the median is reported")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated corpus sizes in MB for the memory runs (default: target/2,target)")
    ap.add_argument("--skip-memory", action="store_true", help="skip the memory runs")
    ap.add_argument("--docs-per-block", type=int, default=None,
                    help="prep/db docs_per_block for the pipeline (default: the project's default, 2000)")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_prep_db."))
    work = work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs = work / "runs"
    prep_run = C.PrepRunConfig() if args.docs_per_block is None else C.PrepRunConfig(docs_per_block=args.docs_per_block)
    db_run = C.DbRunConfig() if args.docs_per_block is None else C.DbRunConfig(docs_per_block=args.docs_per_block)
    result: dict = {"machine": {"cpus": os.cpu_count(), "ray_num_cpus": NUM_CPUS, "python": sys.version.split()[0]},
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "prep_run": C.to_dict(prep_run), "db_run": C.to_dict(db_run)}

    print(f"work dir: {work}", flush=True)
    corpus_path = work / f"corpus_{args.target_mb:g}mb.jsonl"
    meta = build_corpus(corpus_path, args.target_mb)
    tokenizer_path = work / "tokenizer.json"
    tok_s = train_shared_tokenizer(tokenizer_path)
    result["corpus"] = {"path": str(corpus_path), **meta}
    result["tokenizer_training_s"] = tok_s
    cfg = project_config(corpus_path, tokenizer_path)

    ray_s = start_ray()
    result["ray_startup_s"] = ray_s

    pipe_runs, base_runs = [], []
    for r in range(args.repeat):
        shutil.rmtree(runs, ignore_errors=True)
        gc.collect()
        with CpuMeter() as cpu:
            pipe_runs.append(run_pipeline(runs / "pipeline", cfg, prep_run, db_run))
        pipe_runs[-1]["cpu"] = cpu.result
        print(f"  repeat {r + 1}/{args.repeat}: pipeline {pipe_runs[-1]['total_s']:.2f} s {_fmt_cpu(cpu.result)}",
              flush=True)
        gc.collect()
        with CpuMeter() as cpu:
            base_runs.append(run_baseline(runs / "baseline", cfg, tokenizer_path))
        base_runs[-1]["cpu"] = cpu.result
        print(f"  repeat {r + 1}/{args.repeat}: baseline {base_runs[-1]['total_s']:.2f} s {_fmt_cpu(cpu.result)}",
              flush=True)
        same = check_same_outputs(runs / "pipeline", runs / "baseline")
        p_counts = pipe_runs[-1]["db_counts"]
        b = base_runs[-1]
        assert p_counts["train_chunks"] == b["chunks"]["train"] == same["train"]["chunks"]
        assert b["bert_len_total"]["train"] == same["train"]["bert_len_total"]
        assert pipe_runs[-1]["tokens"] == b["tokens"] and pipe_runs[-1]["docs"] == b["docs"]
    shutil.rmtree(runs, ignore_errors=True)

    def median_run(rs: list[dict]) -> dict:
        return sorted(rs, key=lambda x: x["total_s"])[len(rs) // 2]

    pipe, base = median_run(pipe_runs), median_run(base_runs)
    tokens = pipe["tokens"]
    pipe_tps, base_tps = tokens / pipe["total_s"], tokens / base["total_s"]
    result["pipeline"] = {"median": pipe, "totals_s": [x["total_s"] for x in pipe_runs], "tokens_per_s": pipe_tps}
    result["baseline"] = {"median": base, "totals_s": [x["total_s"] for x in base_runs], "tokens_per_s": base_tps}
    result["equal_outputs"] = same
    result["ratio_pipeline_over_baseline_tokens_per_s"] = pipe_tps / base_tps

    print()
    print("== prep + db benchmark ==")
    print(f"corpus: {meta['text_bytes'] / MB:.1f} MB of text ({meta['file_bytes'] / MB:.1f} MB JSONL), "
          f"{meta['copies']} copies of the default corpus, {meta['docs']:,} docs read, "
          f"{pipe['docs']:,} kept, {tokens:,} tokens (EOD included)")
    print(f"train chunks: {same['train']['chunks']:,} (bert_len total {same['train']['bert_len_total']:,}), "
          f"valid chunks: {same['valid']['chunks']:,}; outputs of both sides identical (asserted)")
    print(f"tokenizer training (once, shared, not timed below): {tok_s:.2f} s"
          + (" (reused from the work dir)" if tok_s == 0 else ""))
    print(f"Ray start-up (ray.init(num_cpus={NUM_CPUS}) + one no-op task per CPU, excluded): {ray_s:.2f} s")
    print(f"pipeline (Ray tasks, prep.docs_per_block={prep_run.docs_per_block}, "
          f"db.docs_per_block={db_run.docs_per_block}), median of {args.repeat}:")
    print(_fmt_phases(pipe["phases"]))
    print(f"    {'total':<22} {pipe['total_s']:8.2f} s   ({pipe_tps:,.0f} tokens/s)"
          f"   runs: {', '.join(f'{x:.2f}' for x in result['pipeline']['totals_s'])}")
    print(f"    {_fmt_cpu(pipe['cpu'])}")
    print(f"baseline (single process, same tokenizers), median of {args.repeat}:")
    print(_fmt_phases(base["phases"]))
    print(f"    {'total':<22} {base['total_s']:8.2f} s   ({base_tps:,.0f} tokens/s)"
          f"   runs: {', '.join(f'{x:.2f}' for x in result['baseline']['totals_s'])}")
    print(f"    {_fmt_cpu(base['cpu'])}")
    best_p, best_b = min(x["total_s"] for x in pipe_runs), min(x["total_s"] for x in base_runs)
    result["ratio_best_runs"] = best_b / best_p
    print(f"ratio pipeline/baseline tokens/s: {pipe_tps / base_tps:.2f} (medians), {best_b / best_p:.2f} (best runs)"
          f"  (goal >= 1.3 on {NUM_CPUS} cores)")
    others = max(x["cpu"]["others_cpu_s"] / x["cpu"]["wall_s"] for x in pipe_runs + base_runs)
    if others > 0.1:
        print(f"WARNING: other processes kept up to {others:.2f} cores busy during these runs; wall times are "
              "inflated and the ratio is unreliable (see the CPU-s lines).")

    if not args.skip_memory:
        import ray

        sizes = ([float(s) for s in args.sizes.split(",")] if args.sizes
                 else [args.target_mb / 2, args.target_mb])
        mem_rows = []
        for size in sizes:
            path = work / f"corpus_{size:g}mb.jsonl"
            m = build_corpus(path, size)
            # A fresh Ray per size: workers cache tokenizers and memory maps between tasks.
            ray.shutdown()
            start_ray()
            shutil.rmtree(runs, ignore_errors=True)
            gc.collect()
            hwm_ok = _reset_hwm()
            with MemorySampler() as sampler:
                run = run_pipeline(runs / "pipeline", project_config(path, tokenizer_path), prep_run, db_run)
            shutil.rmtree(runs, ignore_errors=True)
            row = {"target_mb": size, "text_mb": m["text_bytes"] / MB, "tokens": run["tokens"],
                   "total_s": run["total_s"], "driver_vmhwm": _vm_hwm() if hwm_ok else None,
                   "idle": sampler.idle, "peak": sampler.peak, "samples": sampler.samples,
                   "max_processes": sampler.max_processes}
            mem_rows.append(row)
            print(f"  memory run {size:g} MB: {run['total_s']:.2f} s", flush=True)
        result["memory"] = mem_rows
        gib = 1 << 20
        print("pipeline peak memory (MiB; sampled every 0.2 s; 'tree' = driver + Ray daemons + Ray workers,"
              " all descendants of the driver; idle = tree just before the run):")
        print(f"    {'text MB':>8} {'tokens':>12} {'driver HWM':>11} {'driver RSS':>11} {'tree RSS':>9} "
              f"{'tree PSS':>9} {'workers RSS':>12} {'workers PSS':>12} {'idle tree PSS':>14}")
        for row in mem_rows:
            p = row["peak"]
            hwm = f"{row['driver_vmhwm'] / gib:11.0f}" if row["driver_vmhwm"] else f"{'n/a':>11}"
            print(f"    {row['text_mb']:8.1f} {row['tokens']:12,} {hwm} {p['driver_rss'] / gib:11.0f} "
                  f"{p['tree_rss'] / gib:9.0f} {p['tree_pss'] / gib:9.0f} {p['workers_rss'] / gib:12.0f} "
                  f"{p['workers_pss'] / gib:12.0f} {row['idle']['tree_pss'] / gib:14.0f}")

    out = work / "bench_prep_db.json"
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
