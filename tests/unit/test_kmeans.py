"""torch k-means for IVF quantizers (retrieval/kmeans.py), checked against Faiss's own on the CPU.

On a GPU node the same code runs on cuda; benchmarks/bench_index_train.py times it there.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retro_ray.errors import RetroRayError
from retro_ray.retrieval import index as ix
from retro_ray.retrieval.kmeans import kmeans, train_ivf_with_torch_kmeans

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def blobs(n: int, d: int, sources: int, seed: int) -> np.ndarray:
    """Gaussian blobs around `sources` random centres: data with clusters to find."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((sources, d)).astype(np.float32) * 4
    return (centres[rng.integers(0, sources, n)] + rng.standard_normal((n, d))).astype(np.float32)


def ivf_centroids(x: np.ndarray, k: int) -> np.ndarray:
    """What torch k-means gives an IVF index's lists: Faiss's IVF parameters, 10 iterations, seed 1234."""
    return kmeans(x, k, niter=10)[0]


def faiss_objective(x: np.ndarray, k: int, seed: int, ip: bool = False) -> float:
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed)
    if ip:
        km.index = faiss.IndexFlatIP(x.shape[1])
    km.train(x)
    return float(km.obj[-1])


# k-means ends in a local optimum that depends on the initial centroids: one run of either varies by
# ~2.5 % (std over seeds here), so the two are compared on the mean of four seeds each.
SEEDS = range(4)


@pytest.mark.parametrize("data_seed", [0, 1])
def test_l2_objective_matches_faiss(data_seed):
    x = blobs(12_000, 24, sources=150, seed=data_seed)
    runs = [kmeans(x, 64, seed=s) for s in SEEDS]
    ours = np.mean([obj for _, obj in runs])
    ref = np.mean([faiss_objective(x, 64, s) for s in SEEDS])
    assert ours <= ref * 1.03, (ours, ref)
    for centroids, objective in runs:
        assert centroids.shape == (64, 24) and centroids.dtype == np.float32
        assert np.isfinite(centroids).all()
        # The objective is the squared distance of every point to its nearest centroid, for the
        # assignment made before the last update, so the final centroids do no worse.
        dist, _ = faiss.knn(x, centroids, 1)
        assert dist.sum() <= objective * (1 + 1e-5)


def test_inner_product_objective_matches_faiss():
    x = blobs(8_000, 16, sources=80, seed=3)
    ours = np.mean([kmeans(x, 32, metric=faiss.METRIC_INNER_PRODUCT, seed=s)[1] for s in SEEDS])
    ref = np.mean([faiss_objective(x, 32, s, ip=True) for s in SEEDS])
    assert ours >= ref * 0.97, (ours, ref)


def test_subsamples_to_max_points_per_centroid_and_is_seeded():
    x = blobs(5_000, 8, sources=20, seed=5)
    a, obj_a = kmeans(x, 10, max_points_per_centroid=50)
    b, obj_b = kmeans(x, 10, max_points_per_centroid=50)
    assert np.array_equal(a, b) and obj_a == obj_b
    c, _ = kmeans(x, 10, max_points_per_centroid=50, seed=7)
    assert not np.array_equal(a, c)


def test_empty_lists_are_refilled_by_splitting():
    # 12 distinct points repeated: with 20 centroids many lists start or go empty.
    rng = np.random.default_rng(0)
    base = rng.standard_normal((12, 6)).astype(np.float32)
    x = base[rng.integers(0, 12, 600)]
    centroids, objective = kmeans(x, 20)
    assert np.isfinite(centroids).all()
    assert objective < 1e-6 * float((x * x).sum())  # every distinct point got a centroid
    _, assign = faiss.knn(x, centroids, 1)
    assert len(np.unique(assign)) >= 12


def test_too_few_points_is_an_error():
    with pytest.raises(ValueError, match="at least k=10 points, got 5"):
        kmeans(np.zeros((5, 4), np.float32), 10)


