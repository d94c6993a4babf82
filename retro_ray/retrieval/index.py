"""Faiss index helpers for the retrieval database: pure functions, no Ray.

The life of an index here follows RETRO's (and Megatron's) three stages:

1. ``choose_index_string`` picks a Faiss factory string for the database size (``index_str="auto"``).
2. ``train_index`` builds the *empty trained* index from a sample of chunk embeddings.
3. ``add_range`` adds a contiguous range of chunk embeddings with their global chunk ids as Faiss ids,
   one shard at a time; ``merge_shards`` joins the shards into the *added* index, whose search equals
   searching every shard and merging with ``merge_topk``.

Ids are always global chunk ids, so results from any shard (or from the merged index) name chunks
directly. Index types that cannot store ids themselves (Flat, HNSW, plain PQ...) are wrapped in
``faiss.IndexIDMap2`` by ``train_index``; IVF indexes (also under an OPQ pre-transform) store them in
their inverted lists.
"""

from __future__ import annotations

import logging
import math
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from retro_ray.config import KMEANS_CHOICES
from retro_ray.errors import RetroRayError

logger = logging.getLogger("retro_ray.index")

__all__ = [
    "FAISS_MIN_POINTS_PER_CENTROID",
    "add_range",
    "choose_index_string",
    "get_search_params",
    "index_dir_name",
    "index_from_bytes",
    "index_to_bytes",
    "index_type",
    "KMEANS_CHOICES",
    "kmeans_backend",
    "load_index",
    "merge_shards",
    "merge_topk",
    "metric_name",
    "save_index",
    "search",
    "set_search_params",
    "train_index",
    "training_points_needed",
]

# Faiss's k-means prints a warning below 39 training points per centroid (Clustering::min_points_per_centroid).
FAISS_MIN_POINTS_PER_CENTROID = 39

# --- index_str="auto" thresholds --------------------------------------------------------------------
# Flat (exact) below 100k vectors: at 384-d the codes take 100k * 1.5 KiB = 150 MiB and a brute-force
# query scans 38 M multiply-adds (~5 ms on one core), so an approximate index buys nothing worth its
# training time and recall loss.
FLAT_MAX_VECTORS = 100_000
# IVF-HNSW-Flat while the raw float32 vectors fit in 8 GiB (5.6 M vectors at 384-d, 2.1 M at 1024-d):
# exact distances inside the probed lists, memory still fits one ordinary node and a shard per actor.
IVF_FLAT_MAX_BYTES = 8 * 1024**3
# Above that, OPQ + IVF-HNSW + PQ with 64 one-byte codes: 64 B + 8 B id per vector, i.e. 20 M vectors in
# ~1.4 GiB and 1 B vectors in ~72 GiB (what the RETRO paper's 2 T-token database needs, sharded).
PQ_BYTES_PER_VECTOR = 64
# nlist: Faiss's guideline is 4*sqrt(n) .. 16*sqrt(n); we take the power of two nearest 8*sqrt(n) (so
# 5.7..11.3*sqrt(n)), capped so that a training sample of the whole database still gives 39 points per
# list. At 1M vectors that is 8192 lists: on benchmarks/bench_index.py's 1M x 384 data, nprobe 32 reached
# recall@10 0.953 at 25.7x exact search's QPS, where 4096 lists needed nprobe 32 for 0.955 at ~11x
# (IVF-Flat scans are memory-bound on a CPU, so fewer vectors per probed list is what pays).
NLIST_SQRT_FACTOR = 8

_FLT_MAX = float(np.finfo(np.float32).max)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(1.0, x))))


def _pow2_nearest(x: float) -> int:
    return 1 << max(0, round(math.log2(max(1.0, x))))


def _choose_nlist(n_vectors: int) -> int:
    nlist = _pow2_nearest(NLIST_SQRT_FACTOR * math.sqrt(n_vectors))
    cap = _pow2_floor(n_vectors / FAISS_MIN_POINTS_PER_CENTROID)
    return max(1, min(nlist, cap))


