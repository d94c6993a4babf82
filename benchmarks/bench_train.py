"""Benchmark of the train stage: Ray Train + DeepSpeed against a plain PyTorch loop, RETRO against GPT.

What is measured (one run of this script)
    ray_deepspeed  ``retro_ray.train.trainer.run``: a Ray Train TorchTrainer whose workers drive a
                   DeepSpeed engine (CPU: 2 workers x 1 CPU, gloo; CUDA: 1 worker, 1 GPU, nccl).
                   tokens/s is taken from the workers' own step timers (the per-window tokens/s the
                   training loop logs), over the steps after ``--warmup``: Ray start-up, worker
                   start-up, DeepSpeed initialisation, the first steps and the final checkpoint
                   report are all outside the timed region.
    plain          one process, no Ray, no DeepSpeed: the same RetroModel, the same synthetic data
                   (same items, same collate), the same global batch as the same micro-batches
                   (accumulated, one update per step), the same torch.optim.AdamW parameter
                   groups, LR schedule and gradient clipping. Timed over the same steps after the
                   same warm-up (CUDA: synchronised).
    retro vs gpt   the plain loop again with retro.enabled=false (the same decoder, no encoder and
                   no chunked cross-attention): step-time ratio, next to the ratio of the model's
                   own FLOP counts (``RetroModel.flops_per_token``), which bounds what any
                   implementation can reach. A third loop, interleaved with both, runs RETRO with
                   an encoder half the decoder's width (model.retro.retro_encoder_hidden_size), and
                   a fourth the RETRO-fit of the same model (model.retro.freeze_decoder: only the
                   encoder and CCA train), whose step time is compared with RETRO's.
    fused loss     (``--compare-unfused``) two more interleaved loops, RETRO and GPT with the output
                   layer and cross-entropy unfused (``retro_ray.model.loss.fused_loss(False)``: the
                   whole [B, n, V] logits, then F.cross_entropy, as before issue 19): tokens/s of the
                   fused loss (the default) over the unfused one, the same model code otherwise.
    MFU            every loop's achieved FLOP/s (``RetroModel.flops_per_token`` x tokens/s) and its
                   fraction of the peak. CPU: the peak is measured at the start of the same run, the
                   best of 20 ``torch.mm`` of two 2048 x 2048 fp32 matrices at the loop's thread count
                   (``benchlib.matmul_peak_flops``; 1 thread for the interleaved loops and for each
                   Ray worker, which gets ``trainer.peak_flops`` so the workers log their MFU too).
                   CUDA: the bf16 dense peak from the table in ``retro_ray.train.loop``.
    dropout masks  (CPU) the plain loop with this project's CPU dropout masks (numpy SFC64,
                   ``retro_ray.train.cpu_tuning.tune_model``, as the trainer's CPU workers) against
                   the same loop with the model left untuned, drawing them with torch's
                   ``bernoulli_``, steps interleaved; the demo model's dropouts are the reference's 0.1.

CPU (default): the model of ``train_demo.yaml`` (6 layers, d=256, 8 heads, CCA in layers 3 and 6,
2 neighbours) at seq_length 256, chunk_length 64, vocabulary 8192, fp32, global batch 8 (micro 4).
Both sides get the machine's 2 cores: Ray gives each 1-CPU worker one intra-op thread; the plain loop
uses torch's default (one thread per core; --plain-threads to change). The plain loop runs before and
after the Ray run and the two are averaged; per-step medians are reported (means in the JSON), and
the load average, because on a shared machine a 2-thread loop stalls on OpenMP barriers whenever
other processes hold the cores.

CUDA (``--device cuda``, for a GPU machine; not run on CPU-only hosts): bf16, single GPU, for the
demo config (micro 32, global 64) and the 125M config (12 layers, d=768, seq 2048, vocabulary
50304, ZeRO-1, micro 8, global 64), reporting tokens/s and MFU (bf16 dense peak from the table in
``retro_ray.train.loop``) for the Ray + DeepSpeed path (DeepSpeed bf16: bf16 weights, fp32 master
copies) and the plain loop (bf16 autocast, fp32 weights), and RETRO vs GPT step time. Both sides
are torch.compiled there (trainer.compile=auto; the plain loop compiles its model in place).

``--configs cpu50k`` (CPU): issue 19's shape, the demo decoder (6 x 256, FFN 1024, CCA in layers 3
and 6, K = 2 neighbours of 128 tokens) with 4 heads, sequence 512, vocabulary 50,304 and no dropout.
One forward of 8 sequences a step, as issue 19 measured it, with the fused / unfused A/B:
      .venv/bin/python benchmarks/bench_train.py --configs cpu50k --retro-vs-gpt-only --compare-unfused \
          --micro-batch-size 8 --global-batch-size 8 --warmup 1 --steps 3

Run:  .venv/bin/python benchmarks/bench_train.py [--device cpu|cuda] [--steps 20] [--warmup 5]
      [--configs demo,125m,cpu50k] [--work-dir DIR] [--retro-vs-gpt-only] [--compare-unfused]
The RETRO / GPT ratio at the 125M shape on a CPU (two sequences of 2048 tokens a step; without
dropout, as gpu_model_bench.py, so that CPU attention takes SDPA's memory-light path: ~8 GB):
      .venv/bin/python benchmarks/bench_train.py --configs 125m --retro-vs-gpt-only --micro-batch-size 1 \
          --global-batch-size 2 --warmup 1 --steps 3 --override model.hidden_dropout=0 \
          --override model.attention_dropout=0 --override model.ffn_dropout=0 \
          --override model.retro.retro_encoder_hidden_dropout=0 --override model.retro.retro_encoder_attention_dropout=0
On CPU both the plain loops (this process) and the Ray workers keep freed memory in the process, as
``retro-ray train``'s CPU workers do (trainer.cpu_keep_freed_memory; ``retro_ray.train.cpu_tuning``):
with glibc's default allocator large freed tensors go back to the system and are faulted in again at
every step, which at the 125M shape weighs on RETRO more than on GPT (benchmarks/README.md: 1.31-1.42x
against 1.20x kept). --default-allocator turns that off on both sides.
Writes <work-dir>/bench_train.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import matmul_peak_flops

from retro_ray.model.loss import fused_loss
from retro_ray.model.retro import RetroConfig, RetroModel
from retro_ray.model.retrofit import freeze_decoder, zero_cca_outputs
from retro_ray.train import cpu_tuning, trainer
from retro_ray.train.config import TrainConfig, load_train_config, lr_at, resolve_model_config
from retro_ray.train.loop import collate, gpu_peak_flops, param_groups
from retro_ray.train.synthetic import SyntheticDatasetFactory

DATA = {  # seq_length, chunk_length, tokenizer vocabulary
    "demo": (256, 64, 8192),
    "125m": (2048, 64, 50257),
    "cpu50k": (512, 64, 50257),  # vocabulary padded to 50,304
}
# Configs that are a shipped YAML plus settings: name -> (YAML, overrides).
PRESETS = {
    "cpu50k": ("demo", ["model.num_attention_heads=4", "model.hidden_dropout=0", "model.attention_dropout=0",
                        "model.ffn_dropout=0", "model.retro.retro_encoder_hidden_dropout=0",
                        "model.retro.retro_encoder_attention_dropout=0"]),
}
# (micro, global) batch sizes on one GPU, unless given on the command line; on CPU the YAML's.
CUDA_BATCH = {"demo": (32, 64), "125m": (8, 64)}


def make_config(name: str, device: str, steps: int, micro: int | None, global_batch: int | None,
                retro: bool = True, extra: list[str] | None = None, workers: int = 2) -> TrainConfig:
    """workers: CPU Ray workers (1 where no Ray run follows, so that one micro-batch can be the
    whole global batch)."""
    yaml, preset = PRESETS.get(name, (name, []))
    overrides = preset + [
        f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", f"trainer.checkpoint_interval={steps}",
        "trainer.limit_val_batches=0", f"model.optim.sched.warmup_steps={max(1, steps // 10)}",
        f"exp_manager.name=bench_{name}_{'retro' if retro else 'gpt'}",
        "exp_manager.create_tensorboard_logger=false",
    ]
    if device == "cpu":
        overrides += [f"trainer.num_workers={workers}", "trainer.use_gpu=false", "trainer.precision=32", "trainer.zero_stage=0"]
    else:  # the YAML's ZeRO stage (125m: 1)
        overrides += ["trainer.num_workers=1", "trainer.use_gpu=true", "trainer.precision=bf16"]
        micro = micro or CUDA_BATCH[name][0]
        global_batch = global_batch or CUDA_BATCH[name][1]
    if micro:
        overrides.append(f"model.micro_batch_size={micro}")
    if global_batch:
        overrides.append(f"model.global_batch_size={global_batch}")
    if not retro:
        overrides.append("model.retro.enabled=false")
    return load_train_config(yaml, overrides + list(extra or []))


def factory_for(name: str, n_train: int) -> SyntheticDatasetFactory:
    seq, chunk, vocab = DATA[name]
    return SyntheticDatasetFactory(n_train=n_train, n_valid=8, seq_length=seq, chunk_length=chunk,
                                   num_neighbors=2, vocab_size=vocab, seed=0)


# ------------------------------------------------------------------------------------------------
# Ray Train + DeepSpeed
# ------------------------------------------------------------------------------------------------
def run_ray(cfg: TrainConfig, factory: SyntheticDatasetFactory, warmup: int, work_dir: Path,
            flops_per_token: float) -> dict:
    exp_dir = Path(tempfile.mkdtemp(prefix="bench_train_", dir=work_dir))
    t0 = time.perf_counter()
    trainer.run(cfg, factory, factory.model_data(), exp_dir)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (exp_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train" and r["step"] > warmup]
    # log_every_n_steps=1 and no validation / checkpoint inside the timed steps: one record per step,
    # each timed by the workers themselves (rank 0's clock, after the step's gradient all-reduce).
    peak = cfg.trainer.peak_flops * cfg.trainer.num_workers if cfg.trainer.peak_flops else None  # all workers
    out = summarize([r["step_time_s"] for r in steps], cfg.model.global_batch_size * factory.seq_length,
                    flops_per_token, peak)
    mfu = [r["mfu"] for r in steps if r.get("mfu")]
    out["mfu_logged_by_workers"] = statistics.median(mfu) if mfu else None
    event = next(r for r in records if r["kind"] == "event")
    out.update(wall_s_including_startup=wall, worker_init={k: v for k, v in event.items() if k.endswith("_s")},
               final_loss=steps[-1]["train_loss"])
    return out


# ------------------------------------------------------------------------------------------------
# The plain single-process loop
# ------------------------------------------------------------------------------------------------
class PlainLoop:
    """One process, no Ray, no DeepSpeed; ``step(i)`` makes optimizer step i and returns its seconds.
    On CPU the model gets the CPU workers' fast dropout masks (cpu_tuning.tune_model) unless
    ``cpu_tuned`` is false (it then draws them with torch's bernoulli_)."""

    def __init__(self, cfg: TrainConfig, model_cfg: RetroConfig, factory: SyntheticDatasetFactory, device: str,
                 cpu_tuned: bool = True):
        self.cfg, self.model_cfg, self.device = cfg, model_cfg, device
        self.dev = torch.device(device)
        torch.manual_seed(cfg.trainer.seed)
        self.model = RetroModel(model_cfg).to(self.dev)
        if model_cfg.retro.enabled and model_cfg.retro.freeze_decoder:  # a RETRO-fit, as model.init_from makes it
            zero_cca_outputs(self.model)
            freeze_decoder(self.model)
        if device == "cpu" and cpu_tuned:  # as retro-ray train's CPU workers
            cpu_tuning.tune_model(self.model)
        if device == "cuda":
            self.model.compile()  # in place, as the trainer's trainer.compile=auto does on GPU workers
        o = cfg.model.optim
        self.opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                     eps=o.eps, fused=True)  # as the trainer (retro_ray.train.loop.build_engine)
        self.ds = factory("train")
        g = torch.Generator().manual_seed(cfg.trainer.seed)
        self.order = torch.randperm(len(self.ds), generator=g).tolist()
        self.loss = float("nan")

    def step(self, step: int) -> float:
        cfg, B, micro = self.cfg, self.cfg.model.global_batch_size, self.cfg.model.micro_batch_size
        accumulation = B // micro  # the same micro-batches as all the workers together; one update per step
        with_neighbors = self.model_cfg.retro.enabled
        t0 = time.perf_counter()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        idx = [self.order[(step * B + i) % len(self.order)] for i in range(B)]
        self.opt.zero_grad(set_to_none=True)
        for a in range(accumulation):
            items = [self.ds[i] for i in idx[a * micro:(a + 1) * micro]]
            batch = {k: v.to(self.dev, non_blocking=True) for k, v in collate(items, with_neighbors).items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
                out = self.model(**batch)
            (out.loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.trainer.gradient_clip_val)
        self.opt.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.loss = out.loss.item()
        return time.perf_counter() - t0


def summarize(step_times: list[float], tokens_per_step: int, flops_per_token: float | None, peak: float | None) -> dict:
    """Median-based (robust to a busy machine's spikes) and mean-based rates over the timed steps."""
    med, mean = statistics.median(step_times), statistics.fmean(step_times)
    tps = tokens_per_step / med
    achieved = flops_per_token * tps if flops_per_token else None
    return {"tokens_per_s": tps, "tokens_per_s_mean_based": tokens_per_step / mean, "step_time_s": med,
            "step_time_s_mean": mean, "timed_steps": len(step_times), "flops_per_token": flops_per_token,
            "achieved_flops_per_s": achieved, "peak_flops_per_s": peak,
            "mfu": achieved / peak if (peak and achieved) else None}


def peak_for(device: str, cpu_peaks: dict[int, float], threads: int | None = None) -> float | None:
    """The MFU denominator: CPU, the matmul peak measured at ``threads`` (default: the current count)
    in this run; CUDA, the GPU's bf16 dense peak from the table."""
    if device == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name())
    return cpu_peaks.get(threads or torch.get_num_threads())


