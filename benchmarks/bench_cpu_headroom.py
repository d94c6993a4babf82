"""How much faster can embedding get on this machine by running processes in parallel?

The `query` and `embed` stages embed with one Ray actor per CPU, one torch thread each. The plain
loop they are compared with runs one process with one torch thread per CPU. This script measures
the two arrangements without Ray, on the same texts and with the same `Embedder`:

    one process, torch threads = all CPUs           (the plain loop's arrangement)
    one process per CPU, 1 torch thread each        (the stages' arrangement, minus Ray)

If the second is no faster than the first, then on this machine a Ray pipeline can at best equal
the one-process loop: its parallelism buys nothing, and actor start-up and data movement are pure
cost. The texts are 300-character pieces of the bundled corpus (about one 64-token chunk each).

Run:  .venv/bin/python benchmarks/bench_cpu_headroom.py [--n 3000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def texts(n: int) -> list[str]:
    from retro_ray.corpus import _iter_default, default_corpus_path

    out: list[str] = []
    for _title, t in _iter_default(default_corpus_path()):
        out += [t[i : i + 300] for i in range(0, len(t) - 300, 300)]
        if len(out) >= n:
            break
    return out[:n]


def embed_timed(args: tuple[list[str], int, mp.synchronize.Barrier | None]) -> float:
    """Seconds to embed ``texts`` with ``threads`` torch threads (model loaded and warmed first)."""
    chunk, threads, barrier = args
    import torch

    from retro_ray.embedder import Embedder

    torch.set_num_threads(threads)
    embedder = Embedder()
    embedder.embed(chunk[:32])
    if barrier is not None:
        barrier.wait()  # every process starts its clock together
    t0 = time.perf_counter()
    embedder.embed(chunk)
    return time.perf_counter() - t0


def _worker(chunk: list[str], barrier, queue) -> None:
    queue.put(embed_timed((chunk, 1, barrier)))


def steal_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all cores: time the hypervisor gave this VM's CPUs to someone else."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    return parts[7], sum(parts)


def process_per_cpu(data: list[str], cpus: int) -> float:
    """Seconds until the slowest of ``cpus`` one-thread processes has embedded its share."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(cpus), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(data[i::cpus], barrier, queue)) for i in range(cpus)]
    for p in procs:
        p.start()
    times = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_cpu_headroom.json")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    data = texts(args.n)

    ones, manys = [], []
    steals = []
    for r in range(args.repeats):  # interleaved, medians reported: run-to-run noise here is ~10 %
        s0, t0 = steal_ticks()
        ones.append(embed_timed((data, cpus, None)))
        manys.append(process_per_cpu(data, cpus))
        s1, t1 = steal_ticks()
        steals.append(100.0 * (s1 - s0) / max(1, t1 - t0))
        print(f"round {r + 1}: one process {len(data) / ones[-1]:.1f} texts/s, "
              f"process per CPU {len(data) / manys[-1]:.1f} texts/s, CPU stolen by the host {steals[-1]:.0f}%",
              flush=True)
    one, many = float(np.median(ones)), float(np.median(manys))
    result = {"texts": len(data), "cpus": cpus, "repeats": args.repeats,
              "one_process_texts_per_s": len(data) / one,
              "process_per_cpu_texts_per_s": len(data) / many,
              "ratio": one / many,
              "rounds_one_process_s": ones, "rounds_process_per_cpu_s": manys, "rounds_steal_pct": steals}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"one process x {cpus} threads: {result['one_process_texts_per_s']:.1f} texts/s | "
          f"{cpus} processes x 1 thread: {result['process_per_cpu_texts_per_s']:.1f} texts/s | "
          f"ratio {result['ratio']:.3f}")


if __name__ == "__main__":
    main()
