"""Per-worker rates and memory of every data stage, at two corpus sizes: the inputs of cluster/PLAN.md.

Each size is the bundled default corpus repeated ``k`` times (bench_prep_db.build_corpus: copy k > 0
prefixes every document with "Copy k." so de-duplication keeps it), tokenized with one BPE tokenizer
trained once on the first copy. The stages run as a user runs them, one `python -m retro_ray.cli
<stage>` process each, which starts its own local Ray cluster (``ray.init(address="local")``) with
the machine's CPUs. A thread samples that process tree every ``--every`` seconds:

* per process: PSS and USS (smaps_rollup), the peak kept per pid; "worker" = a ``ray::`` process
  (Ray Data tasks and actors, IndexShard actors), "driver" = the stage's CLI process;
* per process: CPU seconds (user + system), the last reading kept per pid. The stage's CPU-s is the
  sum over the whole tree (driver, Ray daemons, workers): what a cluster pays for the stage.

USS is a process's private memory (what it allocated itself); PSS adds its share of pages it
shares with others (libraries, the object store, mapped files), so a worker's PSS rises when fewer
processes share those pages. Flatness is judged on USS.

A stage's rate is its items (tokens for prep, chunks for db / embed / index-add / query, training
vectors for index-train) per CPU-second of that tree, so it does not depend on how busy the rest of
the machine is; the wall time is printed beside it. Memory per worker is the largest peak USS of any
one worker; a stage is "flat" when that grows by less than ``--flat-tolerance`` between the sizes
(the sizes must differ by at least 4x).

The index is forced to the family the auto choice gives a 2 T-token database
(``OPQ64_256,IVF{n}_HNSW32,PQ64`` at 384-d) with a fixed small ``n`` and without the OPQ rotation
(``--index-str``, default ``IVF256_HNSW32,PQ64``): the same 64-byte codes are added and scanned as in
the large index; at these sizes ``auto`` would pick ``Flat``. (OPQ's training reads at most 65,536
vectors whatever the database size, so it is a fixed cost; it took over 7 minutes on this machine.)

    .venv/bin/python benchmarks/bench_scaling.py --work-dir /tmp/bench_scaling [--copies 1,4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prep_db import build_corpus, train_shared_tokenizer  # noqa: E402
from benchlib import say  # noqa: E402

from retro_ray.project import Project  # noqa: E402

STAGES = ("prep", "db", "embed", "index-train", "index-add", "query")
MiB = 1024**2


class TreeSampler:
    """Peak PSS / USS and last CPU seconds of every process under ``root_pid``."""

    def __init__(self, root_pid: int, every: float) -> None:
        self.root, self.every = psutil.Process(root_pid), every
        self.peak: dict[int, dict] = {}   # pid -> {"pss", "uss", "cpu", "kind", "name"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _kind(self, p: psutil.Process, cmd: str) -> str:
        if p.pid == self.root.pid:
            return "driver"
        if cmd.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
            return "daemon"
        # A worker starts as `python .../default_worker.py` and takes its `ray::...` title later.
        return "worker" if cmd.startswith("ray::") or "default_worker.py" in cmd else "daemon"

    def sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                with p.oneshot():
                    mem = p.memory_full_info()
                    cpu = p.cpu_times()
                    cmd = " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rec = self.peak.setdefault(p.pid, {"pss": 0, "uss": 0, "cpu": 0.0, "kind": self._kind(p, cmd),
                                               "name": cmd[:60]})
            rec["pss"] = max(rec["pss"], mem.pss)
            rec["uss"] = max(rec["uss"], mem.uss)
            rec["cpu"] = max(rec["cpu"], cpu.user + cpu.system)
            if rec["kind"] != "driver":  # a worker's title changes as it takes on a task or an actor
                rec["kind"], rec["name"] = self._kind(p, cmd), cmd[:60]

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        by_kind = lambda k: [r for r in self.peak.values() if r["kind"] == k]  # noqa: E731
        workers, driver = by_kind("worker"), by_kind("driver")
        top = max(workers, key=lambda r: r["pss"], default=None)
        return {
            "cpu_s": sum(r["cpu"] for r in self.peak.values()),
            "workers_cpu_s": sum(r["cpu"] for r in workers),
            "workers": len(workers),
            "worker_peak_pss": top["pss"] if top else 0,
            "worker_peak_uss": max((r["uss"] for r in workers), default=0),
            "worker_peak_name": top["name"] if top else "",
            "driver_peak_pss": max((r["pss"] for r in driver), default=0),
            "driver_peak_uss": max((r["uss"] for r in driver), default=0),
            "daemons_peak_pss": sum(r["pss"] for r in by_kind("daemon")),
        }


def stage_items(project: Project, stage: str) -> tuple[str, int]:
    """What a stage's rate counts, from its report and the project's derived settings."""
    counts = project.report(stage).counts
    d = project.derived()
    if stage == "prep":
        return "tokens", int(sum(d["tokens_per_split"].values()))
    if stage == "db":
        return "chunks", int(sum(d["chunks_per_split"].values()))
    if stage in ("embed", "query"):
        return ("chunks" if stage == "embed" else "query chunks"), int(counts["train_chunks"] + counts["valid_chunks"])
    if stage == "index-train":
        return "training vectors", int(counts["training_vectors"])
    if stage == "index-add":
        return "chunks", int(counts["vectors"])
    raise ValueError(stage)


def run_stage(project_dir: Path, stage: str, overrides: list[str], every: float, env: dict) -> dict:
    cmd = [sys.executable, "-m", "retro_ray.cli", stage, "--project-dir", str(project_dir), *overrides]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeSampler(proc.pid, every) as sampler:
        out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed (exit {proc.returncode}):\n{out[-4000:]}")
    return {"wall_s": wall, **sampler.summary()}


def measure_scan(project: Project, queries: int, nprobe: int, k: int) -> dict:
    """One thread searching the project's merged index with its own valid embeddings as queries:
    seconds per query, distances computed per query (Faiss's IVF counters) and so the cost of one
    code distance, and the index's bytes per vector. The query stage's search cost at any database
    size is distances per query (nprobe x vectors per list) times that cost, plus the coarse step."""
    import faiss
    import numpy as np

    from retro_ray.retrieval.index import load_index, set_search_params

    path = project.added_index_path
    index = load_index(path)
    set_search_params(index, nprobe=nprobe, ef_search=32)
    blocks = sorted((project.embeddings_dir / "valid").glob("*.npy")) + sorted((project.embeddings_dir / "train").glob("*.npy"))
    x = np.concatenate([np.load(b) for b in blocks[:4]])[:queries].astype(np.float32)
    faiss.omp_set_num_threads(1)
    index.search(x[:64], k)  # warm
    stats = faiss.cvar.indexIVF_stats
    stats.reset()
    t0 = time.perf_counter()
    index.search(x, k)
    seconds = time.perf_counter() - t0
    ivf = faiss.extract_index_ivf(index)
    return {"queries": len(x), "nprobe": nprobe, "k": k, "s_per_query": seconds / len(x),
            "distances_per_query": stats.ndis / len(x), "quantization_s_per_query": stats.quantization_time / 1e3 / len(x),
            "scan_s_per_query": stats.search_time / 1e3 / len(x),
            "ns_per_distance": stats.search_time * 1e6 / max(stats.ndis, 1), "nlist": int(ivf.nlist),
            "vectors": int(index.ntotal), "bytes_per_vector": path.stat().st_size / max(index.ntotal, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True, help="corpora, tokenizer, projects and the JSON result")
    ap.add_argument("--copies", default="1,4", help="corpus sizes, in copies of the default corpus (default 1,4)")
    ap.add_argument("--index-str", default="IVF256_HNSW32,PQ64",
                    help="the Faiss index of both sizes (the 2 T-token auto family, with a small list count "
                         "and without its OPQ rotation, whose training alone takes minutes here)")
    ap.add_argument("--ntrain", type=int, default=None,
                    help="index.ntrain of every size (default: the project default, all train chunks up to 1 M). "
                         "The index-train sample is capped by this setting, not by the corpus")
    ap.add_argument("--every", type=float, default=0.5, help="seconds between samples of the process tree")
    ap.add_argument("--flat-tolerance", type=float, default=0.15,
                    help="largest relative change of a worker's peak PSS still called flat (default 0.15)")
    ap.add_argument("--scan-queries", type=int, default=2000, help="queries for the one-thread search measurement")
    ap.add_argument("--nprobe", type=int, default=64, help="nprobe of that measurement (the query stage's default)")
    ap.add_argument("--stages", default=",".join(STAGES), help="stages to measure, in pipeline order")
    args = ap.parse_args(argv)

    work = args.work_dir.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    copies = [int(c) for c in args.copies.split(",")]
    if max(copies) < 4 * min(copies):
        raise SystemExit(f"--copies {args.copies}: the largest size must be at least 4x the smallest")
    stages = args.stages.split(",")
    tokenizer = work / "tokenizer.json"
    say(f"tokenizer: {train_shared_tokenizer(tokenizer):.1f} s to train (0 = reused)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("RAY_ADDRESS", None)
    result: dict = {"machine": {"cpus": os.cpu_count()}, "index_str": args.index_str, "sizes": {}}
    saved = work / "bench_scaling.json"
    earlier = json.loads(saved.read_text())["sizes"] if saved.is_file() else {}
    for k in copies:
        corpus = work / f"corpus_x{k}.jsonl"
        meta = build_corpus(corpus, 0.0, copies=k)
        project_dir = work / f"project_x{k}"
        project = Project(project_dir)
        say(f"x{k}: {meta['docs']:,} documents, {meta['text_bytes'] / 1e6:.1f} MB of text -> {project_dir}")
        overrides = {"prep": [f"corpus.path={corpus}", f"tokenizer.path={tokenizer}"]
                     + ([f"index.ntrain={args.ntrain}"] if args.ntrain else []),
                     "index-train": [f"index.index_str={args.index_str}"]}
        rows = {}
        for stage in stages:
            if project.is_done(stage):
                if stage in earlier.get(f"x{k}", {}).get("stages", {}):
                    rows[stage] = earlier[f"x{k}"]["stages"][stage]
                    say(f"  {stage}: measured before (kept); delete {project_dir} to measure it again")
                    continue
                raise SystemExit(f"{stage} of {project_dir} is done but was not measured: delete {project_dir}")
            r = run_stage(project_dir, stage, overrides.get(stage, []), args.every, env)
            what, n = stage_items(project, stage)
            r.update(items=n, unit=what, per_cpu_s=n / max(r["cpu_s"], 1e-9))
            rows[stage] = r
            result["sizes"][f"x{k}"] = {"corpus": meta, "stages": rows}
            saved.write_text(json.dumps(result, indent=1))
            say(f"  {stage:<11} {n:>11,} {what:<16} wall {r['wall_s']:7.1f} s  CPU {r['cpu_s']:7.1f} s  "
                f"{r['per_cpu_s']:>10,.0f} /CPU-s  worker peak PSS {r['worker_peak_pss'] / MiB:6.0f} MiB "
                f"({r['workers']} workers)  driver {r['driver_peak_pss'] / MiB:5.0f} MiB")
        result["sizes"][f"x{k}"] = {"corpus": meta, "stages": rows}
        if project.is_done("query"):
            scan = measure_scan(project, args.scan_queries, args.nprobe, 200)
            result["sizes"][f"x{k}"]["scan"] = scan
            say(f"  search, 1 thread: {scan['s_per_query'] * 1e3:.2f} ms a query, {scan['distances_per_query']:,.0f} "
                f"distances ({scan['ns_per_distance']:.1f} ns each), coarse {scan['quantization_s_per_query'] * 1e3:.3f} ms; "
                f"{scan['bytes_per_vector']:.1f} index bytes a vector")
        (work / "bench_scaling.json").write_text(json.dumps(result, indent=1))

    small, large = (result["sizes"][f"x{k}"]["stages"] for k in (min(copies), max(copies)))
    print(f"\nmemory per worker and rate, x{min(copies)} -> x{max(copies)} (largest worker's peak USS, i.e. its "
          "private memory, and PSS; items per CPU-s)")
    for stage in stages:
        if stage not in small or stage not in large:
            continue
        a, b = small[stage], large[stage]
        growth = b["worker_peak_uss"] / max(a["worker_peak_uss"], 1) - 1
        print(f"  {stage:<11} worker USS {a['worker_peak_uss'] / MiB:6.0f} -> {b['worker_peak_uss'] / MiB:6.0f} MiB "
              f"({growth:+.0%}, {'flat' if growth <= args.flat_tolerance else 'GROWS'}), PSS "
              f"{a['worker_peak_pss'] / MiB:.0f} -> {b['worker_peak_pss'] / MiB:.0f} MiB; driver PSS "
              f"{a['driver_peak_pss'] / MiB:.0f} -> {b['driver_peak_pss'] / MiB:.0f} MiB; rate {a['per_cpu_s']:,.0f} -> "
              f"{b['per_cpu_s']:,.0f} {b['unit']}/CPU-s")
    print(f"result: {work / 'bench_scaling.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