def run_plain(cfg: TrainConfig, model_cfg: RetroConfig, factory: SyntheticDatasetFactory, warmup: int,
              device: str, cpu_peaks: dict[int, float]) -> dict:
    loop = PlainLoop(cfg, model_cfg, factory, device)
    times = [loop.step(s) for s in range(cfg.trainer.max_steps)][warmup:]
    peak = peak_for(device, cpu_peaks)
    out = summarize(times, cfg.model.global_batch_size * model_cfg.seq_length, loop.model.flops_per_token(), peak)
    return {**out, "final_loss": loop.loss, "threads": torch.get_num_threads()}


def interleaved(loops: list[PlainLoop], steps: int, contexts: list | None = None) -> list[list[float]]:
    """Step i of every loop in turn (loop j inside ``contexts[j]()``), for every step, so that all
    see the same machine load; each loop's step times."""
    contexts = contexts or [contextlib.nullcontext] * len(loops)
    times: list[list[float]] = [[] for _ in loops]
    for s in range(steps):
        for loop, context, t in zip(loops, contexts, times):
            with context():
                t.append(loop.step(s))
    return times


def narrow_encoder(model_cfg: RetroConfig) -> RetroConfig:
    """The same RETRO with an encoder half the decoder's width (retro.retro_encoder_hidden_size)."""
    width = model_cfg.hidden_size // 2
    return dataclasses.replace(model_cfg, retro=dataclasses.replace(model_cfg.retro, retro_encoder_hidden_size=width))


