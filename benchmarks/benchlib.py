"""Helpers shared by the benchmark scripts (imported as ``benchlib``: the scripts run from this folder).

Machine-load accounting for timed regions, a Ray start that survives an overloaded machine, and a
watcher that records when a stage's block files appear.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

# Benchmarks never download: a model a script names must be on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``fn``."""
    import statistics

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


class Region:
    """Wall time, machine CPU utilisation (% of all cores), this process's CPU and load average over a block."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __enter__(self) -> Region:
        self.load0 = os.getloadavg()[0]
        self.busy0, self.total0 = cpu_ticks()
        self.cpu0 = time.process_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        busy, total = cpu_ticks()
        self.util = 100.0 * (busy - self.busy0) / max(1, total - self.total0)
        self.own_cpu = time.process_time() - self.cpu0
        self.load1 = os.getloadavg()[0]

    def line(self) -> str:
        return (f"wall {self.seconds:7.1f} s | machine CPU busy {self.util:5.1f}% of {os.cpu_count()} cores | "
                f"this process {self.own_cpu / max(self.seconds, 1e-9):4.2f} cores | "
                f"load avg {self.load0:.1f} -> {self.load1:.1f}")


def work_copy(src: str, work_dir: str, copy: Callable[[Path, Path], None], what: str):
    """The Project made by ``copy(src, <work_dir>/project)`` (a fresh directory: an earlier copy is
    removed first). A benchmark writes only to that copy."""
    import shutil

    from retro_ray.project import Project

    src_dir, dst = Path(src).resolve(), Path(work_dir) / "project"
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    say(f"copying {src_dir} ({what}) to {dst}")
    copy(src_dir, dst)
    return Project(dst)


def start_ray(num_cpus: int, warm_workers: bool = False) -> None:
    """``ray.init`` with retries: on an overloaded machine the raylet can miss Ray's 30 s start-up wait.

    ``warm_workers``: also run one no-op task per CPU, so the worker processes exist before any clock.
    """
    import ray

    for attempt in range(1, 4):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            break
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception here
            print(f"ray.init attempt {attempt} failed: {e}", flush=True)
            ray.shutdown()
            time.sleep(5)
    else:
        raise SystemExit("could not start Ray")
    if warm_workers:
        def pid() -> int:  # local, so it is shipped by value (workers cannot import this module)
            return os.getpid()

        ray.get([ray.remote(num_cpus=1)(pid).remote() for _ in range(num_cpus)])


class BlockWatcher(threading.Thread):
    """Records when each ``<root>/<dir>/<block>.npy`` first appears, in seconds since ``t0``."""

    def __init__(self, root: Path, key: Callable[[Path], str] = lambda p: f"{p.parent.name}/{p.stem}") -> None:
        super().__init__(daemon=True)
        self.root, self.key, self.t0 = root, key, time.perf_counter()
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for p in self.root.glob("*/[0-9]*.npy"):
                k = self.key(p)
                if k not in self.seen:
                    self.seen[k] = time.perf_counter() - self.t0
            self.stop.wait(0.05)


def matmul_peak_flops(threads: int | None = None, n: int = 2048, repeats: int = 20, dtype=None) -> float:
    """The machine's matmul FLOP/s as torch reaches it: the best of ``repeats`` torch.mm of two n x n
    matrices (float32 unless ``dtype``), with ``threads`` intra-op threads (default: the current
    setting), after one untimed product. The denominator of a CPU MFU, measured in the same run."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, dtype=dtype or torch.float32)
        b = torch.randn(n, n, dtype=dtype or torch.float32)
        out = torch.empty(n, n, dtype=a.dtype)
        torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - t0)
        return 2.0 * n**3 / best
    finally:
        torch.set_num_threads(before)
