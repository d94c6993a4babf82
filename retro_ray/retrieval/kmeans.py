"""k-means in torch, for training IVF coarse quantizers (``index.kmeans=torch``, and ``auto`` without faiss-gpu).

Faiss's GPU build ships only as CUDA 12 wheels (faiss-gpu, faiss-gpu-cu12) that need CUDA 12's
cuBLAS beside them, so a GPU node set up for a newer CUDA, or one with plain faiss-cpu, would train
its IVF lists on the CPU: at 8192 lists and ~2M training points that is minutes of SGEMM on a
handful of cores. torch, which every node here has for the embedder, runs the same Lloyd iterations
on the GPU in seconds, and on the CPU it measured 1.7-2.5x faster than Faiss's own k-means
(benchmarks/bench_index_train.py), so ``train_index`` uses it unless Faiss has a GPU.

The algorithm follows Faiss's ``Clustering`` so a quantizer trained either way is of the same
quality: at most ``max_points_per_centroid`` training points per list (a seeded subsample), k
distinct points as the initial centroids, ``niter`` Lloyd iterations (the IVF index's own
``cp.niter`` when training one, which Faiss sets to 10), and an empty list refilled
by splitting a populated one in two (chosen with probability proportional to its size), its
centroid nudged by ±1/1024 in alternating dimensions.

The training sample lives on the GPU when it takes at most half the free GPU memory. Otherwise it
stays in pinned host memory and is streamed to the GPU block by block in every iteration (at 65536
lists, 256 points a list and 384 dimensions, the sample is 26 GiB).
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np
import torch

logger = logging.getLogger("retro_ray.index")

__all__ = ["kmeans", "train_ivf_with_torch_kmeans"]

# Faiss's ClusteringParameters defaults.
NITER = 25
MAX_POINTS_PER_CENTROID = 256
SEED = 1234
_SPLIT_EPS = 1.0 / 1024

# Rows per block of the point-to-centroid score matrix: bounds it at 2**26 floats (256 MiB).
_SCORE_ELEMENTS = 2**26


def kmeans(
    x: np.ndarray,  # [n, d] float32
    k: int,
    *,
    metric: int = faiss.METRIC_L2,
    niter: int = NITER,
    seed: int = SEED,
    max_points_per_centroid: int = MAX_POINTS_PER_CENTROID,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, float]:
    """Centroids [k, d] float32 of ``x`` and the final objective.

    The objective is Faiss's: the sum of squared distances to the nearest centroid for L2, the sum
    of the largest inner products for ``METRIC_INNER_PRODUCT`` (whose centroids are plain means, as
    in Faiss without ``spherical``).
    """
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    rng = np.random.default_rng(seed)
    if n > k * max_points_per_centroid:
        x = x[np.sort(rng.choice(n, k * max_points_per_centroid, replace=False))]
        n = x.shape[0]
    ip = metric == faiss.METRIC_INNER_PRODUCT
    device = torch.device(device)
    points = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # [n, d], host
    if _fits_on(device, points.nbytes):
        points = points.to(device)
    elif device.type == "cuda":
        # Too large for the GPU: keep the sample in pinned host memory and stream it block by block
        # each iteration (PCIe moves ~25 GB/s, small next to the matrix products per block).
        points = points.pin_memory()
        logger.info("k-means: %.1f GiB of points stay in host memory, streamed to %s", points.nbytes / 2**30, device)
    centroids = points[torch.from_numpy(rng.choice(n, k, replace=False))].to(device).clone()  # [k, d]
    block = max(1, _SCORE_ELEMENTS // k)
    objective = float("nan")
    t0 = time.perf_counter()
    for it in range(niter):
        sums, counts, objective = _assign_and_sum(points, centroids, ip, block)  # [k, d], [k]
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(sums.dtype)
        if not bool(filled.all()):
            _split_for_empty(centroids, counts, rng)
        logger.debug("k-means iteration %d/%d: objective %.6g", it + 1, niter, objective)
    # Faiss reports the objective of the last assignment, made before the last update.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    logger.info(
        "k-means: %d points, %d centroids, %d iterations on %s in %.1f s (objective %.6g)",
        n, k, niter, device, time.perf_counter() - t0, objective,
    )
    return centroids.cpu().numpy(), objective


def _fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether the points can live on ``device``: always on the CPU; on a GPU, half of its free memory."""
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= free // 2


