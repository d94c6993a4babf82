"""The output layer + cross-entropy on a GPU: this project's fused loss against liger-kernel's and
cut-cross-entropy's (trainer.loss_kernel), and against the unfused path, in one run.

Each kernel computes the loss summed over labelled rows of h @ W^T and the gradients of h and W (the
tied embedding's share), as RetroModel's training forward does, with W and h in bf16 as DeepSpeed's
bf16 engine holds them (--dtype). Kernels:

    unfused        F.linear, then F.cross_entropy of the float32 logits (the model before issue 19)
    retro_ray      retro_ray/model/loss.py (blocks of loss.BLOCK_ROWS rows; retro_ray:R for R rows)
    liger          liger-kernel's fused linear cross-entropy (loss.loss_kernel("liger"): float32
                   gradient sums)
    cce            cut-cross-entropy, exact (loss.loss_kernel("cce"): filter_eps=None)
    cce:high       cut-cross-entropy at its own default filter_eps="high", which skips gradient
                   entries below a threshold (reported for its speed; not what trainer.loss_kernel runs)

Per kernel and row count: the median time of forward + backward over --repeats (after 2 untimed),
its FLOP/s (6 N d V / time) as a fraction of the GPU's bf16 dense peak, the peak memory the step
added above its inputs (torch.cuda.max_memory_allocated), and its error against a float32 reference
(this project's loss on the same rounded inputs in float32, TF32 off): the loss's relative error and
each gradient's largest error over the gradient's largest value. A kernel that does not import or
runs out of memory is reported as such and the run goes on.

Run (GPU):  python benchmarks/bench_loss_kernels.py [--rows 16384,65536] [--kernels ...] [--out F.json]
On a CPU (no liger / cce): the same for unfused and retro_ray at --rows 2048 --vocab 8192, as a check
that the script runs; the CPU's own figures are bench_loss.py's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_model_bench import peak_flops  # noqa: E402  (the bf16 peak table; imports torch and the model only)

from retro_ray.errors import RetroRayError  # noqa: E402
from retro_ray.model import loss as L  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def kernel_fn(name: str):
    """(hidden, weight, labels) -> float32 summed loss, or raise RetroRayError if not available here."""
    if name == "unfused":
        return lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t, ignore_index=L.IGNORE_INDEX, reduction="sum")
    if name.startswith("retro_ray:"):
        rows = int(name.split(":")[1])
        return lambda h, w, t: L.linear_cross_entropy(h, w, t, block_rows=rows)
    if name == "cce:high":
        L.loss_kernel("cce")  # the same import check
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=L.IGNORE_INDEX, reduction="sum").float()
    return L.loss_kernel(name)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name: str, h0: torch.Tensor, w0: torch.Tensor, labels: torch.Tensor, ref: dict, repeats: int,
            device: str) -> dict:
    try:
        fn = kernel_fn(name)
    except RetroRayError as e:
        return {"error": str(e)}
    h = h0.detach().clone().requires_grad_()
    w = w0.detach().clone().requires_grad_()
    times = []
    try:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for i in range(repeats + 2):
            h.grad = w.grad = None
            sync(device)
            t0 = time.perf_counter()
            loss = fn(h, w, labels)
            loss.backward()
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        added = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None
    except torch.cuda.OutOfMemoryError as e:
        h.grad = w.grad = None
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(e)[:160]}"}
    t = statistics.median(times)
    out = {"ms": t * 1e3, "flops_per_s": 6 * h.shape[0] * h.shape[1] * w.shape[0] / t,
           "mem_added_gib": added,
           "loss_rel_err": abs(loss.item() - ref["loss"]) / abs(ref["loss"]),
           "d_hidden_err": ((h.grad.float() - ref["d_hidden"]).abs().max() / ref["d_hidden"].abs().max()).item(),
           "d_weight_err": ((w.grad.float() - ref["d_weight"]).abs().max() / ref["d_weight"].abs().max()).item()}
    h.grad = w.grad = None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--rows", default=None, help="comma list of N (tokens a step); default 16384,65536 on "
                                                 "CUDA (8 and 32 sequences of 2,048), 2048 on CPU")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=None, help="default 50304 on CUDA, 8192 on CPU")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--kernels", default=None, help="comma list; default unfused,retro_ray,retro_ray:8192,liger,"
                                                    "cce,cce:high on CUDA, unfused,retro_ray on CPU")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    rows = [int(r) for r in (args.rows or ("16384,65536" if cuda else "2048")).split(",")]
    vocab = args.vocab or (50304 if cuda else 8192)
    kernels = (args.kernels or ("unfused,retro_ray,retro_ray:8192,liger,cce,cce:high" if cuda
                                else "unfused,retro_ray")).split(",")
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_flops(name) if cuda else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference is float32
    results = {"device": name, "torch": torch.__version__, "dtype": args.dtype, "hidden": args.hidden,
               "vocab": vocab, "block_rows": L.block_rows_for(torch.device(args.device)), "runs": {}}
    print(f"{name}, {args.dtype}, d = {args.hidden}, V = {vocab}; forward + backward of the output layer + loss, "
          f"median of {args.repeats}")
    for n in rows:
        g = torch.Generator(device=args.device).manual_seed(0)
        h = (torch.randn(n, args.hidden, device=args.device, generator=g)).to(dtype)
        w = (torch.randn(vocab, args.hidden, device=args.device, generator=g) * 0.02).to(dtype)
        labels = torch.randint(0, vocab, (n,), device=args.device, generator=g)
        labels[::50] = L.IGNORE_INDEX  # some unlabelled rows, as padding makes
        hr, wr = h.float().requires_grad_(), w.float().requires_grad_()
        ref_loss = L.linear_cross_entropy(hr, wr, labels)
        ref_loss.backward()
        ref = {"loss": ref_loss.item(), "d_hidden": hr.grad, "d_weight": wr.grad}
        print(f"\nN = {n:,} rows")
        for k in kernels:
            r = measure(k, h, w, labels, ref, args.repeats, args.device)
            results["runs"][f"{n}/{k}"] = r
            if "error" in r:
                print(f"  {k:<16} {r['error']}")
                continue
            mfu = f"{r['flops_per_s'] / peak:6.1%} of bf16 peak" if peak else f"{r['flops_per_s'] / 1e9:7.1f} GFLOP/s"
            mem = f"{r['mem_added_gib']:6.2f} GiB added" if r["mem_added_gib"] is not None else ""
            print(f"  {k:<16} {r['ms']:8.2f} ms  {mfu}  {mem}  loss err {r['loss_rel_err']:.1e}  "
                  f"d_hidden err {r['d_hidden_err']:.1e}  d_weight err {r['d_weight_err']:.1e}")
        base = results["runs"].get(f"{n}/retro_ray", {})
        for k in kernels:
            r = results["runs"][f"{n}/{k}"]
            if "ms" in r and "ms" in base and k != "retro_ray":
                r["speed_vs_retro_ray"] = base["ms"] / r["ms"]
                print(f"  {k} vs retro_ray: {r['speed_vs_retro_ray']:.2f}x the speed")
        del hr, wr, ref
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