def run_retro_vs_gpt(cfg: TrainConfig, model_cfg: RetroConfig, gpt_cfg: TrainConfig, gpt_model_cfg: RetroConfig,
                     factory: SyntheticDatasetFactory, warmup: int, device: str, cpu_peaks: dict[int, float],
                     compare_unfused: bool = False) -> dict:
    """Four plain loops, their steps interleaved (RETRO step i, RETRO with an encoder of width d/2
    step i, GPT step i, RETRO-fit step i), so that all see the same machine load; the ratios of their
    median step times to GPT's (CPU: one thread). compare_unfused: two more, RETRO and GPT with the
    unfused output layer and loss (fused_loss(False)), and the fused / unfused tokens/s ratios."""
    retro = PlainLoop(cfg, model_cfg, factory, device)
    narrow = PlainLoop(cfg, narrow_encoder(model_cfg), factory, device)
    gpt = PlainLoop(gpt_cfg, gpt_model_cfg, factory, device)
    fit = PlainLoop(cfg, dataclasses.replace(model_cfg, retro=dataclasses.replace(model_cfg.retro, freeze_decoder=True)),
                    factory, device)
    loops = [retro, narrow, gpt, fit]
    contexts: list = [contextlib.nullcontext] * 4
    if compare_unfused:
        loops += [PlainLoop(cfg, model_cfg, factory, device), PlainLoop(gpt_cfg, gpt_model_cfg, factory, device)]
        contexts += [lambda: fused_loss(False)] * 2
    threads = torch.get_num_threads()
    if device == "cpu":
        # One intra-op thread, as in each Ray worker: a ratio does not need both cores, and a single
        # thread does not stall on OpenMP barriers when the machine is shared.
        torch.set_num_threads(1)
    try:
        rt, nt, gt, ft, *unfused = interleaved(loops, cfg.trainer.max_steps, contexts)
        peak = peak_for(device, cpu_peaks)
    finally:
        torch.set_num_threads(threads)
    tokens = cfg.model.global_batch_size * model_cfg.seq_length
    out = {"retro": summarize(rt[warmup:], tokens, retro.model.flops_per_token(), peak),
           "retro_narrow_encoder": summarize(nt[warmup:], tokens, narrow.model.flops_per_token(), peak),
           "narrow_encoder_hidden_size": narrow.model.config.encoder_hidden_size,
           "gpt": summarize(gt[warmup:], tokens, gpt.model.flops_per_token(), peak),
           "retrofit": summarize(ft[warmup:], tokens, None, peak)}
    if compare_unfused:
        out["retro_unfused_loss"] = summarize(unfused[0][warmup:], tokens, retro.model.flops_per_token(), peak)
        out["gpt_unfused_loss"] = summarize(unfused[1][warmup:], tokens, gpt.model.flops_per_token(), peak)
        for m in ("retro", "gpt"):
            out[f"{m}_fused_vs_unfused_tokens_per_s"] = (out[m]["tokens_per_s"]
                                                         / out[f"{m}_unfused_loss"]["tokens_per_s"])
    return out


