"""Training speed of two source trees (e.g. an older commit against the working tree), in one run.

Each variant is a source tree of this project (``--tree LABEL=PATH``; PATH is a checkout or a
``git archive COMMIT | tar -x -C PATH`` export). A round starts one fresh process per variant, in
alternating order (round 1: A, B; round 2: B, A; ...), and each process, with PYTHONPATH at its tree,
imports that tree's ``benchmarks/bench_train.py`` and runs its plain loops (``PlainLoop``: the same
model, synthetic data, AdamW groups, schedule and clipping as the trainer's step, without Ray or
DeepSpeed) for RETRO and GPT, steps interleaved, at the given shape and thread count. Every process
also measures the matmul peak (``benchlib.matmul_peak_flops``, best of 20 ``torch.mm`` of 2048^2) at
its thread count, before its steps, so that an MFU never mixes a quiet peak with a busy step.

Reported per variant, by wall time and by the process's CPU time (with one thread, CPU time is what
a shared machine's time slicing leaves unchanged; the peak is then also taken by CPU time): the
median over rounds of each process's median step time, tokens/s, MFU
(``RetroModel.flops_per_token`` x tokens/s over that process's own peak), the final loss of the
process's steps (the same seeds and data on both sides, so a change in the numerics shows up here),
and the ratio of each variant's tokens/s to the first variant's; plus the load average before and
after. Identical shapes, threads, warm-up and step counts on both sides.

Run:  .venv/bin/python benchmarks/bench_train_ab.py --tree old=/tmp/old --tree new=. \\
          [--configs cpu50k] [--threads 1] [--rounds 3] [--warmup 1] [--steps 3] [--bf16]
cpu50k: issue 19's shape, one micro-batch of 8 sequences a step (as bench_train.py's --configs cpu50k
command); demo: train_demo.yaml (dropouts 0.1, 8 heads), 2 micro-batches of 4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH = {"cpu50k": (8, 8), "demo": (4, 8)}  # (micro, global)


def child(args: argparse.Namespace) -> None:
    """One process of one variant: its tree is first on sys.path (set by the parent)."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(args.tree) / "benchmarks"))
    import bench_train as bt
    from benchlib import matmul_peak_flops

    from retro_ray.train import cpu_tuning
    from retro_ray.train.config import resolve_model_config

    cpu_tuning.keep_freed_memory()  # as retro-ray train's CPU workers and bench_train.py's plain loops
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = matmul_peak_flops(args.threads, dtype=dtype)
    seq, chunk, vocab = bt.DATA[args.config]
    micro, global_batch = BATCH[args.config]
    steps = args.warmup + args.steps
    loops, flops = {}, {}
    for model in ("retro", "gpt"):
        cfg = bt.make_config(args.config, "cpu", steps, micro, global_batch, retro=model == "retro", workers=1)
        model_cfg = resolve_model_config(cfg, seq, chunk, vocab)
        loops[model] = bt.PlainLoop(cfg, model_cfg, bt.factory_for(args.config, max(256, steps * global_batch)), "cpu")
        if args.bf16:  # in place, as profile_train_step.py --bf16: AdamW then steps the bf16 weights
            loops[model].model.to(torch.bfloat16)
        flops[model] = loops[model].model.flops_per_token()
    wall: dict[str, list[float]] = {m: [] for m in loops}
    cpu: dict[str, list[float]] = {m: [] for m in loops}
    for s in range(steps):  # as bench_train.interleaved, also taking each step's CPU time
        for model, loop in loops.items():
            c0 = time.process_time()
            wall[model].append(loop.step(s))
            cpu[model].append(time.process_time() - c0)
    peak_cpu = cpu_time_peak(dtype=dtype)
    out = {"peak_flops": peak, "peak_flops_cpu_time": peak_cpu, "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    for model, loop in loops.items():
        step, step_cpu = statistics.median(wall[model][args.warmup:]), statistics.median(cpu[model][args.warmup:])
        tps, tps_cpu = global_batch * seq / step, global_batch * seq / step_cpu
        out[model] = {"step_time_s": step, "step_times_s": wall[model], "tokens_per_s": tps,
                      "mfu": flops[model] * tps / peak, "step_cpu_time_s": step_cpu, "step_cpu_times_s": cpu[model],
                      "tokens_per_cpu_s": tps_cpu, "mfu_cpu_time": flops[model] * tps_cpu / peak_cpu,
                      "final_loss": loop.loss}
    print("RESULT " + json.dumps(out), flush=True)


def cpu_time_peak(n: int = 2048, repeats: int = 20, dtype=None) -> float:
    """benchlib.matmul_peak_flops by this process's CPU time: the best of ``repeats`` torch.mm of n x n,
    FLOPs per CPU second (with one thread, what a busy machine's time slicing does not change)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        torch.mm(a, b)
        best = min(best, time.process_time() - c0)
    return 2 * n**3 / best


def run_variant(label: str, tree: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(HERE / "bench_train_ab.py"), "--child", "--tree-path", str(tree),
           "--configs", args.config, "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--steps", str(args.steps)] + (["--bf16"] if args.bf16 else [])
    load0 = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{label}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["load_avg"] = [load0, os.getloadavg()[0]]
    r, g = out["retro"], out["gpt"]
    print(f"  {label:<10} peak {out['peak_flops'] / 1e9:5.1f} (CPU time {out['peak_flops_cpu_time'] / 1e9:5.1f}) GFLOP/s | "
          f"RETRO {r['step_time_s']:6.3f} s (CPU {r['step_cpu_time_s']:6.3f} s) MFU {r['mfu']:.3f} ({r['mfu_cpu_time']:.3f}) "
          f"loss {r['final_loss']:.6f} | GPT {g['step_time_s']:6.3f} s (CPU {g['step_cpu_time_s']:6.3f} s) MFU "
          f"{g['mfu']:.3f} ({g['mfu_cpu_time']:.3f}) loss {g['final_loss']:.6f} | load {load0:.1f} -> {out['load_avg'][1]:.1f}",
          flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                    help="a variant: a label and a source tree of this project (two or more; the first is the baseline)")
    ap.add_argument("--configs", dest="config", default="cpu50k", choices=sorted(BATCH))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every process")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--bf16", action="store_true",
                    help="the models' weights in bf16 (as profile_train_step.py --bf16; AdamW steps them without "
                         "float32 master copies), MFU against the bf16 matmul peak")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree-path", dest="tree_path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.tree = args.tree_path
        child(args)
        return 0
    variants = [(s.split("=", 1)[0], Path(s.split("=", 1)[1]).resolve()) for s in args.tree]
    if len(variants) < 2:
        ap.error("give at least two --tree LABEL=PATH")
    print(f"{args.config}, {args.threads} thread(s), {args.warmup} warm-up + {args.steps} timed steps per process, "
          f"{args.rounds} rounds; load average {os.getloadavg()[0]:.1f}", flush=True)
    runs: dict[str, list[dict]] = {label: [] for label, _ in variants}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for label, tree in order:
            runs[label].append(run_variant(label, tree, args))
    base = variants[0][0]
    summary = {}
    for label, _ in variants:
        s = {}
        for model in ("retro", "gpt"):
            s[model] = {k: statistics.median(run[model][k] for run in runs[label])
                        for k in ("step_time_s", "tokens_per_s", "mfu", "step_cpu_time_s", "tokens_per_cpu_s",
                                  "mfu_cpu_time")}
            s[model]["final_loss"] = runs[label][0][model]["final_loss"]
        s["peak_flops"] = statistics.median(run["peak_flops"] for run in runs[label])
        summary[label] = s
    print(f"medians over {args.rounds} rounds ({time.perf_counter() - t0:.0f} s):")
    for label, s in summary.items():
        ratio = {m: s[m]["tokens_per_s"] / summary[base][m]["tokens_per_s"] for m in ("retro", "gpt")}
        ratio_cpu = {m: s[m]["tokens_per_cpu_s"] / summary[base][m]["tokens_per_cpu_s"] for m in ("retro", "gpt")}
        s["tokens_per_s_vs_" + base], s["tokens_per_cpu_s_vs_" + base] = ratio, ratio_cpu
        print(f"  {label:<10} wall: RETRO {s['retro']['tokens_per_s']:5.0f} tokens/s MFU {s['retro']['mfu']:.3f} "
              f"({ratio['retro']:.3f}x) | GPT {s['gpt']['tokens_per_s']:5.0f} tokens/s MFU {s['gpt']['mfu']:.3f} "
              f"({ratio['gpt']:.3f}x) | peak {s['peak_flops'] / 1e9:.1f} GFLOP/s")
        print(f"  {'':<10} CPU time: RETRO {s['retro']['tokens_per_cpu_s']:5.0f} tokens/s MFU "
              f"{s['retro']['mfu_cpu_time']:.3f} ({ratio_cpu['retro']:.3f}x) | GPT {s['gpt']['tokens_per_cpu_s']:5.0f} "
              f"tokens/s MFU {s['gpt']['mfu_cpu_time']:.3f} ({ratio_cpu['gpt']:.3f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "tree"},
                                              "trees": {k: str(v) for k, v in variants},
                                              "summary": summary, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