def _assign_and_sum(
    points: torch.Tensor,  # [n, d], on the centroids' device or in host memory
    centroids: torch.Tensor,  # [k, d]
    ip: bool,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One Lloyd pass: per-list sums [k, d] and counts [k] of the points nearest each centroid, and
    the objective of that assignment (see ``kmeans``)."""
    k = centroids.shape[0]
    c_norms = (centroids * centroids).sum(dim=1)  # [k]
    sums = torch.zeros_like(centroids)
    counts = torch.zeros(k, dtype=torch.int64, device=centroids.device)
    total = torch.zeros((), dtype=torch.float64, device=centroids.device)
    for start in range(0, points.shape[0], block):
        xb = points[start : start + block].to(centroids.device, non_blocking=True)  # [b, d]
        scores = xb @ centroids.T  # [b, k]
        if ip:
            best, idx = scores.max(dim=1)
            total += best.sum(dtype=torch.float64)
        else:
            # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin.
            dist, idx = (c_norms[None, :] - 2.0 * scores).min(dim=1)
            total += (dist + (xb * xb).sum(dim=1)).clamp_(min=0).sum(dtype=torch.float64)
        sums.index_add_(0, idx, xb)
        counts += torch.bincount(idx, minlength=k)
    return sums, counts, float(total)


def _split_for_empty(centroids: torch.Tensor, counts: torch.Tensor, rng: np.random.Generator) -> None:
    """Give every empty list half of a populated one, in place (Faiss's rule, see the module doc)."""
    sizes = counts.cpu().numpy().astype(np.float64)
    d = centroids.shape[1]
    sign = torch.ones(d, dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1
    for empty in np.flatnonzero(sizes == 0):
        weights = np.maximum(sizes - 1, 0)
        big = int(rng.choice(len(sizes), p=weights / weights.sum()))
        centroids[empty] = centroids[big] * (1 + sign * _SPLIT_EPS)
        centroids[big] = centroids[big] * (1 - sign * _SPLIT_EPS)
        sizes[empty] = sizes[big] // 2
        sizes[big] -= sizes[empty]


def train_ivf_with_torch_kmeans(index: faiss.Index, x: np.ndarray, device: str | torch.device) -> None:
    """Train ``index`` (IVF, bare or under pre-transforms such as OPQ) in place, its lists by ``kmeans``.

    Pre-transforms are trained on the CPU by Faiss, as ``index.train`` would; the coarse quantizer
    is filled with torch k-means centroids of the transformed vectors, and then Faiss trains the rest
    (PQ codebooks on the residuals, ...), skipping its own k-means because the quantizer already
    holds nlist centroids.
    """
    top = faiss.downcast_index(index)
    xt = np.ascontiguousarray(x, dtype=np.float32)
    if isinstance(top, faiss.IndexPreTransform):
        for i in range(top.chain.size()):
            vt = top.chain.at(i)
            if not vt.is_trained:
                vt.train(xt)
            xt = vt.apply(xt)
        inner = faiss.downcast_index(top.index)
    else:
        inner = top
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is None:
        raise ValueError("train_ivf_with_torch_kmeans needs an IVF index")
    ivf = faiss.downcast_index(ivf)
    if ivf.quantizer.ntotal:
        raise ValueError("the IVF quantizer already holds centroids")
    cp = ivf.cp  # the IVF's own clustering parameters: Faiss sets 10 iterations for IVF lists
    if cp.spherical:
        raise ValueError("spherical k-means is not supported by the torch trainer; train with Faiss")
    centroids, _ = kmeans(xt, ivf.nlist, metric=ivf.metric_type, niter=int(cp.niter), seed=int(cp.seed),
                          max_points_per_centroid=int(cp.max_points_per_centroid), device=device)
    ivf.quantizer.train(centroids)  # a no-op for the Flat and HNSW-Flat quantizers used here
    ivf.quantizer.add(centroids)
    inner.train(xt)  # IVF sees a full quantizer and keeps it; trains its codes on the residuals
    top.is_trained = True