@pytest.mark.parametrize("index_str", ["IVF64,Flat", "IVF64_HNSW8,Flat", "OPQ4,IVF64,PQ4x4", "IVF64,SQ8"])
def test_trained_index_searches_like_a_faiss_trained_one(index_str):
    d = 32
    x = blobs(8_000, d, sources=200, seed=11)
    queries = blobs(300, d, sources=200, seed=11)[:300] + 0.1
    _, truth = faiss.knn(queries, x, 10)

    def recall(index) -> float:
        index = ix.add_range(index, x, 0)
        ix.set_search_params(index, nprobe=8)
        _, found = index.search(queries, 10)
        return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))

    train = x[:3_000]  # OPQ's training is slow on one thread, and 3k points are enough for 64 lists
    ours = faiss.index_factory(d, index_str)
    train_ivf_with_torch_kmeans(ours, train, "cpu")
    assert ours.is_trained
    ivf = faiss.downcast_index(faiss.extract_index_ivf(ours))
    assert ivf.quantizer.ntotal == 64
    if not index_str.startswith("OPQ"):
        # ... made with the IVF's own clustering parameters (Faiss gives IVF lists 10 iterations).
        assert ivf.cp.niter == 10
        np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, 64), ivf_centroids(train, 64))
    theirs = ix.train_index(index_str, train, use_gpu=False)
    assert recall(ours) >= recall(theirs) - 0.05


def test_needs_an_ivf_index_with_an_empty_quantizer():
    x = blobs(2_000, 8, sources=10, seed=0)
    with pytest.raises(ValueError, match="needs an IVF index"):
        train_ivf_with_torch_kmeans(faiss.index_factory(8, "HNSW8,Flat"), x, "cpu")
    trained = ix.train_index("IVF16,Flat", x, use_gpu=False)
    with pytest.raises(ValueError, match="already holds centroids"):
        train_ivf_with_torch_kmeans(trained, x, "cpu")


def test_use_gpu_true_without_any_gpu_names_both_ways_out():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so use_gpu=True is satisfiable (torch k-means runs on it)")
    with pytest.raises(RetroRayError, match="neither Faiss nor torch sees a GPU.*use_gpu='auto'/False"):
        ix.train_index("IVF16,Flat", blobs(2_000, 8, sources=10, seed=0), use_gpu=True)
    with pytest.raises(RetroRayError, match="but Faiss sees no GPU \\(kmeans=faiss\\)"):
        ix.kmeans_backend(True, "faiss")


def test_kmeans_backend_names_where_k_means_runs():
    import torch

    gpu = "faiss-gpu" if ix._num_gpus() else ("torch-cuda" if torch.cuda.is_available() else None)
    assert ix.kmeans_backend(False, "faiss") == "faiss-cpu"
    assert ix.kmeans_backend(False, "torch") == "torch-cpu"
    assert ix.kmeans_backend(False) == "torch-cpu"  # on CPUs torch's k-means is the faster one
    assert ix.kmeans_backend("auto") == (gpu or "torch-cpu")
    with pytest.raises(RetroRayError, match="use_gpu='yes' is not understood"):
        ix.kmeans_backend("yes")
    with pytest.raises(RetroRayError, match="kmeans='sklearn' is not one of auto, faiss, torch"):
        ix.kmeans_backend(False, "sklearn")


@pytest.mark.parametrize(
    ("index_str", "kmeans", "expected"),
    [("IVF16,Flat", "faiss", "faiss-cpu"), ("IVF16,Flat", "torch", "torch-cpu"), ("IVF16,Flat", "auto", "torch-cpu"),
     ("Flat", "auto", "none"), ("HNSW8,Flat", "torch", "none")],
)
def test_train_index_says_where_k_means_ran(index_str, kmeans, expected):
    x = blobs(2_000, 8, sources=10, seed=0)
    info: dict = {}
    index = ix.train_index(index_str, x, use_gpu=False, info=info, kmeans=kmeans)
    assert info == {"kmeans": expected}
    if expected == "torch-cpu":  # the torch path really ran: the quantizer holds its centroids
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, 16), ivf_centroids(x, 16))