def choose_index_string(n_vectors: int, dim: int) -> str:
    """Faiss factory string for ``index_str="auto"``, from the database size and embedding dimension.

    * ``n_vectors < 100_000`` -> ``"Flat"`` (exact search; small enough that brute force is fast).
    * raw vectors ``n * dim * 4`` bytes <= 8 GiB (about 5.6 M vectors at 384-d) ->
      ``"IVF{nlist}_HNSW32,Flat"``: inverted lists with an HNSW coarse quantizer, exact codes.
    * larger -> ``"OPQ{m}_{4m},IVF{nlist}_HNSW32,PQ{m}"`` with ``m = 64`` (smaller for small ``dim``):
      OPQ rotation to ``4m`` dims then 64-byte product codes, so memory grows by ~72 B per vector.

    ``nlist`` is the power of two nearest ``8 * sqrt(n)`` (Faiss recommends 4..16 * sqrt(n)),
    never more than ``n / 39`` so a training sample can give Faiss its 39 points per list. Examples at
    384-d: 1 000 -> ``Flat``; 500 000 -> ``IVF4096_HNSW32,Flat``; 1 M -> ``IVF8192_HNSW32,Flat``;
    20 M -> ``OPQ64_256,IVF32768_HNSW32,PQ64``.
    """
    n_vectors = int(n_vectors)
    dim = int(dim)
    if n_vectors < 0 or dim <= 0:
        raise RetroRayError(
            f"cannot choose a Faiss index for {n_vectors} vectors of dimension {dim}; "
            "pass a non-negative vector count and a positive embedding dimension"
        )
    if n_vectors < FLAT_MAX_VECTORS:
        return "Flat"
    nlist = _choose_nlist(n_vectors)
    if n_vectors * dim * 4 <= IVF_FLAT_MAX_BYTES:
        return f"IVF{nlist}_HNSW32,Flat"
    m = PQ_BYTES_PER_VECTOR
    while m > 1 and 2 * m > dim:
        m //= 2
    d_out = min(4 * m, (dim // m) * m)
    return f"OPQ{m}_{d_out},IVF{nlist}_HNSW32,PQ{m}"


def index_type(index_str: str) -> str:
    """Short family name of an index string, used as a directory name.

    ``"Flat"`` -> ``"faiss-flat"``; ``"IVF4096_HNSW32,Flat"`` -> ``"faiss-ivf"``;
    ``"IVF4096,PQ64"`` -> ``"faiss-ivf-pq"``; ``"OPQ64_256,IVF...,PQ64"`` -> ``"faiss-opq-ivf-pq"``;
    ``"HNSW32"`` -> ``"faiss-hnsw"``; anything else -> ``"faiss-"`` + ``index_dir_name(index_str).lower()``.
    """
    parts = [p.strip() for p in str(index_str).split(",") if p.strip()]
    upper = [p.upper() for p in parts]
    has_opq = any(p.startswith("OPQ") for p in upper)
    has_ivf = any(p.startswith("IVF") for p in upper)
    last = upper[-1] if upper else ""
    has_pq = last.startswith("PQ")
    if has_ivf:
        name = "faiss-" + ("opq-" if has_opq else "") + "ivf" + ("-pq" if has_pq else "")
        return name
    if upper in (["FLAT"], ["IDMAP", "FLAT"], ["IDMAP2", "FLAT"]):
        return "faiss-flat"
    if len(upper) == 1 and upper[0].startswith("HNSW"):
        return "faiss-hnsw"
    if has_pq:
        return "faiss-" + ("opq-" if has_opq else "") + "pq"
    return "faiss-" + index_dir_name(index_str).lower()


def index_dir_name(index_str: str) -> str:
    """Filesystem-safe version of an index string (``"IVF4096_HNSW32,Flat"`` -> ``"IVF4096_HNSW32__Flat"``).

    Commas become ``__``; any other character outside ``[A-Za-z0-9_.-]`` becomes ``-``.
    """
    s = str(index_str).strip().replace(",", "__")
    return re.sub(r"[^A-Za-z0-9_.-]", "-", s) or "index"


def metric_name(index: faiss.Index) -> str:
    """``"l2"`` or ``"ip"``: the metric of a Faiss index."""
    return "ip" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"


def _metric_type(metric: str) -> int:
    m = str(metric).lower()
    if m in ("l2", "euclidean"):
        return faiss.METRIC_L2
    if m in ("ip", "inner_product", "cosine"):
        return faiss.METRIC_INNER_PRODUCT
    raise RetroRayError(f"unknown Faiss metric {metric!r}; use 'l2' or 'ip'")


def _faiss_reason(err: BaseException) -> str:
    """The meaningful line of a Faiss C++ exception (drops the 'Error in <signature> at file:line:' part)."""
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else text
    m = re.search(r" at \S+:\d+: (.*)$", line)
    if m:
        line = m.group(1)
    m = re.match(r"Error: '.*?' failed: (.*)$", line)
    if m:
        line = m.group(1)
    return line.strip() or type(err).__name__


def _as_float32_matrix(x, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise RetroRayError(
            f"{what} must be a 2-D array [n, dim], got shape {a.shape}; reshape it to [n, dim]"
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise RetroRayError(f"{what} must be floating point, got dtype {a.dtype}; cast it to float32")
    return np.ascontiguousarray(a, dtype=np.float32)


def _unwrap(index: faiss.Index) -> faiss.Index:
    """Innermost index under IDMap / PreTransform wrappers (downcast)."""
    ix = faiss.downcast_index(index)
    for _ in range(8):
        inner = getattr(ix, "index", None)
        if inner is None or not isinstance(inner, faiss.Index):
            break
        ix = faiss.downcast_index(inner)
    return ix


def _ivf(index: faiss.Index):
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else faiss.downcast_index(ivf)


def _is_idmap(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2))


def _supports_ids(index: faiss.Index) -> bool:
    return _is_idmap(index) or _ivf(index) is not None


def training_points_needed(index: faiss.Index) -> tuple[int, int, str]:
    """``(minimum, recommended, what)`` training points for an untrained index.

    IVF needs one point per list (``nlist``); a product quantizer needs one per codebook entry
    (``2**nbits``, 256 for 8-bit codes) and OPQ trains one too. Faiss's k-means warns below 39 points
    per centroid, so the recommendation is 39 times the minimum.
    """
    need, what = 0, []
    ivf = _ivf(index)
    if ivf is not None:
        need = max(need, int(ivf.nlist))
        what.append(f"IVF nlist={ivf.nlist}")
    base = ivf if ivf is not None else _unwrap(index)
    pq = getattr(base, "pq", None)
    if pq is not None and isinstance(pq, faiss.ProductQuantizer):
        k = 1 << int(pq.nbits)
        need = max(need, k)
        what.append(f"PQ{pq.M} with {k} centroids per sub-quantizer")
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexPreTransform):
        for i in range(top.chain.size()):
            vt = faiss.downcast_VectorTransform(top.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                need = max(need, 256)
                what.append(f"OPQ{vt.M} (256 centroids per sub-quantizer)")
    return need, need * FAISS_MIN_POINTS_PER_CENTROID, ", ".join(what)


def kmeans_backend(use_gpu: bool | str = "auto", kmeans: str = "auto") -> str:
    """Where ``train_index`` runs IVF k-means: ``faiss-gpu``, ``torch-cuda``, ``torch-cpu`` or ``faiss-cpu``.

    ``use_gpu`` as for ``train_index``. ``kmeans``: ``"faiss"`` uses Faiss's own k-means (on its GPUs
    with faiss-gpu); ``"torch"`` uses ``retrieval/kmeans.py`` (on cuda when torch sees a GPU);
    ``"auto"`` prefers faiss-gpu, then torch. On the CPU, torch ran 1.7-2.5x faster than Faiss
    here at the same objective (``benchmarks/bench_index_train.py``). ``use_gpu=True`` with no GPU
    that the chosen k-means can use is an error.
    """
    if use_gpu not in (True, False, "auto"):
        raise RetroRayError(f"use_gpu={use_gpu!r} is not understood; use True, False or 'auto'")
    if kmeans not in KMEANS_CHOICES:
        raise RetroRayError(f"kmeans={kmeans!r} is not one of {', '.join(KMEANS_CHOICES)}")
    gpu_ok = use_gpu in (True, "auto")
    if gpu_ok and kmeans in ("auto", "faiss") and _num_gpus() > 0:
        return "faiss-gpu"
    if gpu_ok and kmeans in ("auto", "torch") and _torch_has_cuda():
        return "torch-cuda"
    if use_gpu is True:
        seen = {"faiss": "Faiss sees no GPU", "torch": "torch sees no GPU"}.get(kmeans, "neither Faiss nor torch sees a GPU")
        raise RetroRayError(
            f"use_gpu=True but {seen} (kmeans={kmeans}); run index-train on a GPU node "
            "(faiss-gpu, or any faiss with a CUDA build of torch) or set use_gpu='auto'/False"
        )
    return "faiss-cpu" if kmeans == "faiss" else "torch-cpu"


def _torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _num_gpus() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    if get is None:
        return 0
    try:
        return int(get())
    except Exception:  # noqa: BLE001 - a broken GPU runtime means "no GPU" here
        return 0


def train_index(
    index_str: str,
    train_vectors: np.ndarray,
    metric: str = "l2",
    use_gpu: bool | str = "auto",
    dim: int | None = None,
    info: dict | None = None,
    kmeans: str = "auto",
) -> faiss.Index:
    """Build the empty trained index for ``index_str`` from a sample of embeddings.

    ``metric`` is ``"l2"`` or ``"ip"``. ``use_gpu``: ``"auto"`` runs IVF k-means on all GPUs when the
    installed Faiss has any, else on the GPU through torch (``retrieval/kmeans.py``) when torch sees
    one; ``True`` requires a GPU either way, ``False`` stays on CPU.
    ``dim``, when given, is the embedding dimension the index must have (checked against the vectors).
    ``kmeans`` picks the k-means implementation for IVF lists (see ``kmeans_backend``). ``info``,
    when given, receives ``info["kmeans"]``: where IVF k-means actually ran (a value of
    ``kmeans_backend``, ``"faiss-cpu"`` after a GPU out-of-memory fallback), or ``"none"``.

    Indexes that cannot store ids themselves come back wrapped in ``IndexIDMap2``, so every index this
    returns accepts ``add_with_ids`` (see ``add_range``).
    """
    x = _as_float32_matrix(train_vectors, "training vectors")
    d = x.shape[1]
    if dim is not None and int(dim) != d:
        raise RetroRayError(
            f"training vectors have dimension {d} but the index expects {dim}; "
            "embed with the same model as the rest of the database or set the index dimension to match"
        )
    metric_type = _metric_type(metric)
    if use_gpu not in (True, False, "auto"):
        raise RetroRayError(f"use_gpu={use_gpu!r} is not understood; use True, False or 'auto'")
    try:
        index = faiss.index_factory(d, str(index_str), metric_type)
    except RuntimeError as e:
        raise RetroRayError(
            f"Faiss rejected index string {index_str!r} for dimension {d}: {_faiss_reason(e)}; "
            "fix the index string (see the Faiss index_factory docs) or use index_str='auto'"
        ) from None

    if not index.is_trained:
        need, recommended, what = training_points_needed(index)
        n = x.shape[0]
        if n < need:
            ivf_lists = _ivf(index).nlist if _ivf(index) is not None else 0
            fix = "lower nlist (IVF<n>)" if ivf_lists >= need else "use fewer PQ bits (e.g. PQ<M>x4) or drop PQ/OPQ"
            raise RetroRayError(
                f"index {index_str!r} ({what}) needs at least {need} training vectors "
                f"(recommended {recommended}) but got {n}; {fix} in the index string, "
                "use index_str='auto', or train on more chunks"
            )
        if n < recommended:
            logger.warning(
                "training %r on %d vectors; Faiss recommends at least %d (%s)", index_str, n, recommended, what
            )
        backend = kmeans_backend(use_gpu, kmeans)
        ivf = _ivf(index)
        ran_on = backend if ivf is not None else "none"
        gpu_clustering = None  # Python keeps it alive while Faiss points at it
        if backend == "faiss-gpu" and ivf is not None:
            # k-means of the coarse quantizer is the expensive part: run its assignment on the GPUs.
            logger.info("training IVF coarse quantizer of %r on %d GPU(s)", index_str, _num_gpus())
            gpu_clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
            ivf.clustering_index = gpu_clustering
        try:
            if backend.startswith("torch-") and ivf is not None:
                import torch

                from retro_ray.retrieval.kmeans import train_ivf_with_torch_kmeans

                device = "cuda" if backend == "torch-cuda" else "cpu"
                logger.info("training IVF coarse quantizer of %r with torch k-means on %s", index_str, device)
                try:
                    train_ivf_with_torch_kmeans(index, x, device)
                except torch.cuda.OutOfMemoryError:
                    # The sample (up to 256 points a list) did not fit on this GPU: Faiss on the CPU
                    # instead, on a fresh index since pre-transforms may already be trained.
                    torch.cuda.empty_cache()
                    logger.warning("torch k-means ran out of GPU memory; training %r on the CPU", index_str)
                    index = faiss.index_factory(d, str(index_str), metric_type)
                    index.train(x)
                    ran_on = "faiss-cpu"
            else:
                index.train(x)
        except RuntimeError as e:
            raise RetroRayError(
                f"Faiss could not train {index_str!r} on {n} vectors: {_faiss_reason(e)}; "
                "lower nlist / PQ size in the index string or train on more chunks"
            ) from None
        finally:
            if gpu_clustering is not None:
                ivf.clustering_index = None
                del gpu_clustering
    else:
        ran_on = "none"
    if info is not None:
        info["kmeans"] = ran_on

    if not _supports_ids(index):
        index = faiss.IndexIDMap2(index)
    return index


def index_to_bytes(index: faiss.Index) -> np.ndarray:
    """Serialize an index to a uint8 numpy array (cheap to pass through Ray's object store)."""
    return faiss.serialize_index(index)


def index_from_bytes(data) -> faiss.Index:
    """Inverse of ``index_to_bytes``; accepts ``bytes`` or a uint8 array."""
    arr = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        return faiss.deserialize_index(np.ascontiguousarray(arr, dtype=np.uint8))
    except RuntimeError as e:
        raise RetroRayError(
            f"could not deserialize a Faiss index: {_faiss_reason(e)}; pass bytes made by index_to_bytes"
        ) from None


def add_range(index, vectors: np.ndarray, start_id: int) -> faiss.Index:
    """Add ``vectors`` with ids ``start_id .. start_id + len(vectors) - 1`` (global chunk ids).

    ``index`` is a trained index or its serialized bytes (then a new index is returned). A bare index
    without id support (e.g. a hand-made ``IndexFlatL2``) is wrapped in ``IndexIDMap2`` while still
    empty. Returns the index holding the vectors.
    """
    if not isinstance(index, faiss.Index):
        index = index_from_bytes(index)
    x = _as_float32_matrix(vectors, "vectors to add")
    if x.shape[1] != index.d:
        raise RetroRayError(
            f"vectors have dimension {x.shape[1]} but the index has dimension {index.d}; "
            "embed with the model the index was trained for, or retrain the index"
        )
    if not index.is_trained:
        raise RetroRayError("the index is not trained; build it with train_index() before adding vectors")
    start_id = int(start_id)
    if start_id < 0:
        raise RetroRayError(f"start_id must be >= 0 (a global chunk id), got {start_id}")
    if not _supports_ids(index):
        if index.ntotal > 0:
            raise RetroRayError(
                "this index already holds vectors without ids; rebuild it with train_index() "
                "so that ids are stored"
            )
        index = faiss.IndexIDMap2(index)
    ids = np.arange(start_id, start_id + x.shape[0], dtype=np.int64)
    if x.shape[0]:
        index.add_with_ids(x, ids)
    return index


def _clone(index: faiss.Index) -> faiss.Index:
    try:
        return faiss.clone_index(index)
    except RuntimeError:
        return faiss.deserialize_index(faiss.serialize_index(index))


def _merge_into(dst: faiss.Index, src: faiss.Index, shard_no: int) -> None:
    if src.d != dst.d or src.metric_type != dst.metric_type:
        raise RetroRayError(
            f"shard {shard_no} has dimension {src.d} / metric {metric_name(src)} but shard 0 has "
            f"{dst.d} / {metric_name(dst)}; all shards must come from the same empty trained index"
        )
    try:
        dst.merge_from(src, 0)
        return
    except RuntimeError as first_err:
        d_ivf, s_ivf = _ivf(dst), _ivf(src)
        if d_ivf is None or s_ivf is None:
            raise RetroRayError(
                f"Faiss cannot merge shard {shard_no} ({type(faiss.downcast_index(src)).__name__}): "
                f"{_faiss_reason(first_err)}; use a Flat or IVF index, or search the shards with ShardedIndex"
            ) from None
    # Wrapper without merge_from support: merge the inverted lists and fix up the wrapper's count.
    try:
        d_ivf.merge_from(s_ivf, 0)
        dst.ntotal = d_ivf.ntotal
    except RuntimeError as e:
        raise RetroRayError(
            f"Faiss cannot merge shard {shard_no}: {_faiss_reason(e)}; all shards must be built from "
            "the same empty trained index"
        ) from None


def merge_shards(shard_indexes: Sequence[faiss.Index | str | os.PathLike]) -> faiss.Index:
    """Merge shard indexes (objects or saved paths) into one index holding all their vectors.

    The inputs are left untouched (Faiss's ``merge_from`` empties its source, so in-memory shards are
    cloned first; paths are loaded one at a time). Ids are kept as they are, so searching the result
    equals searching every shard and merging with ``merge_topk``.
    """
    items = list(shard_indexes)
    if not items:
        raise RetroRayError("merge_shards got no shards; pass at least one shard index or path")

    def get(i: int, item) -> faiss.Index:
        if isinstance(item, faiss.Index):
            return _clone(item)
        return load_index(item)

    merged = get(0, items[0])
    for i, item in enumerate(items[1:], start=1):
        src = get(i, item)
        _merge_into(merged, src, i)
        del src
    return merged


def save_index(index: faiss.Index, path: str | os.PathLike) -> Path:
    """Write ``index`` to ``path`` atomically: a temporary file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        faiss.write_index(index, str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except RuntimeError as e:
        raise RetroRayError(
            f"could not write Faiss index to {path}: {_faiss_reason(e)}; check free disk space and permissions"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_index(path: str | os.PathLike, mmap: bool = False) -> faiss.Index:
    """Read an index written by ``save_index``. ``mmap=True`` maps IVF lists read-only instead of loading them."""
    path = Path(path)
    if not path.is_file():
        raise RetroRayError(
            f"Faiss index file {path} does not exist; build the index first (train, add, merge) "
            "or point to the right project directory"
        )
    flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise RetroRayError(
            f"could not read Faiss index {path}: {_faiss_reason(e)}; the file is corrupt or truncated, "
            "delete it and rebuild that index"
        ) from None


def set_search_params(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set IVF ``nprobe`` and HNSW ``efSearch`` through IDMap / OPQ / IVF wrappers.

    ``nprobe`` applies to an IVF index (values above ``nlist`` behave as ``nlist``); ``ef_search`` to an
    HNSW coarse quantizer of an IVF index, or to a top-level HNSW index. A parameter the index does
    not have is ignored (so one setting can serve every index type).
    """
    ivf = _ivf(index)
    if nprobe is not None:
        if int(nprobe) < 1:
            raise RetroRayError(f"nprobe must be >= 1, got {nprobe}; pass a positive number of lists to probe")
        if ivf is not None:
            ivf.nprobe = int(nprobe)
        else:
            logger.debug("nprobe=%s ignored: index has no IVF level", nprobe)
    if ef_search is not None:
        if int(ef_search) < 1:
            raise RetroRayError(f"ef_search must be >= 1, got {ef_search}; pass a positive HNSW search depth")
        target = faiss.downcast_index(ivf.quantizer) if ivf is not None else _unwrap(index)
        hnsw = getattr(target, "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = int(ef_search)
        else:
            logger.debug("ef_search=%s ignored: index has no HNSW level", ef_search)


def get_search_params(index: faiss.Index) -> tuple[int | None, int | None]:
    """Current ``(nprobe, ef_search)`` of an index; ``None`` for a level the index does not have."""
    ivf = _ivf(index)
    target = faiss.downcast_index(ivf.quantizer) if ivf is not None else _unwrap(index)
    hnsw = getattr(target, "hnsw", None)
    return (None if ivf is None else int(ivf.nprobe)), (None if hnsw is None else int(hnsw.efSearch))


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Search ``k`` nearest neighbours: ``(D float32 [nq, k], I int64 [nq, k])``, -1 ids when fewer exist."""
    q = _as_float32_matrix(queries, "queries")
    if q.shape[1] != index.d:
        raise RetroRayError(
            f"queries have dimension {q.shape[1]} but the index has dimension {index.d}; "
            "embed queries with the model the index was built with"
        )
    k = int(k)
    if k < 1:
        raise RetroRayError(f"k must be >= 1, got {k}; ask for at least one neighbour")
    set_search_params(index, nprobe=nprobe, ef_search=ef_search)
    D, I = index.search(q, k)
    return D, I


# --- sharded IVF search: assign the coarse lists once, scan them in every shard ----------------------
def coarse_quantizer(index: faiss.Index) -> faiss.Index | None:
    """The coarse quantizer of a plain IVF index (``IVF…,Flat`` / ``IVF…,PQ…``), else ``None``.

    Shards of one IVF index share it (they come from the same trained empty index), so a client can
    search it once for a batch and hand each shard the lists to scan (:func:`search_preassigned`)
    instead of every shard repeating the same quantizer search. An index with a transform in front
    (OPQ) or an id map around it returns ``None``: shards then search in full.
    """
    top = faiss.downcast_index(index)
    return faiss.downcast_index(top.quantizer) if isinstance(top, faiss.IndexIVF) else None


def assign_lists(quantizer: faiss.Index, queries: np.ndarray, nprobe: int, nlist: int,
                 ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``nprobe`` nearest lists of each query: ``(Dq float32 [nq, p], Iq int64 [nq, p])``, p = min(nprobe, nlist).

    The same search ``IndexIVF.search`` makes internally (``ef_search`` as set on an HNSW quantizer).
    """
    if ef_search is not None and getattr(quantizer, "hnsw", None) is not None:
        quantizer.hnsw.efSearch = int(ef_search)
    return quantizer.search(_as_float32_matrix(queries, "queries"), max(1, min(int(nprobe), int(nlist))))


def search_preassigned(index: faiss.Index, queries: np.ndarray, k: int, Iq: np.ndarray,
                       Dq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Search only the lists ``Iq`` (from :func:`assign_lists`) of a plain IVF index; same result as
    ``search`` with ``nprobe = Iq.shape[1]`` when ``Iq`` / ``Dq`` came from this index's quantizer."""
    ivf = faiss.downcast_index(index)
    if not isinstance(ivf, faiss.IndexIVF):
        raise RetroRayError(f"search_preassigned needs a plain IVF index, not {type(ivf).__name__}; use search()")
    q = _as_float32_matrix(queries, "queries")
    Iq = np.ascontiguousarray(Iq, dtype=np.int64)
    if Iq.shape[0] != q.shape[0] or np.asarray(Dq).shape != Iq.shape:
        raise RetroRayError(f"list assignments {Iq.shape} / {np.asarray(Dq).shape} do not match {q.shape[0]} queries")
    ivf.nprobe = int(Iq.shape[1])
    return ivf.search_preassigned(q, int(k), Iq, np.ascontiguousarray(Dq, dtype=np.float32))


def merge_topk(
    distances_list: Sequence[np.ndarray],
    ids_list: Sequence[np.ndarray],
    k: int,
    metric: str = "l2",
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ``(D, I)`` results into the global top ``k`` per query.

    Rows are ordered by distance (ascending for ``"l2"``, descending for ``"ip"``), ties broken by the
    smaller id; ``-1`` ids (missing results) go last. Rows with fewer than ``k`` results are padded
    with id ``-1`` and Faiss's padding distance (``+FLT_MAX`` for l2, ``-FLT_MAX`` for ip).
    """
    k = int(k)
    if k < 1:
        raise RetroRayError(f"k must be >= 1, got {k}; ask for at least one neighbour")
    if len(distances_list) != len(ids_list) or not distances_list:
        raise RetroRayError(
            f"merge_topk got {len(distances_list)} distance arrays and {len(ids_list)} id arrays; "
            "pass one (D, I) pair per shard"
        )
    higher_is_better = _metric_type(metric) == faiss.METRIC_INNER_PRODUCT
    D = np.concatenate([np.asarray(d, dtype=np.float32).reshape(len(d), -1) for d in distances_list], axis=1)
    I = np.concatenate([np.asarray(i, dtype=np.int64).reshape(len(i), -1) for i in ids_list], axis=1)
    if D.shape != I.shape:
        raise RetroRayError(
            f"distances {D.shape} and ids {I.shape} do not line up; pass D and I from the same searches"
        )
    nq = D.shape[0]
    pad = -_FLT_MAX if higher_is_better else _FLT_MAX
    invalid = I < 0
    key = np.where(invalid, np.float32(np.inf), -D if higher_is_better else D)  # missing results last
    # One float sort (10x cheaper than a lexsort of (distance, id) at k=200 over 4 shards); rows where
    # equal distances meet within the first k+1 places are redone by (distance, id).
    order = np.argsort(key, axis=1)
    head = np.take_along_axis(key, order[:, : k + 1], axis=1)
    tied = np.flatnonzero(np.any((head[:, 1:] == head[:, :-1]) & np.isfinite(head[:, 1:]), axis=1))
    if len(tied):
        order[tied] = np.lexsort((I[tied], key[tied]), axis=-1)
    order = order[:, :k]
    out_D = np.take_along_axis(D, order, axis=1)
    out_I = np.take_along_axis(I, order, axis=1)
    out_D = np.where(out_I < 0, np.float32(pad), out_D).astype(np.float32)
    if out_I.shape[1] < k:
        extra = k - out_I.shape[1]
        out_D = np.concatenate([out_D, np.full((nq, extra), pad, dtype=np.float32)], axis=1)
        out_I = np.concatenate([out_I, np.full((nq, extra), -1, dtype=np.int64)], axis=1)
    return out_D, out_I
