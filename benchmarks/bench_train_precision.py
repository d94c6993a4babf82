"""bf16 against fp32 training on the CPU, through `retro-ray train`'s own path (Ray Train + DeepSpeed).

trainer.precision=auto trains in bf16 on CPUs with AMX (bf16 matrix tiles). This benchmark measures
what that buys and what it costs, in one run: for RETRO and its GPT baseline, the same config is
trained with trainer.precision=32 and =bf16 (DeepSpeed bf16: bf16 weights and activations, fp32 master
weights), the two in alternating order, on the same synthetic data from the same seed. Reported:

    tokens/s       median over the timed steps, each timed by the workers (rank 0's clock)
    bf16 / 32      the ratio of the two
    MFU            against the 1-thread torch.mm peak of the run's own dtype (fp32 or bf16, measured
                   here at the start and again at the end), times the workers
    final loss     the training loss of the last step, to see that the two precisions learn alike

Configs: ``demo`` (train_demo.yaml as `make demo` trains it: 2 workers of 1 CPU, dropouts on, two
micro-batches of 4 x 256 a step) and ``cpu50k`` (issue 19's shape: vocabulary 50,304, sequence 512, no
dropout, 1 worker, one micro-batch of 8 a step).

Run:  .venv/bin/python benchmarks/bench_train_precision.py [--configs demo,cpu50k] [--steps 12]
      [--warmup 3] [--rounds 1] [--json results/bench_train_precision.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train as bt  # noqa: E402
import torch  # noqa: E402
from benchlib import matmul_peak_flops  # noqa: E402

from retro_ray.model.retro import RetroModel  # noqa: E402
from retro_ray.runtime import cpu_has_amx, cpu_has_native_bf16  # noqa: E402
from retro_ray.train.config import resolve_model_config  # noqa: E402

WORKERS = {"demo": 2, "cpu50k": 1}
BATCH = {"demo": (None, None), "cpu50k": (8, 8)}  # (micro, global); None: the YAML's
DTYPES = {"32": torch.float32, "bf16": torch.bfloat16}


def peaks() -> dict[str, float]:
    return {p: matmul_peak_flops(1, dtype=dt) for p, dt in DTYPES.items()}


def run_one(name: str, retro: bool, precision: str, args: argparse.Namespace, peak: float, work_dir: Path) -> dict:
    steps = args.warmup + args.steps
    micro, global_batch = BATCH[name]
    extra = [f"trainer.precision={precision}", f"trainer.peak_flops={peak}"]
    cfg = bt.make_config(name, "cpu", steps, micro, global_batch, retro=retro, extra=extra, workers=WORKERS[name])
    seq, chunk, vocab = bt.DATA[name]
    with torch.device("meta"):
        flops_per_token = RetroModel(resolve_model_config(cfg, seq, chunk, vocab)).flops_per_token()
    factory = bt.factory_for(name, n_train=max(256, steps * cfg.model.global_batch_size))
    out = bt.run_ray(cfg, factory, args.warmup, work_dir, flops_per_token)
    out["precision"] = precision
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="demo", help="comma list of demo,cpu50k")
    ap.add_argument("--steps", type=int, default=12, help="timed steps a run")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timed region")
    ap.add_argument("--rounds", type=int, default=1, help="pairs of runs per model (order alternates)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    native, how = cpu_has_native_bf16()
    print(f"CPU: AMX {'yes' if cpu_has_amx() else 'no'}; native bf16: {native} ({how}); {os.cpu_count()} CPUs")
    if not cpu_has_amx():
        print("this CPU has no AMX: trainer.precision=auto trains in 32 here, and bf16 is expected to be slower")
    cpu_tuning_kept = bt.cpu_tuning.keep_freed_memory()  # as the workers (they set it themselves too)
    start_peaks = peaks()
    print("1-thread torch.mm 2048^3 peaks: " + ", ".join(f"{p} {v / 1e9:,.0f} GFLOP/s" for p, v in start_peaks.items()),
          flush=True)

    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    work_dir = Path(tempfile.mkdtemp(prefix="bench_train_precision_"))
    results: dict = {"cpu_amx": cpu_has_amx(), "native_bf16": how, "keeps_freed_memory": cpu_tuning_kept,
                     "peaks_start": start_peaks, "load_avg_before": os.getloadavg(), "configs": {}}
    for name in args.configs.split(","):
        per_model = {}
        for retro in (True, False):
            model = "RETRO" if retro else "GPT"
            runs: dict[str, list[dict]] = {"32": [], "bf16": []}
            for r in range(args.rounds):
                order = ("32", "bf16") if (r + (0 if retro else 1)) % 2 == 0 else ("bf16", "32")
                for precision in order:
                    t0 = time.perf_counter()
                    res = run_one(name, retro, precision, args, start_peaks[precision], work_dir)
                    runs[precision].append(res)
                    print(f"  {name} {model:5s} {precision:>4}: {res['tokens_per_s']:8,.0f} tokens/s, MFU "
                          f"{100 * res['mfu']:.1f} % of the {precision} peak, final loss {res['final_loss']:.4f} "
                          f"({time.perf_counter() - t0:.0f} s with start-up)", flush=True)
            tps = {p: statistics.median(x["tokens_per_s"] for x in v) for p, v in runs.items()}
            per_model[model] = {"runs": runs, "tokens_per_s": tps, "bf16_vs_32": tps["bf16"] / tps["32"],
                                "final_loss": {p: [x["final_loss"] for x in v] for p, v in runs.items()}}
            print(f"  {name} {model}: bf16 / 32 tokens/s = {per_model[model]['bf16_vs_32']:.2f}x", flush=True)
        results["configs"][name] = per_model
    ray.shutdown()
    results["peaks_end"] = peaks()
    results["load_avg_after"] = os.getloadavg()
    print("1-thread peaks at the end: " + ", ".join(f"{p} {v / 1e9:,.0f} GFLOP/s" for p, v in results["peaks_end"].items()))
    print(f"load average before / after: {results['load_avg_before'][0]:.1f} / {results['load_avg_after'][0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