def run_dropout_masks(cfg: TrainConfig, model_cfg: RetroConfig, factory: SyntheticDatasetFactory, warmup: int) -> dict:
    """CPU: two identical plain loops, one drawing dropout masks with torch's bernoulli_, steps
    interleaved so both see the same machine load; the ratio of their median step times."""
    fast, slow = PlainLoop(cfg, model_cfg, factory, "cpu"), PlainLoop(cfg, model_cfg, factory, "cpu", cpu_tuned=False)
    ft, st = interleaved([fast, slow], cfg.trainer.max_steps)
    tokens = cfg.model.global_batch_size * model_cfg.seq_length
    out = {"fast_masks": summarize(ft[warmup:], tokens, None, None),
           "torch_masks": summarize(st[warmup:], tokens, None, None)}
    out["speedup"] = out["torch_masks"]["step_time_s"] / out["fast_masks"]["step_time_s"]
    return out


def flops_ratio(model_cfg: RetroConfig) -> float:
    gpt = dataclasses.replace(model_cfg, retro=dataclasses.replace(model_cfg.retro, enabled=False))
    with torch.device("meta"):
        return RetroModel(model_cfg).flops_per_token() / RetroModel(gpt).flops_per_token()


# ------------------------------------------------------------------------------------------------
def line(label: str, r: dict) -> None:
    mfu = f", {r['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s" if r.get("achieved_flops_per_s") else ""
    mfu += f", MFU {r['mfu']:.3f}" if r.get("mfu") else ""
    print(f"  {label:<26} {r['tokens_per_s']:10,.0f} tokens/s  (median step {r['step_time_s'] * 1e3:,.0f} ms, "
          f"mean {r['step_time_s_mean'] * 1e3:,.0f} ms{mfu})", flush=True)


