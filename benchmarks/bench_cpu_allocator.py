"""Benchmark of trainer.cpu_keep_freed_memory: a CPU training step with glibc's default allocator
against the same step with freed memory kept in the process (``retro_ray.train.cpu_tuning``).

What is measured (one run of this script)
    The plain training loop of bench_train.py (same model, synthetic data, AdamW, clipping), one
    process per side because glibc's settings are per process and its default adapts as the process
    runs: ``--rounds`` rounds, each starting a fresh process with the default allocator and one with
    freed memory kept, in alternating order (ABBA...), so that a drift in the machine's load falls on
    both. Each process runs ``--warmup`` steps, then times ``--steps``; per side the median step over
    all rounds, the minor page faults and system CPU time per timed step, and the peak resident size
    (what keeping freed memory costs). The training workers of ``retro-ray train`` apply the same call
    at start-up on CPU unless trainer.cpu_keep_freed_memory=false.

Run:  .venv/bin/python benchmarks/bench_cpu_allocator.py [--config demo|125m] [--model retro|gpt|retro_narrow]
      [--rounds 3] [--warmup 2] [--steps 4] [--threads 1] [--override KEY=VALUE ...]
The 125M shape (one thread, two sequences of 2048 tokens a step, no dropout; ~8 GB a process):
      .venv/bin/python benchmarks/bench_cpu_allocator.py --config 125m --micro-batch-size 1 --global-batch-size 2 \
          --warmup 1 --steps 2 --rounds 2 --override model.hidden_dropout=0 ... (as bench_train.py)
Writes <work-dir>/bench_cpu_allocator.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("default", "keep")


def child(args: argparse.Namespace) -> None:
    """One side of one round, in a fresh process: prints a JSON line."""
    from retro_ray.train.cpu_tuning import keep_freed_memory

    kept = keep_freed_memory() if args.child == "keep" else False  # before any tensor exists
    import torch
    from bench_train import DATA, PlainLoop, factory_for, make_config, narrow_encoder

    from retro_ray.train.config import resolve_model_config

    torch.set_num_threads(args.threads)
    steps = args.warmup + args.steps
    cfg = make_config(args.config, "cpu", steps, args.micro_batch_size, args.global_batch_size,
                      retro=args.model != "gpt", extra=args.override)
    seq, chunk, vocab = DATA[args.config]
    model_cfg = resolve_model_config(cfg, seq, chunk, vocab)
    if args.model == "retro_narrow":
        model_cfg = narrow_encoder(model_cfg)
    loop = PlainLoop(cfg, model_cfg, factory_for(args.config, max(64, steps * cfg.model.global_batch_size)), "cpu")
    for s in range(args.warmup):
        loop.step(s)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    times = [loop.step(s) for s in range(args.warmup, steps)]
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "mode": args.child, "kept": kept, "step_times_s": times,
        "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / args.steps,
        "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / args.steps,
        "max_rss_gib": r1.ru_maxrss / 2**20, "final_loss": loop.loss,
    }), flush=True)


def run_side(mode: str, args: argparse.Namespace, passthrough: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, *passthrough]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"the {mode} side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=("demo", "125m"), default="demo")
    ap.add_argument("--model", choices=("retro", "gpt", "retro_narrow"), default="retro")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a training worker has 1 a CPU)")
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--global-batch-size", type=int, default=None)
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    passthrough = ["--config", args.config, "--model", args.model, "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
    for flag, value in (("--micro-batch-size", args.micro_batch_size), ("--global-batch-size", args.global_batch_size)):
        if value:
            passthrough += [flag, str(value)]
    for o in args.override:
        passthrough += ["--override", o]
    print(f"== {args.config} {args.model}, {args.threads} thread(s): {args.rounds} rounds of a fresh process per "
          f"side, {args.warmup} warm-up + {args.steps} timed steps each", flush=True)
    sides: dict[str, list[dict]] = {m: [] for m in MODES}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            res = run_side(mode, args, passthrough)
            sides[mode].append(res)
            print(f"  round {r + 1} {mode:<8} median step {statistics.median(res['step_times_s']):8.3f} s, "
                  f"{res['minor_faults_per_step']:10,.0f} faults/step, sys {res['sys_s_per_step']:.2f} s/step, "
                  f"peak RSS {res['max_rss_gib']:.2f} GiB", flush=True)
    summary = {}
    for mode, runs in sides.items():
        if mode == "keep" and not all(x["kept"] for x in runs):
            raise SystemExit("this system's allocator could not be tuned (not glibc?): nothing to compare")
        summary[mode] = {
            "median_step_s": statistics.median(t for x in runs for t in x["step_times_s"]),
            "minor_faults_per_step": statistics.fmean(x["minor_faults_per_step"] for x in runs),
            "sys_s_per_step": statistics.fmean(x["sys_s_per_step"] for x in runs),
            "max_rss_gib": max(x["max_rss_gib"] for x in runs),
        }
    speedup = summary["default"]["median_step_s"] / summary["keep"]["median_step_s"]
    rss = summary["keep"]["max_rss_gib"] / summary["default"]["max_rss_gib"]
    print(f"  speed-up of keeping freed memory: {speedup:.3f}x (median step, default allocator as the baseline); "
          f"faults/step {summary['default']['minor_faults_per_step']:,.0f} -> {summary['keep']['minor_faults_per_step']:,.0f}; "
          f"peak RSS {rss:.2f}x")
    print(f"  load average before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_cpu_allocator_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    out = {"config": args.config, "model": args.model, "threads": args.threads, "rounds": args.rounds,
           "warmup": args.warmup, "steps": args.steps, "overrides": args.override, "speedup": speedup,
           "peak_rss_ratio": rss, "summary": summary, "runs": sides, "wall_s": time.perf_counter() - t0}
    (work_dir / "bench_cpu_allocator.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"  wrote {work_dir / 'bench_cpu_allocator.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
