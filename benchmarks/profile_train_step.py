"""Where one CPU training step's time goes: torch.profiler over bench_train.py's plain loop.

The step is ``bench_train.PlainLoop.step`` (the same model, data, AdamW groups, schedule and clipping
as the trainer's step, without Ray or DeepSpeed), after ``--warmup`` unprofiled steps, in a process
that keeps freed memory (as the trainer's CPU workers). Every profiled operator's own (self) CPU time
is put in one row of a table, first by where it ran (inside the optimizer step, gradient clipping,
or the fused output layer + loss), then by what it is:

    output layer + loss   everything inside model/loss.py's Function, forward and backward (its
                          matmuls included)
    other matmuls         mm / addmm / bmm / baddbmm elsewhere (linear layers, written-out attention)
    attention kernels     SDPA's CPU flash kernels, forward and backward
    softmax               other softmax and its backward (the written-out attention with dropout)
    elementwise           mul, add, sub, div, neg, where, ... (RoPE, residuals, dropout products)
    copies / fills        copy_, cat, clone, fill_ / zero_ (layout changes, bias broadcast into
                          addmm's output, zeroed gradient buffers)
    GELU, LayerNorm       forward and backward
    embedding             lookups and the dense [V, d] gradient of the table
    optimizer, clipping   AdamW's step, clip_grad_norm_
    other                 the rest (reductions, masks, Python-side operator overhead ...)

``--tree PATH`` profiles another source tree of this project (e.g. ``git archive COMMIT | tar -x -C
PATH``) with that tree's bench_train.py and model, so that two commits can be compared.

Run:  .venv/bin/python benchmarks/profile_train_step.py [--configs cpu50k|demo] [--gpt] [--bf16] [--threads 1]
      [--warmup 2] [--tree PATH] [--top 25] [--json OUT]
cpu50k: issue 19's shape, one micro-batch of 8 sequences a step; demo: train_demo.yaml, 2 micro-batches of 4.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

BATCH = {"cpu50k": (8, 8), "demo": (4, 8)}  # (micro, global), as bench_train_ab.py
GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
BY_NAME = [  # (category, operator names); first match wins
    ("other matmuls", GEMMS),
    ("attention kernels", ("aten::_scaled_dot_product_flash_attention_for_cpu",
                           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")),
    ("softmax", ("aten::_softmax", "aten::_softmax_backward_data")),
    ("GELU", ("aten::gelu", "aten::gelu_backward")),
    ("LayerNorm", ("aten::native_layer_norm", "aten::native_layer_norm_backward")),
    ("embedding", ("aten::embedding_dense_backward", "aten::index_select", "aten::embedding")),
    ("copies / fills", ("aten::copy_", "aten::cat", "aten::clone", "aten::fill_", "aten::zero_")),
    ("elementwise", ("aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::sub", "aten::sub_",
                     "aten::div", "aten::div_", "aten::neg", "aten::where", "aten::masked_fill_",
                     "aten::masked_fill", "aten::rsub")),
]
BY_ANCESTOR = [  # (category, prefix of an enclosing event's name)
    ("optimizer", "Optimizer.step"),
    ("clipping", "clip_grad_norm_"),
    ("output layer + loss", "_LinearCrossEntropy"),
    ("embedding", "EmbeddingBackward"),
]


def category(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        for name, prefix in BY_ANCESTOR:
            if parent.name.startswith(prefix):
                return name
        parent = parent.cpu_parent
    if event.name.startswith("_LinearCrossEntropy"):
        return "output layer + loss"
    for name, ops in BY_NAME:
        if event.name in ops:
            return name
    return "other"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", dest="config", default="cpu50k", choices=sorted(BATCH))
    ap.add_argument("--gpt", action="store_true", help="the same decoder without retrieval")
    ap.add_argument("--bf16", action="store_true",
                    help="the model's weights in bf16, as DeepSpeed's bf16 engine holds them (AdamW then steps the "
                         "bf16 weights themselves, without DeepSpeed's float32 master copies)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2, help="unprofiled steps first")
    ap.add_argument("--tree", default=None, help="another source tree of this project (default: this one)")
    ap.add_argument("--top", type=int, default=25, help="also list the operators with the most self time")
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)

    tree = Path(args.tree).resolve() if args.tree else Path(__file__).resolve().parent.parent
    sys.path[:0] = [str(tree / "benchmarks"), str(tree)]
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(args.threads)
    import bench_train as bt

    from retro_ray.train import cpu_tuning
    from retro_ray.train.config import resolve_model_config

    cpu_tuning.keep_freed_memory()
    clip = torch.nn.utils.clip_grad_norm_

    def labelled_clip(*a, **kw):
        with record_function("clip_grad_norm_"):
            return clip(*a, **kw)

    torch.nn.utils.clip_grad_norm_ = labelled_clip  # bench_train calls it through torch.nn.utils
    seq, chunk, vocab = bt.DATA[args.config]
    micro, global_batch = BATCH[args.config]
    cfg = bt.make_config(args.config, "cpu", args.warmup + 1, micro, global_batch, retro=not args.gpt, workers=1)
    loop = bt.PlainLoop(cfg, resolve_model_config(cfg, seq, chunk, vocab), bt.factory_for(args.config, 256), "cpu")
    if args.bf16:
        loop.model.to(torch.bfloat16)  # in place: the optimizer keeps the same parameters
    for s in range(args.warmup):
        loop.step(s)
    load = os.getloadavg()[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        loop.step(args.warmup)
        wall = time.perf_counter() - t0
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    rows: dict[str, float] = collections.Counter()
    for e in events:
        rows[category(e)] += e.self_cpu_time_total / 1e3  # ms
    total = sum(rows.values())
    model = "GPT" if args.gpt else "RETRO"
    model += ", bf16" if args.bf16 else ""
    print(f"{args.config} {model}, {args.threads} thread(s), tree {tree}: profiled step {wall * 1e3:,.0f} ms wall, "
          f"{total:,.0f} ms of operator self time; load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"| {'where the time goes':<22} | ms | share |\n|---|---|---|")
    for name, ms in sorted(rows.items(), key=lambda kv: -kv[1]):
        print(f"| {name:<22} | {ms:,.0f} | {100 * ms / total:.1f} % |")
    if args.top:
        print(f"\noperators with the most self time (top {args.top}):")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"  {e.key[:60]:<60} {e.self_cpu_time_total / 1e3:8.1f} ms {100 * e.self_cpu_time_total / 1e3 / total:5.1f} % "
                  f"n={e.count}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "model": model, "tree": str(tree),
                                               "threads": args.threads, "step_wall_ms": wall * 1e3,
                                               "self_ms_total": total, "categories_ms": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