def bench_config(name: str, args: argparse.Namespace, work_dir: Path) -> dict:
    steps = args.warmup + args.steps
    seq, chunk, vocab = DATA[name]
    workers = 1 if args.retro_vs_gpt_only else 2  # CPU: no Ray run, so one micro-batch may be the whole batch
    cfg = make_config(name, args.device, steps, args.micro_batch_size, args.global_batch_size, extra=args.override,
                      workers=workers)
    gpt_cfg = make_config(name, args.device, steps, args.micro_batch_size, args.global_batch_size, retro=False,
                          extra=args.override, workers=workers)
    factory = factory_for(name, n_train=max(256, steps * cfg.model.global_batch_size))
    model_cfg = resolve_model_config(cfg, seq, chunk, vocab)
    gpt_model_cfg = resolve_model_config(gpt_cfg, seq, chunk, vocab)
    with torch.device("meta"):
        meta = RetroModel(model_cfg)
        n_params, flops_per_token = meta.num_parameters(), meta.flops_per_token()
    print(f"\n== {name}: {n_params / 1e6:.1f}M parameters, seq {seq}, chunk {chunk}, vocab {model_cfg.vocab_size}, "
          f"global batch {cfg.model.global_batch_size}, micro {cfg.model.micro_batch_size}, "
          f"{cfg.trainer.num_workers} worker(s), {cfg.trainer.precision}; {args.warmup} warm-up + {args.steps} timed steps",
          flush=True)
    out: dict = {"config": name, "parameters": n_params, "global_batch_size": cfg.model.global_batch_size,
                 "micro_batch_size": cfg.model.micro_batch_size, "num_workers": cfg.trainer.num_workers,
                 "precision": cfg.trainer.precision, "seq_length": seq}
    out["load_avg_before"] = os.getloadavg()
    if not args.retro_vs_gpt_only:
        # plain, then Ray + DeepSpeed, then plain again: the two plain runs bracket the Ray run in
        # time, so a change in the machine's load shows up as a difference between them.
        out["plain_before"] = run_plain(cfg, model_cfg, factory, args.warmup, args.device, args.cpu_peaks)
        line("plain pytorch (before)", out["plain_before"])
        ray_cfg = cfg
        if args.device == "cpu" and not cfg.trainer.peak_flops:  # each worker runs one intra-op thread
            ray_cfg = make_config(name, args.device, steps, args.micro_batch_size, args.global_batch_size,
                                  extra=[*args.override, f"trainer.peak_flops={args.cpu_peaks[1]}"])
        out["ray_deepspeed"] = run_ray(ray_cfg, factory, args.warmup, work_dir, flops_per_token)
        line("ray + deepspeed", out["ray_deepspeed"])
        out["plain_after"] = run_plain(cfg, model_cfg, factory, args.warmup, args.device, args.cpu_peaks)
        line("plain pytorch (after)", out["plain_after"])
        plain_tps = statistics.fmean([out["plain_before"]["tokens_per_s"], out["plain_after"]["tokens_per_s"]])
        out["ray_vs_plain"] = out["ray_deepspeed"]["tokens_per_s"] / plain_tps
    out["retro_vs_gpt"] = run_retro_vs_gpt(cfg, model_cfg, gpt_cfg, gpt_model_cfg, factory, args.warmup, args.device,
                                           args.cpu_peaks, args.compare_unfused)
    line("plain RETRO (interleaved)", out["retro_vs_gpt"]["retro"])
    line(f"  encoder width {out['retro_vs_gpt']['narrow_encoder_hidden_size']}", out["retro_vs_gpt"]["retro_narrow_encoder"])
    line("plain GPT (interleaved)", out["retro_vs_gpt"]["gpt"])
    line("plain RETRO-fit, frozen decoder", out["retro_vs_gpt"]["retrofit"])
    if args.compare_unfused:
        line("plain RETRO, unfused loss", out["retro_vs_gpt"]["retro_unfused_loss"])
        line("plain GPT, unfused loss", out["retro_vs_gpt"]["gpt_unfused_loss"])
    out["retrofit_vs_retro_step_time"] = (out["retro_vs_gpt"]["retrofit"]["step_time_s"]
                                          / out["retro_vs_gpt"]["retro"]["step_time_s"])
    gpt_step = out["retro_vs_gpt"]["gpt"]["step_time_s"]
    out["retro_vs_gpt_step_time"] = out["retro_vs_gpt"]["retro"]["step_time_s"] / gpt_step
    out["retro_vs_gpt_flops"] = flops_ratio(model_cfg)
    out["narrow_encoder_vs_gpt_step_time"] = out["retro_vs_gpt"]["retro_narrow_encoder"]["step_time_s"] / gpt_step
    out["narrow_encoder_vs_gpt_flops"] = flops_ratio(narrow_encoder(model_cfg))
    if args.device == "cpu" and not args.retro_vs_gpt_only:
        out["dropout_masks"] = run_dropout_masks(cfg, model_cfg, factory, args.warmup)
        line("plain, fast CPU masks", out["dropout_masks"]["fast_masks"])
        line("plain, torch bernoulli_", out["dropout_masks"]["torch_masks"])
    out["load_avg_after"] = os.getloadavg()
    if "ray_vs_plain" in out:
        print(f"  ratio ray+deepspeed / plain tokens/s: {out['ray_vs_plain']:.2f}x  (goal >= 0.85x; plain = mean "
              "of the runs before and after)")
    print(f"  ratio RETRO / GPT step time:          {out['retro_vs_gpt_step_time']:.2f}x  (goal <= 1.3x; "
          f"the FLOP ratio of these two models is {out['retro_vs_gpt_flops']:.2f}x)")
    print(f"    with an encoder of width d/2:       {out['narrow_encoder_vs_gpt_step_time']:.2f}x  "
          f"(FLOP ratio {out['narrow_encoder_vs_gpt_flops']:.2f}x; model.retro.retro_encoder_hidden_size="
          f"{out['retro_vs_gpt']['narrow_encoder_hidden_size']})")
    print(f"  ratio RETRO-fit / RETRO step time:    {out['retrofit_vs_retro_step_time']:.2f}x  (goal <= 0.6x at 125M; "
          "frozen decoder: no weight gradients below CCA, no optimizer state for it)")
    if args.compare_unfused:
        r = out["retro_vs_gpt"]
        print(f"  fused / unfused loss, tokens/s:       RETRO {r['retro_fused_vs_unfused_tokens_per_s']:.2f}x, "
              f"GPT {r['gpt_fused_vs_unfused_tokens_per_s']:.2f}x  (issue 19: >= 1.15x at the cpu50k shape)")
    if "dropout_masks" in out:
        print(f"  speed-up of fast CPU dropout masks:   {out['dropout_masks']['speedup']:.2f}x  (same loop, masks drawn "
              "with torch's bernoulli_ as the baseline)")
    print(f"  load average before / after: {out['load_avg_before'][0]:.1f} / {out['load_avg_after'][0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--configs", default=None, help="comma list of demo,125m (default: demo on cpu, demo,125m on cuda)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timed region")
    ap.add_argument("--plain-threads", type=int, default=None,
                    help="intra-op threads of the plain loop (default: torch's, one per core)")
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--global-batch-size", type=int, default=None)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="a train setting for every run (repeatable), e.g. model.hidden_dropout=0")
    ap.add_argument("--default-allocator", action="store_true",
                    help="CPU: leave glibc's allocator as it is, in this process and in the Ray workers "
                         "(trainer.cpu_keep_freed_memory=false); by default both keep freed memory, as the "
                         "workers of retro-ray train do (bench_cpu_allocator.py measures the difference)")
    ap.add_argument("--compare-unfused", action="store_true",
                    help="also interleave RETRO and GPT loops with the unfused output layer + loss "
                         "(retro_ray.model.loss.fused_loss(False)) and print fused / unfused tokens/s")
    ap.add_argument("--retro-vs-gpt-only", action="store_true",
                    help="only the interleaved RETRO / narrow-encoder RETRO / GPT loops (no Ray); e.g. the 125M "
                         "shape on a CPU: --configs 125m --micro-batch-size 1 --global-batch-size 2")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if args.plain_threads:
        torch.set_num_threads(args.plain_threads)
    keeps_freed_memory = False
    if args.device == "cpu":
        if args.default_allocator:
            args.override.append("trainer.cpu_keep_freed_memory=false")
        else:  # the plain loops get what the Ray workers get
            keeps_freed_memory = cpu_tuning.keep_freed_memory()
    configs = (args.configs or ("demo,125m" if args.device == "cuda" else "demo")).split(",")
    args.cpu_peaks = {}
    if args.device == "cpu":  # the MFU denominators, measured now: 1 thread (interleaved loops, Ray workers), all
        for threads in sorted({1, torch.get_num_threads()}):
            args.cpu_peaks[threads] = matmul_peak_flops(threads)
            print(f"fp32 matmul peak, {threads} thread(s) (best of 20 torch.mm 2048^3): "
                  f"{args.cpu_peaks[threads] / 1e9:.1f} GFLOP/s", flush=True)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_train_"))
    work_dir.mkdir(parents=True, exist_ok=True)

    import ray

    if not args.retro_vs_gpt_only:  # the plain loops alone need no cluster
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        t0 = time.perf_counter()
        if args.device == "cpu":
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        print(f"ray.init: {time.perf_counter() - t0:.1f} s (not timed); {ray.cluster_resources()}")
    results = {"device": args.device, "host_cpus": os.cpu_count(),
               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "torch": torch.__version__, "keeps_freed_memory": keeps_freed_memory,
               "matmul_peak_flops_by_threads": args.cpu_peaks, "runs": []}
    try:
        for name in configs:
            results["runs"].append(bench_config(name.strip(), args, work_dir))
    finally:
        ray.shutdown()  # a no-op when no cluster was started
    if args.device == "cpu":  # other work on the machine lowers a measured peak (and so raises the MFU)
        results["matmul_peak_flops_by_threads_after"] = {t: matmul_peak_flops(t) for t in args.cpu_peaks}
        print("fp32 matmul peak again at the end: " + ", ".join(
            f"{t} thread(s) {f / 1e9:.1f} GFLOP/s" for t, f in results["matmul_peak_flops_by_threads_after"].items())
            + " (the MFUs above use the peaks of the start)")
    path = work_dir / "bench_train.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
