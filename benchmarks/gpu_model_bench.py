"""RETRO model on a CUDA GPU: exact causality checks, then bf16 training throughput and MFU.

Needs only torch (the lent GPU machines have no Ray / DeepSpeed / Faiss): it exercises the
single-device model that Ray Train + DeepSpeed wrap. For each config, RETRO and its GPT baseline
(same decoder, retrieval off) are timed in the same run, and the ratio printed.

    python benchmarks/gpu_model_bench.py --out results.json [--compile] [--configs 125m --batches 32,16]
        [--loss-kernels retro_ray,liger,cce,unfused] [--max-batch]

--loss-kernels times each variant with each output layer + loss (trainer.loss_kernel; unfused = the
whole logits, then F.cross_entropy, as before issue 19). --max-batch, instead of timing, finds per
variant and kernel the largest batch of --batch-ladder that trains 2 steps without running out of
memory (eager, so the search takes seconds; a compiled step needs about as much or less): the batch
the saved memory allows.

MFU = model.flops_per_token() × tokens/s ÷ the GPU's dense bf16 peak (H100 SXM 989 TFLOP/s,
H200 989, A100 312; the peak is looked up by device name).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retro_ray.errors import RetroRayError  # noqa: E402
from retro_ray.model import RetroConfig, RetroModel  # noqa: E402
from retro_ray.model.loss import fused_loss, loss_kernel  # noqa: E402
from retro_ray.model.retro import RetroSettings  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def causality_checks(device: str) -> dict:
    """The exact tests of tests/unit/test_model.py, on the GPU in float32 (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cfg = RetroConfig.tiny()
    m = RetroModel(cfg).to(device).eval()
    n, mlen = cfg.seq_length, cfg.chunk_length
    C, K, r = n // mlen, 2, 2 * mlen
    tokens = torch.randint(0, cfg.vocab_size, (2, n), device=device)
    nb = torch.randint(0, cfg.vocab_size, (2, C, K, r), device=device)
    with torch.no_grad():
        base = m(tokens, nb).logits
        worst_token, worst_nb = 0.0, 0.0
        for t in (1, mlen - 1, mlen, 2 * mlen + 3, n - 1):
            t2 = tokens.clone()
            t2[:, t:] = torch.randint(0, cfg.vocab_size, t2[:, t:].shape, device=device)
            out = m(t2, nb).logits
            worst_token = max(worst_token, (out[:, :t] - base[:, :t]).abs().max().item())
        for j in range(C):
            nb2 = nb.clone()
            nb2[:, j] = torch.randint(0, cfg.vocab_size, nb2[:, j].shape, device=device)
            out = m(tokens, nb2).logits
            cut = (j + 1) * mlen - 1
            worst_nb = max(worst_nb, (out[:, :cut] - base[:, :cut]).abs().max().item())
    return {"max_logit_change_before_changed_token": worst_token,
            "max_logit_change_before_changed_neighbours": worst_nb,
            "exact": worst_token == 0.0 and worst_nb == 0.0}


KERNEL_KINDS = (  # (kind, substrings of a CUDA kernel's name), first match wins
    ("attention", ("flash", "fmha", "attention")),
    ("matmul", ("gemm", "cutlass", "cublas", "nvjet", "xmma", "sm90_", "sm80_")),
    ("optimizer", ("adam", "multi_tensor")),
    ("fused elementwise / reduction (inductor)", ("triton",)),
    ("copy / fill", ("memcpy", "memset", "copy", "fill")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def kernel_profile(step, steps: int = 3, top: int = 25) -> dict:
    """GPU time per step by kernel kind, and the top kernels: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [(e.key, e.self_device_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()
              if e.self_device_time_total > 0]  # (name, ms per step, launches per step)
    total = sum(ms for _, ms, _ in events)
    kinds: dict[str, float] = {}
    for name, ms, _ in events:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    return {"gpu_ms_per_step": total,
            "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": name[:160], "kind": kernel_kind(name), "ms": ms, "launches": n}
                            for name, ms, n in sorted(events, key=lambda e: -e[1])[:top]]}


def make_model(cfg: RetroConfig, kernel: str, device: str) -> RetroModel:
    model = RetroModel(cfg).to(device)
    if kernel != "unfused":
        model.loss_fn = loss_kernel(kernel)
    return model


def fits(cfg: RetroConfig, batch: int, kernel: str, device: str) -> bool:
    """Whether 2 eager bf16 training steps at this batch run without running out of GPU memory."""
    torch.manual_seed(0)
    model = opt = None
    try:
        model = make_model(cfg, kernel, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        n, m, K = cfg.seq_length, cfg.chunk_length, cfg.retro.retro_num_neighbors
        tokens = torch.randint(0, cfg.vocab_size, (batch, n + 1), device=device)
        nb = torch.randint(0, cfg.vocab_size, (batch, n // m, K, 2 * m), device=device) if cfg.retro.enabled else None
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16), fused_loss(kernel != "unfused"):
                out = model(tokens[:, :-1], nb, labels=tokens[:, 1:])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del model, opt
        torch.cuda.empty_cache()


def throughput(cfg: RetroConfig, batch: int, steps: int, device: str, compile_: bool, profile: bool = False,
               kernel: str = "retro_ray") -> dict:
    torch.manual_seed(0)
    model = make_model(cfg, kernel, device)
    if compile_:
        # A fresh compile per (config, batch): without the reset, the second batch size would make
        # dynamo recompile with a symbolic batch dimension, and time slower generic kernels.
        torch._dynamo.reset()
        model = torch.compile(model, dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    n, m = cfg.seq_length, cfg.chunk_length
    K = cfg.retro.retro_num_neighbors
    tokens = torch.randint(0, cfg.vocab_size, (batch, n + 1), device=device)
    nb = torch.randint(0, cfg.vocab_size, (batch, n // m, K, 2 * m), device=device) if cfg.retro.enabled else None

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16), fused_loss(kernel != "unfused"):
            out = model(tokens[:, :-1], nb, labels=tokens[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    raw = model._orig_mod if compile_ else model
    tok_s = batch * n / dt
    peak = peak_flops(torch.cuda.get_device_name())
    out = {"step_s": dt, "tokens_per_s": tok_s, "params": raw.num_parameters(),
           "flops_per_token": raw.flops_per_token(),
           "mfu": raw.flops_per_token() * tok_s / peak if peak else None,
           "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    if profile:
        try:  # a profiler failure must not cost the timing just taken
            out["kernels"] = kernel_profile(step)
        except Exception as e:  # noqa: BLE001
            out["kernels"] = {"error": repr(e)[:300]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_model_bench.json")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--configs", default="demo,125m", help="comma-separated: demo, 125m")
    ap.add_argument("--batches", default="", help="comma-separated batch sizes to time instead of each config's own")
    ap.add_argument("--deadline-s", type=float, default=0, help="skip what starts later than this (0: no limit)")
    ap.add_argument("--variants", default="retro,gpt",
                    help="comma-separated: retro, gpt, retro_narrow (an encoder of width hidden_size/2)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, profile 3 steps: GPU time by kernel kind and the top kernels")
    ap.add_argument("--coordinate-descent", action="store_true",
                    help="let inductor tune its Triton kernels' block sizes (longer compile)")
    ap.add_argument("--loss-kernels", default="retro_ray",
                    help="comma-separated: retro_ray, liger, cce (trainer.loss_kernel), unfused")
    ap.add_argument("--max-batch", action="store_true",
                    help="instead of timing, find the largest batch of --batch-ladder that fits, per variant and kernel")
    ap.add_argument("--batch-ladder", default="8,16,24,32,48,64,80,96,128")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    if args.coordinate_descent:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    device = "cuda"
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "compile": args.compile, "coordinate_descent": args.coordinate_descent, "causality_fp32": causality_checks(device)}
    print(json.dumps(results, indent=1), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    gpt2_vocab = 50304
    configs = {
        # demo size (what the 2-core demo trains), at a GPU-sized batch
        "demo": (RetroConfig(vocab_size=8192, num_layers=6, hidden_size=256, ffn_hidden_size=1024,
                             num_attention_heads=4, seq_length=256, chunk_length=64, hidden_dropout=0.0,
                             attention_dropout=0.0, ffn_dropout=0.0,
                             retro=RetroSettings(retro_layers=(3, 6))), 64),
        # the reference's defaults: 12 layers, 768 hidden, 12 heads, 2048 tokens (~125M parameters)
        "125m": (RetroConfig(vocab_size=gpt2_vocab, hidden_dropout=0.0, attention_dropout=0.0, ffn_dropout=0.0,
                             retro=RetroSettings(retro_encoder_hidden_dropout=0.0,
                                                 retro_encoder_attention_dropout=0.0)), 8),
    }
    started = time.perf_counter()
    for name, (cfg, own_batch) in configs.items():
        if name not in args.configs.split(","):
            continue
        kernels = args.loss_kernels.split(",")
        variants = {v: {"retro": cfg,
                        "gpt": replace(cfg, retro=replace(cfg.retro, enabled=False)),
                        "retro_narrow": replace(cfg, retro=replace(cfg.retro,
                                                                   retro_encoder_hidden_size=cfg.hidden_size // 2))}[v]
                    for v in args.variants.split(",")}
        if args.max_batch:
            for variant, c in variants.items():
                for kernel in kernels:
                    largest = None
                    try:
                        for b in (int(x) for x in args.batch_ladder.split(",")):
                            if not fits(c, b, kernel, device):
                                break
                            largest = b
                    except RetroRayError as e:  # a loss kernel that is not installed: go on
                        print(f"{name} {variant} {kernel}: {e}", flush=True)
                        continue
                    results[f"{name}_{variant}_{kernel}_max_batch"] = largest
                    print(f"{name} {variant} {kernel}: largest batch that fits {largest} "
                          f"(ladder {args.batch_ladder}, eager)", flush=True)
                    Path(args.out).write_text(json.dumps(results, indent=1))
        batches = [int(b) for b in args.batches.split(",")] if args.batches else [own_batch]
        for batch in [] if args.max_batch else batches:
            tag = name if not args.batches else f"{name}_b{batch}"
            for variant, c in variants.items():
                for kernel in kernels:
                    key = f"{tag}_{variant}" if kernel == "retro_ray" else f"{tag}_{variant}_{kernel}"
                    if args.deadline_s and time.perf_counter() - started > args.deadline_s:
                        print(f"deadline: skipping {key}", flush=True)
                        continue
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    try:
                        r = throughput(c, batch, args.steps, device, args.compile, args.profile, kernel)
                    except torch.cuda.OutOfMemoryError as e:  # a batch too large for this card: go on
                        print(f"{key}: out of memory ({str(e)[:200]})", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    except RetroRayError as e:
                        print(f"{key}: {e}", flush=True)
                        continue
                    r["wall_s_with_compile"] = time.perf_counter() - t0
                    results[key] = {"batch": batch, "loss_kernel": kernel, **r}
                    print(key, json.dumps({k: v for k, v in r.items() if k != "kernels"}), flush=True)
                    if "by_kind_ms" in r.get("kernels", {}):
                        print(f"  GPU ms per step by kernel kind: {json.dumps(r['kernels']['by_kind_ms'])}", flush=True)
                    Path(args.out).write_text(json.dumps(results, indent=1))
            for variant in ("retro", "retro_narrow"):
                if f"{tag}_{variant}" in results and f"{tag}_gpt" in results:
                    results[f"{tag}_{variant}_over_gpt_step_time"] = (results[f"{tag}_{variant}"]["step_s"]
                                                                      / results[f"{tag}_gpt"]["step_s"])
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
