"""Benchmark of the fused output layer + cross-entropy (retro_ray/model/loss.py) against the unfused path.

The unfused path ("old") is what RetroModel did before: logits = ln_f(x) @ W^T for every position
([B*n, V] at once), then F.cross_entropy(logits.float()). The fused path ("fused") walks the rows in
blocks and computes each block's loss and gradients in one pass (loss.BLOCK_ROWS). Both do the same
matmuls. ``retro_ray.model.loss.fused_loss(False)`` switches RetroModel to the old path, so the two
run the same model code otherwise.

The shape (the issue's): decoder 6 x 256, FFN 1024, 4 heads, vocabulary 50,304, sequence 512, K = 2
neighbours of 128 tokens (chunk 64), CCA in layers 3 and 6, batch 8 (4,096 tokens a step), no
dropout, fp32, 2 intra-op threads (--threads). GPT is the same decoder with retrieval off.

What one run measures, in this order:
  peak         the machine's fp32 matmul FLOP/s at this thread count: the best of 20 torch.mm of two
               2048 x 2048 matrices (benchlib.matmul_peak_flops), at the start and again after the
               training steps; the larger is the denominator of MFU below.
  blocks       (--sweep-blocks) forward + backward of the output layer alone, N = 4,096 rows,
               V = 50,304, at d = 256 and 768: the unfused path and the fused one at each block size
               of --blocks, repeats interleaved, median time and its FLOP/s (6 N d V / time).
  layer        the output layer alone at d = 256: old against fused, time (interleaved, median) and
               peak memory (below).
  step         one training step (forward, backward, torch AdamW step, gradients set to None), RETRO
               and GPT, old against fused: the four loops' steps interleaved so all see the same
               machine load; tokens/s from the median step (and, next to it, the ratio of the best
               steps: on a shared machine the fastest step is the one least disturbed); achieved FLOP/s = flops_per_token x
               tokens/s (RetroModel.flops_per_token, the same FLOPs on both paths) and its fraction
               of the peak (MFU).
  memory       for the layer and for each step, a fresh Python process runs only that variant (set-up,
               then 2 steps) and reports its peak resident set (VmHWM, reset through
               /proc/self/clear_refs after set-up) and the resident set just before the steps: the
               peak includes the weights, the optimizer's state, torch's own ~0.3 GB; peak - before is
               what the steps added. Like bench_train.py's loops and retro-ray train's CPU workers,
               every process keeps freed memory in its heap (retro_ray.train.cpu_tuning), so the peak is the
               most the step held at once plus what the heap could not reuse.
  profile      (--profile) torch.profiler over one RETRO step of each path: the ops with the most
               self CPU time.

Run:  .venv/bin/python benchmarks/bench_loss.py [--steps 5] [--warmup 1] [--threads 2] [--sweep-blocks]
          [--profile] [--out benchmarks/results/bench_loss_cpu.json]
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

import torch
import torch.nn.functional as F
from benchlib import matmul_peak_flops

from retro_ray.model.loss import BLOCK_ROWS, IGNORE_INDEX, fused_loss, linear_cross_entropy
from retro_ray.model.retro import RetroConfig, RetroModel, RetroSettings
from retro_ray.train.cpu_tuning import keep_freed_memory
from retro_ray.train.loop import param_groups

V, SEQ, BATCH, CHUNK, K = 50304, 512, 8, 64, 2


def model_config(retro: bool) -> RetroConfig:
    return RetroConfig(
        vocab_size=V, num_layers=6, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4,
        seq_length=SEQ, chunk_length=CHUNK, hidden_dropout=0.0, attention_dropout=0.0, ffn_dropout=0.0,
        retro=RetroSettings(enabled=retro, retro_layers=(3, 6), retro_num_neighbors=K,
                            retro_encoder_hidden_dropout=0.0, retro_encoder_attention_dropout=0.0),
    )


# ------------------------------------------------------------------------------------------------
# The output layer alone
# ------------------------------------------------------------------------------------------------
class Layer:
    """Forward + backward of the output layer and its loss over N rows: ``run()`` returns seconds."""

    def __init__(self, d: int, fused: bool, block_rows: int | None = None, n: int = BATCH * SEQ):
        g = torch.Generator().manual_seed(0)
        self.h = (torch.randn(n, d, generator=g)).requires_grad_()
        self.w = (torch.randn(V, d, generator=g) * 0.02).requires_grad_()
        self.labels = torch.randint(0, V, (n,), generator=g)
        self.fused, self.block_rows = fused, block_rows
        self.flops = 6.0 * n * d * V

    def run(self) -> float:
        self.h.grad = self.w.grad = None
        t0 = time.perf_counter()
        if self.fused:
            loss = linear_cross_entropy(self.h, self.w, self.labels, block_rows=self.block_rows)
        else:
            loss = F.cross_entropy(F.linear(self.h, self.w).float(), self.labels, ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        (loss / self.h.shape[0]).backward()
        return time.perf_counter() - t0


CPU_SECONDS: dict[str, list[float]] = {}  # interleave's last run: each runner's process CPU seconds


def interleave(runners: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Round r runs every runner once, in an order rotated by r; each runner's times after warm-up.
    The process CPU time of each timed run goes to CPU_SECONDS: with one thread (--threads 1) it
    leaves out the time other processes held the core, a steadier figure on a shared machine."""
    names = list(runners)
    times: dict[str, list[float]] = {k: [] for k in names}
    CPU_SECONDS.clear()
    CPU_SECONDS.update({k: [] for k in names})
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            c0 = time.process_time()
            t = runners[k]()
            if r >= warmup:
                times[k].append(t)
                CPU_SECONDS[k].append(time.process_time() - c0)
    return times


