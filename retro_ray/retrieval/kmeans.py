"""k-means in torch, for training IVF coarse quantizers on a GPU when Faiss itself has none.

Faiss's GPU build ships only as CUDA 12 wheels (faiss-gpu, faiss-gpu-cu12) that need CUDA 12's
cuBLAS beside them, so a GPU node set up for a newer CUDA, or one with plain faiss-cpu, trains its
IVF lists on the CPU: at 8192 lists and ~2M training points that is minutes of SGEMM on a handful
of cores. torch, which every node here has for the embedder, runs the same Lloyd iterations on the
GPU in seconds. ``train_index`` uses this only when Faiss sees no GPU and torch does.

The algorithm follows Faiss's ``Clustering`` so a quantizer trained either way is of the same
quality: at most ``max_points_per_centroid`` training points per list (a seeded subsample), k
distinct points as the initial centroids, ``niter`` Lloyd iterations, and an empty list refilled
by splitting a populated one in two (chosen with probability proportional to its size), its
centroid nudged by ±1/1024 in alternating dimensions.
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
    points = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)  # [n, d]
    centroids = points[torch.from_numpy(rng.choice(n, k, replace=False)).to(device)].clone()  # [k, d]
    block = max(1, _SCORE_ELEMENTS // k)
    objective = float("nan")
    t0 = time.perf_counter()
    for it in range(niter):
        assign, objective = _assign(points, centroids, ip, block)  # [n] int64
        counts = torch.bincount(assign, minlength=k)  # [k]
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)  # [k, d]
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(sums.dtype)
        if not bool(filled.all()):
            _split_for_empty(centroids, counts, rng)
        logger.debug("k-means iteration %d/%d: objective %.6g", it + 1, niter, objective)
    # Faiss reports the objective of the last assignment, made before the last update.
    if points.is_cuda:
        torch.cuda.synchronize(points.device)
    logger.info(
        "k-means: %d points, %d centroids, %d iterations on %s in %.1f s (objective %.6g)",
        n, k, niter, points.device, time.perf_counter() - t0, objective,
    )
    return centroids.cpu().numpy(), objective


def _assign(points: torch.Tensor, centroids: torch.Tensor, ip: bool, block: int) -> tuple[torch.Tensor, float]:
    """Nearest centroid of every point [n], and the objective (see ``kmeans``)."""
    c_norms = (centroids * centroids).sum(dim=1)  # [k]
    out = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
    total = torch.zeros((), dtype=torch.float64, device=points.device)
    for start in range(0, points.shape[0], block):
        xb = points[start : start + block]  # [b, d]
        scores = xb @ centroids.T  # [b, k]
        if ip:
            best, idx = scores.max(dim=1)
            total += best.sum(dtype=torch.float64)
        else:
            # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin.
            dist, idx = (c_norms[None, :] - 2.0 * scores).min(dim=1)
            total += (dist + (xb * xb).sum(dim=1)).clamp_(min=0).sum(dtype=torch.float64)
        out[start : start + block] = idx
    return out, float(total)


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
    centroids, _ = kmeans(xt, ivf.nlist, metric=ivf.metric_type, device=device)
    ivf.quantizer.train(centroids)  # a no-op for the Flat and HNSW-Flat quantizers used here
    ivf.quantizer.add(centroids)
    inner.train(xt)  # IVF sees a full quantizer and keeps it; trains its codes on the residuals
    top.is_trained = True
