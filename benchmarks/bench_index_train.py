"""Benchmark of index-train's k-means: Faiss on the CPU against torch k-means (``retrieval/kmeans.py``).

``train_index`` trains an IVF coarse quantizer with Faiss's k-means on the GPU when Faiss has one
(faiss-gpu), else with torch k-means (on a GPU when torch sees one, else on the CPU). This script
times Faiss on the CPU, the baseline, and the torch path on the same training vectors, in one process:

    faiss   ``train_index(index_str, x, use_gpu=False, kmeans="faiss")``: Faiss k-means, all CPU cores
    torch   ``train_ivf_with_torch_kmeans(index, x, device)``: cuda when there is one, else CPU

Both include everything index-train does (for IVF..._HNSW: building the HNSW graph over the
centroids). Quality is compared on what matters downstream: the k-means objective of the final
centroids over the training vectors, and recall@10 against exact search of an IVF index built from
each quantizer (database = the training vectors, queries = perturbed held-out vectors) at two nprobe.

Data: ``--n-train`` + ``--nq`` synthetic unit vectors of ``--dim`` dimensions around ``--sources``
random centres (each ``normalise(centre + N(0, sigma^2))``), the shape of sentence embeddings
closely enough for timing; or, with ``--project``, that project's real train-chunk embeddings.

Run:  .venv/bin/python benchmarks/bench_index_train.py                       # CPU: IVF1024 on 40k
      python3 benchmarks/bench_index_train.py --index-str IVF8192_HNSW32,Flat --n-train 320000  # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retro_ray.retrieval import index as ix  # noqa: E402
from retro_ray.retrieval.kmeans import train_ivf_with_torch_kmeans  # noqa: E402


def synthetic(n: int, d: int, sources: int, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((sources, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, sources, n)] + sigma * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def centroids_of(index: faiss.Index) -> np.ndarray:
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index-str", default="IVF1024_HNSW32,Flat")
    ap.add_argument("--n-train", type=int, default=40_000)
    ap.add_argument("--nq", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--sources", type=int, default=2_000)
    ap.add_argument("--sigma", type=float, default=0.025)
    ap.add_argument("--project", help="use this project's real train embeddings instead")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench_index_train.json")
    args = ap.parse_args()

    if args.project:
        from retro_ray.stages.embed import load_embeddings

        _, real = load_embeddings(Path(args.project), "train")
        rng = np.random.default_rng(0)
        pick = rng.choice(len(real), min(len(real), args.n_train + args.nq), replace=False)
        data = np.ascontiguousarray(real[pick], dtype=np.float32)
    else:
        data = synthetic(args.n_train + args.nq, args.dim, args.sources, args.sigma)
    x, held_out = data[: len(data) - args.nq], data[len(data) - args.nq :]
    queries = held_out + 0.02 * np.random.default_rng(1).standard_normal(held_out.shape).astype(np.float32)
    _, truth = faiss.knn(queries, x, 10)
    threads = faiss.omp_get_max_threads()
    print(f"{len(x)} x {x.shape[1]} training vectors, {args.index_str}, Faiss threads {threads}, "
          f"torch on {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'})",
          flush=True)

    def evaluate(index: faiss.Index) -> dict:
        cents = centroids_of(index)
        dist, _ = faiss.knn(x, cents, 1)
        full = ix.add_range(ix.index_to_bytes(index), x, 0)
        out = {"objective": float(dist.sum())}
        for nprobe in (16, 64):
            ix.set_search_params(full, nprobe=nprobe, ef_search=max(32, nprobe))
            _, found = full.search(queries, 10)
            out[f"recall@10_nprobe{nprobe}"] = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
        return out

    results = {"index_str": args.index_str, "n_train": len(x), "dim": x.shape[1], "faiss_threads": threads,
               "torch_device": args.device,
               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}

    t0 = time.perf_counter()
    base = ix.train_index(args.index_str, x, use_gpu=False, kmeans="faiss")
    results["faiss_cpu_s"] = time.perf_counter() - t0
    print(f"faiss CPU k-means: {results['faiss_cpu_s']:.2f} s", flush=True)

    if args.device == "cuda":  # CUDA context and cuBLAS handle, outside the clock
        torch.ones(8, device="cuda") @ torch.ones(8, device="cuda")
        torch.cuda.synchronize()
    ours = faiss.index_factory(x.shape[1], args.index_str)
    t0 = time.perf_counter()
    train_ivf_with_torch_kmeans(ours, x, args.device)
    results["torch_s"] = time.perf_counter() - t0
    print(f"torch k-means on {args.device}: {results['torch_s']:.2f} s", flush=True)

    results["faiss_quality"] = evaluate(base)
    results["torch_quality"] = evaluate(ours)
    results["speedup"] = results["faiss_cpu_s"] / results["torch_s"]
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    fq, tq = results["faiss_quality"], results["torch_quality"]
    print(f"\n| train {args.index_str} on {len(x)} x {x.shape[1]} | faiss CPU ({threads} threads) "
          f"{results['faiss_cpu_s']:.1f} s | torch {args.device} {results['torch_s']:.1f} s | "
          f"speedup {results['speedup']:.2f}x | objective ratio {tq['objective'] / fq['objective']:.4f} | "
          f"recall@10 nprobe16 {fq['recall@10_nprobe16']:.3f} vs {tq['recall@10_nprobe16']:.3f} |")


if __name__ == "__main__":
    main()