def sweep_blocks(blocks: list[int], repeats: int, peak: float) -> dict:
    out = {}
    for d in (256, 768):
        runners = {"old": Layer(d, False).run}
        runners.update({f"fused_{b}": Layer(d, True, b).run for b in blocks})
        times = interleave(runners, repeats, warmup=1)
        flops = 6.0 * BATCH * SEQ * d * V
        rows = {k: {"median_s": statistics.median(v), "flops_per_s": flops / statistics.median(v),
                    "fraction_of_peak": flops / statistics.median(v) / peak, "times_s": v} for k, v in times.items()}
        out[str(d)] = rows
        print(f"  output layer fwd+bwd, N={BATCH * SEQ}, d={d}, V={V}:")
        for k, r in rows.items():
            print(f"    {k:<12} {r['median_s'] * 1e3:8.1f} ms  {r['flops_per_s'] / 1e9:6.1f} GFLOP/s  "
                  f"({r['fraction_of_peak']:.0%} of peak)", flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# A training step
# ------------------------------------------------------------------------------------------------
class Step:
    """RetroModel + torch AdamW on one fixed synthetic batch; ``run()`` makes one step, returns seconds."""

    def __init__(self, retro: bool, fused: bool):
        torch.manual_seed(0)
        self.model = RetroModel(model_config(retro)).train()
        self.fused = fused
        self.opt = torch.optim.AdamW(param_groups(self.model, 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
        g = torch.Generator().manual_seed(1)
        text = torch.randint(0, V, (BATCH, SEQ + 1), generator=g)
        self.batch = {"tokens": text[:, :-1].contiguous(), "labels": text[:, 1:].contiguous()}
        if retro:
            self.batch["neighbor_tokens"] = torch.randint(0, V, (BATCH, SEQ // CHUNK, K, 2 * CHUNK), generator=g)
        self.flops_per_token = self.model.flops_per_token()
        self.loss = float("nan")

    def run(self) -> float:
        t0 = time.perf_counter()
        with fused_loss(self.fused):
            out = self.model(**self.batch)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = out.loss.item()
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# Peak memory, in fresh processes
# ------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(what: str, variant: str, threads: int) -> None:
    """In a fresh process: set up one variant, reset the peak RSS, run 2 steps, print JSON."""
    torch.set_num_threads(threads)
    keep_freed_memory()
    fused = variant == "fused"
    if what == "layer":
        runner = Layer(256, fused).run
    else:
        runner = Step(what == "retro", fused).run
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    for _ in range(2):
        runner()
    print(json.dumps({"rss_before_mib": before / 1024, "peak_rss_mib": _status_kib("VmHWM") / 1024}))


def measure_memory(what: str, variant: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", what, variant, "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["added_mib"] = r["peak_rss_mib"] - r["rss_before_mib"]
    return r


# ------------------------------------------------------------------------------------------------
def profile_step(retro: bool, fused: bool, rows: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    step = Step(retro, fused)
    step.run()  # warm-up: optimizer state, allocator
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step.run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
            "calls": e.count} for e in events[:rows]]
    label = f"{'RETRO' if retro else 'GPT'}, {'fused' if fused else 'old'}"
    print(f"  profile, one step, {label}: {total / 1e6:.2f} s of self CPU time")
    for t in top:
        print(f"    {t['op']:<42} {t['self_cpu_ms']:9.1f} ms  {t['share']:6.1%}  x{t['calls']}")
    return top


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (and output-layer repeats) per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before the timed ones")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads, for every measurement")
    ap.add_argument("--sweep-blocks", action="store_true",
                    help="also time the output layer alone at d = 256 and 768 for each block size of --blocks")
    ap.add_argument("--blocks", default="128,256,512,1024,2048", help="block sizes (rows) for --sweep-blocks")
    ap.add_argument("--profile", action="store_true", help="also profile one RETRO step of each path")
    ap.add_argument("--skip-memory", action="store_true", help="no fresh-process peak memory measurements")
    ap.add_argument("--skip-steps", action="store_true", help="no training steps (the output layer only)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", nargs=2, metavar=("WHAT", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child, args.threads)
        return 0

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    results: dict = {"date": time.strftime("%Y-%m-%d"), "host_cpus": os.cpu_count(), "threads": args.threads,
                     "torch": torch.__version__, "block_rows": BLOCK_ROWS["cpu"], "load_avg_before": os.getloadavg(),
                     "shape": {"layers": 6, "d": 256, "ffn": 1024, "heads": 4, "vocab": V, "seq": SEQ, "batch": BATCH,
                               "neighbours": K, "neighbour_tokens": 2 * CHUNK, "cca_layers": [3, 6]}}
    peak = matmul_peak_flops(args.threads)
    results["matmul_peak_flops"] = results["matmul_peak_flops_before"] = peak
    print(f"fp32 matmul peak, {args.threads} threads (best of 20 torch.mm 2048^3): {peak / 1e9:.1f} GFLOP/s", flush=True)

    if args.sweep_blocks:
        results["blocks"] = sweep_blocks([int(b) for b in args.blocks.split(",")], args.steps, peak)

    layer = {"old": Layer(256, False).run, "fused": Layer(256, True).run}
    times = interleave(layer, args.steps, args.warmup)
    lr = {k: {"median_s": statistics.median(v), "best_s": min(v), "times_s": v, "cpu_s": CPU_SECONDS[k]}
          for k, v in times.items()}
    lr["speedup"] = lr["old"]["median_s"] / lr["fused"]["median_s"]
    lr["speedup_best"] = lr["old"]["best_s"] / lr["fused"]["best_s"]
    lr["cpu_time_ratio"] = statistics.median(lr["old"]["cpu_s"]) / statistics.median(lr["fused"]["cpu_s"])
    print(f"  output layer alone, d=256: old {lr['old']['median_s'] * 1e3:.0f} ms, fused "
          f"{lr['fused']['median_s'] * 1e3:.0f} ms: {lr['speedup']:.2f}x faster (best times: "
          f"{lr['speedup_best']:.2f}x; process CPU time {lr['cpu_time_ratio']:.2f}x)", flush=True)
    if not args.skip_memory:
        for k in ("old", "fused"):
            lr[k]["memory"] = measure_memory("layer", k, args.threads)
        lr["peak_rss_ratio"] = lr["fused"]["memory"]["peak_rss_mib"] / lr["old"]["memory"]["peak_rss_mib"]
        lr["added_ratio"] = lr["fused"]["memory"]["added_mib"] / lr["old"]["memory"]["added_mib"]
        print(f"    peak RSS: old {lr['old']['memory']['peak_rss_mib']:,.0f} MiB (+{lr['old']['memory']['added_mib']:,.0f}), "
              f"fused {lr['fused']['memory']['peak_rss_mib']:,.0f} MiB (+{lr['fused']['memory']['added_mib']:,.0f}): "
              f"{lr['peak_rss_ratio']:.2f}x (added {lr['added_ratio']:.2f}x)", flush=True)
    results["layer"] = lr

    if not args.skip_steps:
        steps = {f"{m}_{v}": Step(m == "retro", v == "fused") for m in ("retro", "gpt") for v in ("old", "fused")}
        times = interleave({k: s.run for k, s in steps.items()}, args.steps, args.warmup)
        # Measured again after the steps; the larger of the two is the denominator (other work on
        # the machine lowers a measured peak, which would raise the MFU).
        after = matmul_peak_flops(args.threads)
        results["matmul_peak_flops_after_steps"] = after
        peak = results["matmul_peak_flops"] = max(peak, after)
        print(f"fp32 matmul peak again after the steps: {after / 1e9:.1f} GFLOP/s; MFU below against "
              f"{peak / 1e9:.1f}", flush=True)
        st: dict = {}
        tokens = BATCH * SEQ
        for k, s in steps.items():
            med = statistics.median(times[k])
            tps = tokens / med
            best = min(times[k])
            st[k] = {"median_step_s": med, "tokens_per_s": tps, "flops_per_token": s.flops_per_token,
                     "achieved_flops_per_s": s.flops_per_token * tps, "mfu": s.flops_per_token * tps / peak,
                     "best_step_s": best, "mfu_best": s.flops_per_token * tokens / best / peak,
                     "times_s": times[k], "cpu_s": CPU_SECONDS[k], "median_cpu_s": statistics.median(CPU_SECONDS[k]),
                     "final_loss": s.loss}
        del steps
        for m in ("retro", "gpt"):
            st[f"{m}_speedup"] = st[f"{m}_old"]["median_step_s"] / st[f"{m}_fused"]["median_step_s"]
            st[f"{m}_speedup_best"] = st[f"{m}_old"]["best_step_s"] / st[f"{m}_fused"]["best_step_s"]
            st[f"{m}_cpu_time_ratio"] = st[f"{m}_old"]["median_cpu_s"] / st[f"{m}_fused"]["median_cpu_s"]
        if not args.skip_memory:
            for k in list(st):
                if k.endswith(("_old", "_fused")):
                    m, v = k.rsplit("_", 1)
                    st[k]["memory"] = measure_memory(m, v, args.threads)
            for m in ("retro", "gpt"):
                st[f"{m}_peak_rss_ratio"] = st[f"{m}_fused"]["memory"]["peak_rss_mib"] / st[f"{m}_old"]["memory"]["peak_rss_mib"]
                st[f"{m}_added_ratio"] = st[f"{m}_fused"]["memory"]["added_mib"] / st[f"{m}_old"]["memory"]["added_mib"]
        results["step"] = st
        print(f"  training step, {tokens} tokens (fwd + bwd + AdamW), steps interleaved:")
        for k in ("retro_old", "retro_fused", "gpt_old", "gpt_fused"):
            r = st[k]
            mem = (f", peak RSS {r['memory']['peak_rss_mib']:,.0f} MiB (+{r['memory']['added_mib']:,.0f})"
                   if "memory" in r else "")
            print(f"    {k:<12} {r['median_step_s']:6.2f} s (best {r['best_step_s']:5.2f} s)  "
                  f"{r['tokens_per_s']:7,.0f} tokens/s  {r['achieved_flops_per_s'] / 1e9:6.1f} GFLOP/s = "
                  f"{r['mfu']:.0%} of peak (best step {r['mfu_best']:.0%}){mem}")
        for m in ("retro", "gpt"):
            line = (f"    {m.upper()}: fused / old tokens/s {st[f'{m}_speedup']:.2f}x, best steps "
                    f"{st[f'{m}_speedup_best']:.2f}x, process CPU time {st[f'{m}_cpu_time_ratio']:.2f}x (goal >= 1.15x)")
            if f"{m}_peak_rss_ratio" in st:
                line += (f"; peak RSS fused / old {st[f'{m}_peak_rss_ratio']:.2f}x (goal <= 0.70x), "
                         f"added by the steps {st[f'{m}_added_ratio']:.2f}x")
            print(line + f"; MFU {st[f'{m}_fused']['mfu']:.0%} (goal >= 70%)", flush=True)

    if args.profile:
        results["profile"] = {f"retro_{'fused' if f else 'old'}": profile_step(True, f) for f in (False, True)}
    results["load_avg_after"] = os.getloadavg()
    print(f"load average before / after: {results['load_avg_before'][0]:.1f} / {results['load_avg_after'][0]:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

