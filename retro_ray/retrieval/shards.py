"""Sharded Faiss index on Ray: one ``IndexShard`` actor per contiguous range of chunk ids.

Each shard holds a copy of the same empty trained index with its own vectors added under their
global chunk ids, so ``ShardedIndex.search`` (fan out, then ``merge_topk``) returns what a search of
the merged index (``index.merge_shards``) would.

Actors ask for a small fraction of a CPU (``DEFAULT_SHARD_NUM_CPUS``) so that a handful of them never
starve Ray Data tasks on a small machine; Ray then gives each one OMP_NUM_THREADS=1, i.e. Faiss searches
one query batch per shard on one core and the shards run in parallel.

Documents added after index-add (:mod:`retro_ray.stages.add_docs`) get chunk ids after the train
chunks; they are dealt to the shards round-robin (:func:`added_chunk_ids`), so every shard grows
alike and a shard's vector count alone tells which added ids it holds. ``IndexShard.add_with_ids``
and ``ShardedIndex.add_to_shards`` add them to live actors; with ``expected_ntotal`` an add happens
only when the shard holds exactly that many vectors, so two clients bringing the same shard up to
date never add a vector twice (an actor runs one call at a time).

IVF shards share the coarse quantizer of the empty index they were built from. For a plain IVF index
the client keeps one copy, finds each query's ``nprobe`` lists once per batch and sends the shards
those lists to scan (``IndexShard.search_preassigned``): results identical to a full search, without
every shard repeating the quantizer search (which grows with nlist and with the number of shards).

Failure policy: an actor that dies during a search is restarted once from its saved shard file (when
the client knows one and it holds the number of vectors the dead shard held); otherwise the search
raises ``RetroRayError`` naming the shard. Partial results are never returned.

Crash tests: an actor whose environment has ``RETRO_RAY_INDEX_SHARD_KILL_AFTER_ADDS=<n>`` (``index-add``
sets it on one shard through ``runtime_env``; see ``retro_ray.stages.index_add.KILL_SHARD_ENV``) SIGKILLs
its own worker process right after its ``n``-th ``add`` call, like a ``kill -9`` mid-add.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from retro_ray.errors import RetroRayError
from retro_ray.retrieval import index as ix

logger = logging.getLogger("retro_ray.shards")

__all__ = ["DEFAULT_SHARD_NUM_CPUS", "IndexShard", "RemoteIndexShard", "ShardedIndex", "add_ids", "added_chunk_ids",
           "start_shard"]

DEFAULT_SHARD_NUM_CPUS = 0.25
# How long a shard that died is tried again when its replacement dies while starting (a dying node).
RESTART_WINDOW_S = 60.0
KILL_AFTER_ADDS_ENV = "RETRO_RAY_INDEX_SHARD_KILL_AFTER_ADDS"

PathLike = str | os.PathLike


def _reraise_user_error(err: RayTaskError):
    """A ``RetroRayError`` raised inside an actor comes back wrapped with its remote traceback: unwrap it."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, RetroRayError):
        raise RetroRayError(str(cause)) from None
    raise err


def _death_reason(err: RayActorError) -> str:
    """One line on why an actor died: the user error its constructor raised, or that its process ended."""
    text = str(err)
    for line in reversed(text.splitlines()):
        if "RetroRayError: " in line:
            return line.split("RetroRayError: ", 1)[1].strip()
    if getattr(err, "actor_init_failed", False):
        return "its constructor failed"
    return "its worker process ended"


def shard_ranges(n_chunks: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal chunk-id ranges [start, end) covering 0..n_chunks: the train chunks each
    index-add shard holds (the documents added later are dealt round-robin: ``added_chunk_ids``)."""
    bounds = np.linspace(0, n_chunks, num_shards + 1).round().astype(int)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(num_shards)]


def added_chunk_ids(shard: int, num_shards: int, n_base: int, n_added: int, start: int = 0) -> np.ndarray:
    """Global ids of the added chunks that ``shard`` holds, from its ``start``-th added one on.

    Added chunk ``n_base + j`` belongs to shard ``j % num_shards`` (round-robin), so shard ``s`` holds
    ``n_base + s, n_base + s + num_shards, ...`` in that order, and the number of added vectors it holds
    says exactly which.
    """
    if not 0 <= shard < num_shards:
        raise RetroRayError(f"shard {shard} is not one of the {num_shards} shards; pass 0 .. {num_shards - 1}")
    return np.arange(n_base + shard, n_base + n_added, num_shards, dtype=np.int64)[start:]


def add_ids(index, vectors: np.ndarray, ids: np.ndarray):
    """Add ``vectors`` under the chunk ids ``ids`` (any ids, unlike ``index.add_range``); returns the index."""
    x = np.ascontiguousarray(np.asarray(vectors), dtype=np.float32)
    ids = np.ascontiguousarray(np.asarray(ids), dtype=np.int64)
    if x.ndim != 2 or x.shape[0] != len(ids) or (len(ids) and x.shape[1] != index.d):
        raise RetroRayError(
            f"add_ids got vectors of shape {x.shape} for {len(ids)} ids into a {index.d}-d index; "
            "pass one row of the index's dimension per id"
        )
    if not len(ids):
        return index
    if not ix._supports_ids(index):
        raise RetroRayError(
            f"the index ({type(index).__name__}) cannot store chunk ids; rebuild it with `retro-ray index` "
            "(train_index wraps such indexes in IndexIDMap2)"
        )
    try:
        index.add_with_ids(x, ids)
    except RuntimeError as e:
        raise RetroRayError(
            f"Faiss could not add {len(ids)} vectors: {ix._faiss_reason(e)}; an index loaded memory-mapped "
            "(read-only) takes no new vectors: load it without mmap"
        ) from None
    return index


class IndexShard:
    """One shard of the index. Plain class; run it as an actor through ``start_shard``.

    Built from the serialized empty trained index (``index_bytes``, from ``index.index_to_bytes``) or
    from a saved shard file (``path``); ``shard`` is its number, used in messages.
    """

    def __init__(
        self,
        shard: int,
        index_bytes: Any = None,
        path: PathLike | None = None,
        mmap: bool = False,
        omp_threads: int | None = None,
    ) -> None:
        if (index_bytes is None) == (path is None):
            raise RetroRayError(
                f"IndexShard {shard}: pass exactly one of index_bytes (empty trained index) or path (saved shard)"
            )
        if omp_threads is not None:
            import faiss

            faiss.omp_set_num_threads(int(omp_threads))
        self.shard = int(shard)
        self.path: str | None = None
        self._adds = 0  # add() calls so far (for the KILL_AFTER_ADDS_ENV crash point)
        if path is not None:
            self.load(path, mmap=mmap)
        else:
            self.index = ix.index_from_bytes(index_bytes)
            self._defaults = ix.get_search_params(self.index)

    def add(self, vectors: np.ndarray, start_id: int) -> int:
        """Add vectors with ids ``start_id ..``; returns the shard's new vector count."""
        self.index = ix.add_range(self.index, vectors, start_id)
        self._adds += 1
        if os.environ.get(KILL_AFTER_ADDS_ENV) == str(self._adds):
            logger.warning("index shard %d: %s=%d: killing this worker (crash test)", self.shard, KILL_AFTER_ADDS_ENV,
                           self._adds)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
        return int(self.index.ntotal)

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray, expected_ntotal: int | None = None) -> int:
        """Add vectors under ``ids``; returns the shard's vector count afterwards.

        With ``expected_ntotal``, add only if the shard holds exactly that many vectors now (else add
        nothing and return the count it has): a compare-and-add, so that a retried or concurrent
        update never adds the same chunks twice.
        """
        if expected_ntotal is not None and int(self.index.ntotal) != int(expected_ntotal):
            return int(self.index.ntotal)
        self.index = add_ids(self.index, vectors, ids)
        return int(self.index.ntotal)

    def save(self, path: PathLike) -> str:
        """Write the shard atomically; later restarts load it from there."""
        ix.save_index(self.index, path)
        self.path = str(path)
        return self.path

    def load(self, path: PathLike, mmap: bool = False) -> int:
        """Replace the shard's index with the one saved at ``path``; returns its vector count."""
        self.index = ix.load_index(path, mmap=mmap)
        self._defaults = ix.get_search_params(self.index)
        self.path = str(path)
        return int(self.index.ntotal)

    def search(
        self, queries: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search this shard. ``None`` parameters mean the index's own (as built or loaded), not the last call's."""
        d_nprobe, d_ef = self._defaults
        return ix.search(
            self.index,
            queries,
            k,
            nprobe=d_nprobe if nprobe is None else nprobe,
            ef_search=d_ef if ef_search is None else ef_search,
        )

    def search_preassigned(self, queries: np.ndarray, k: int, Iq: np.ndarray, Dq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scan only the lists ``Iq`` (chosen by the client with the shared coarse quantizer)."""
        return ix.search_preassigned(self.index, queries, k, Iq, Dq)

    def coarse(self, with_quantizer: bool = True) -> dict | None:
        """The shared coarse quantizer (serialized), its digest, nlist and this shard's default
        nprobe / efSearch; ``None`` when the index is not a plain IVF index."""
        import hashlib

        quantizer = ix.coarse_quantizer(self.index)
        if quantizer is None:
            return None
        data = ix.index_to_bytes(quantizer)
        nprobe, ef = self._defaults
        return {"digest": hashlib.sha1(data.tobytes()).hexdigest(), "nlist": int(quantizer.ntotal),
                "nprobe": nprobe, "ef_search": ef, "quantizer": data if with_quantizer else None}

    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def info(self) -> dict:
        """Shard number, vector count, dimension, metric, saved path, process id and Ray node id."""
        return {
            "shard": self.shard,
            "ntotal": int(self.index.ntotal),
            "dim": int(self.index.d),
            "metric": ix.metric_name(self.index),
            "path": self.path,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }


RemoteIndexShard = ray.remote(IndexShard)


def start_shard(
    shard: int,
    index_bytes: Any = None,
    path: PathLike | None = None,
    *,
    num_cpus: float = DEFAULT_SHARD_NUM_CPUS,
    mmap: bool = False,
    **actor_options: Any,
):
    """Start an ``IndexShard`` actor; returns its handle.

    ``index_bytes`` is best passed as an ``ObjectRef`` (``ray.put(index.index_to_bytes(empty))``) when
    starting many shards. Extra keyword arguments go to ``.options()`` (e.g. ``name``, ``resources``).
    Ray never restarts these actors by itself (``max_restarts=0``): a restarted actor would come back
    empty; ``ShardedIndex`` restarts from saved files instead.
    """
    # SPREAD: on a cluster of several nodes the shards (and the memory they hold) go to different nodes.
    opts = {"num_cpus": num_cpus, "max_restarts": 0, "scheduling_strategy": "SPREAD"}
    opts.update(actor_options)
    return RemoteIndexShard.options(**opts).remote(
        shard, index_bytes=index_bytes, path=None if path is None else str(path), mmap=mmap
    )


class ShardedIndex:
    """Client that searches every shard actor and merges their top-k.

    ``paths[i]`` (optional) is where shard ``i`` is saved; a shard whose actor dies is restarted from
    there once per search. Build the client after the shards are fully added (or call ``save`` /
    ``refresh`` through it): the vector counts it records are what a restart is checked against.
    """

    def __init__(
        self,
        shards: Sequence[Any],
        paths: Sequence[PathLike | None] | None = None,
        *,
        num_cpus: float = DEFAULT_SHARD_NUM_CPUS,
        mmap: bool = False,
        timeout_s: float | None = None,
    ) -> None:
        self.shards = list(shards)
        if not self.shards:
            raise RetroRayError("ShardedIndex needs at least one shard actor; start shards with start_shard()")
        self.num_cpus = num_cpus
        self.mmap = mmap
        self._lock = threading.Lock()
        self._coarse_lock = threading.Lock()
        self.timeout_s = timeout_s
        given = list(paths) if paths is not None else [None] * len(self.shards)
        if len(given) != len(self.shards):
            raise RetroRayError(
                f"ShardedIndex got {len(self.shards)} shards but {len(given)} paths; pass one path per shard"
            )
        infos = self._get_all([s.info.remote() for s in self.shards], "reading shard info",
                              recover=lambda i: self._info_of_restarted(i, given[i]))
        self.paths = [str(p) if p is not None else info["path"] for p, info in zip(given, infos)]
        self._record(infos)
        self._coarse = self._shared_coarse()

    def _info_of_restarted(self, i: int, path: PathLike | None) -> dict | None:
        """Shard ``i`` found dead (its node died, say): restarted from ``path``, its info; None without a file."""
        if path is None or not Path(path).is_file():
            return None
        logger.warning("index shard %d was dead; restarting it from %s", i, path)
        self.shards[i], _ = self._start_from_file(i, str(path))
        return ray.get(self.shards[i].info.remote(), timeout=self.timeout_s)

    def _start_from_file(self, i: int, path: str) -> tuple[Any, int]:
        """A new actor for shard ``i`` loaded from ``path``, and its vector count.

        When a node dies, Ray takes some seconds to declare it dead and may place the new actor there
        meanwhile; such an actor dies at once. Try again for a while: a constructor that fails (a
        corrupt file) fails the same way every time and ends the loop at once.
        """
        deadline = time.monotonic() + RESTART_WINDOW_S
        while True:
            actor = start_shard(i, path=path, num_cpus=self.num_cpus, mmap=self.mmap)
            try:
                return actor, ray.get(actor.ntotal.remote(), timeout=self.timeout_s)
            except (RayActorError, GetTimeoutError, RayTaskError) as e:
                init_failed = getattr(e, "actor_init_failed", False) or not isinstance(e, RayActorError)
                if not init_failed and time.monotonic() < deadline:
                    logger.warning("index shard %d died again while starting (%s); retrying", i, _death_reason(e))
                    time.sleep(2.0)
                    continue
                why = _death_reason(e) if isinstance(e, RayActorError) else type(e).__name__
                raise RetroRayError(
                    f"index shard {i} died and could not be restarted from {path} ({why}); "
                    "check that file (rebuild the shard if it is corrupt) and the Ray cluster's memory"
                ) from None

    def _shared_coarse(self) -> dict | None:
        """The coarse quantizer every shard has (see the module doc), or ``None`` to search in full."""
        first = self._get_all([self.shards[0].coarse.remote()], "reading the coarse quantizer")[0]
        if first is None:
            return None
        if len(self.shards) > 1:
            rest = self._get_all([s.coarse.remote(False) for s in self.shards[1:]], "reading the coarse quantizer")
            if any(r is None or r["digest"] != first["digest"] for r in rest):
                logger.warning("index shards have different coarse quantizers: each shard searches in full")
                return None
        first["quantizer"] = ix.index_from_bytes(first["quantizer"])
        return first

    @classmethod
    def from_paths(
        cls,
        paths: Sequence[PathLike],
        *,
        num_cpus: float = DEFAULT_SHARD_NUM_CPUS,
        mmap: bool = False,
        timeout_s: float | None = None,
    ) -> ShardedIndex:
        """Start one actor per saved shard file (shard numbers follow the order of ``paths``)."""
        paths = [Path(p) for p in paths]
        if not paths:
            raise RetroRayError("ShardedIndex.from_paths got no paths; pass the saved shard files")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise RetroRayError(
                f"shard file(s) missing: {', '.join(missing)}; build and save the shards first "
                "or point to the right project directory"
            )
        shards = [start_shard(i, path=p, num_cpus=num_cpus, mmap=mmap) for i, p in enumerate(paths)]
        try:
            return cls(shards, paths, num_cpus=num_cpus, mmap=mmap, timeout_s=timeout_s)
        except BaseException:
            for s in shards:
                ray.kill(s, no_restart=True)
            raise

    # ---------------------------------------------------------------------------------------------
    def _record(self, infos: list[dict]) -> None:
        dims = {i["dim"] for i in infos}
        metrics = {i["metric"] for i in infos}
        if len(dims) != 1 or len(metrics) != 1:
            raise RetroRayError(
                f"shards disagree on dimension {sorted(dims)} / metric {sorted(metrics)}; "
                "build every shard from the same empty trained index"
            )
        self.dim = dims.pop()
        self.metric = metrics.pop()
        self.shard_ntotal = [int(i["ntotal"]) for i in infos]

    def _get_all(self, refs: list, what: str, recover: Callable[[int], Any] | None = None) -> list:
        """Every result, or one clear error; ``recover(i)``, where given, replaces the result of shard ``i``
        whose actor died (not one whose constructor failed) unless it returns None."""
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except GetTimeoutError:
            raise RetroRayError(
                f"shards did not answer within {self.timeout_s}s while {what}; check the actors with "
                "`ray status` / `ray list actors` or raise timeout_s"
            ) from None
        except RayTaskError as e:
            _reraise_user_error(e)
        except RayActorError:
            pass
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=self.timeout_s))
            except RayActorError as e:
                reason = _death_reason(e)
                if getattr(e, "actor_init_failed", False) and "RetroRayError" in str(e):
                    raise RetroRayError(f"index shard {i} could not start: {reason}") from None
                if recover is not None and not getattr(e, "actor_init_failed", False):
                    value = recover(i)
                    if value is not None:
                        out.append(value)
                        continue
                raise RetroRayError(
                    f"index shard {i} died while {what} ({reason}); restart it from its saved file "
                    "(ShardedIndex.from_paths) or rebuild that shard"
                ) from None
        return out

    def refresh(self) -> None:
        """Re-read every shard's vector count and saved path (after adding through the actors)."""
        infos = self._get_all([s.info.remote() for s in self.shards], "reading shard info")
        self.paths = [info["path"] or p for p, info in zip(self.paths, infos)]
        self._record(infos)

    def save(self, paths: Sequence[PathLike]) -> list[str]:
        """Save every shard (atomically) and remember the files for restarts."""
        if len(paths) != len(self.shards):
            raise RetroRayError(f"save got {len(paths)} paths for {len(self.shards)} shards; pass one per shard")
        saved = self._get_all([s.save.remote(str(p)) for s, p in zip(self.shards, paths)], "saving shards")
        self.paths = list(saved)
        self.refresh()
        return self.paths

    def ntotal(self) -> int:
        return int(sum(self.shard_ntotal))

    def add_to_shards(
        self,
        adds: dict[int, tuple[np.ndarray, np.ndarray]],
        expected_ntotal: dict[int, int] | None = None,
    ) -> list[int]:
        """Add ``{shard: (vectors, ids)}`` to the live shard actors, in parallel; returns every shard's count.

        ``expected_ntotal[shard]`` makes that shard's add a compare-and-add (see ``IndexShard.add_with_ids``).
        The saved shard files are not touched: write them first (``add-docs`` does), or a shard
        restarted from its file would come back without the new vectors (and be refused: its count
        would not match).
        """
        expected_ntotal = expected_ntotal or {}
        for i in adds:
            if not 0 <= i < len(self.shards):
                raise RetroRayError(f"add_to_shards got shard {i} but there are {len(self.shards)}; pass 0 .. {len(self.shards) - 1}")
        with self._lock:
            # One call per shard (a count where nothing is added), so a failure names the right shard.
            refs = [s.add_with_ids.remote(adds[i][0], adds[i][1], expected_ntotal.get(i)) if i in adds else s.ntotal.remote()
                    for i, s in enumerate(self.shards)]
            self._get_all(refs, "adding vectors")
        self.refresh()
        return list(self.shard_ntotal)

    def _restart(self, i: int, dead: Any, cause: BaseException) -> Any:
        with self._lock:
            if self.shards[i] is not dead:  # another thread restarted it already
                return self.shards[i]
            return self._restart_locked(i, cause)

    def _restart_locked(self, i: int, cause: BaseException) -> Any:
        path = self.paths[i]
        if path is None or not Path(path).is_file():
            raise RetroRayError(
                f"index shard {i} died during search ({_death_reason(cause)}) and has no saved shard file "
                "to restart from; save the shards (ShardedIndex.save) and start again, or rebuild the index"
            )
        logger.warning("index shard %d died (%s); restarting it from %s", i, _death_reason(cause), path)
        actor, n = self._start_from_file(i, path)
        if n != self.shard_ntotal[i]:
            ray.kill(actor, no_restart=True)
            raise RetroRayError(
                f"index shard {i} died and its saved file {path} holds {n} vectors, not the {self.shard_ntotal[i]} "
                "the shard had; save the shards after adding (ShardedIndex.save) or rebuild the index"
            )
        self.shards[i] = actor
        return actor

    def search(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` over all shards: ``(D float32 [nq, k], I int64 [nq, k])`` with global chunk ids.

        ``nprobe`` / ``ef_search`` apply to this call (each shard sets them before searching).
        """
        q = np.ascontiguousarray(np.asarray(queries), dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise RetroRayError(
                f"queries must be [n, {self.dim}] (the index dimension), got shape {q.shape}; "
                "embed queries with the model the index was built with"
            )
        k = int(k)
        if k < 1:
            raise RetroRayError(f"k must be >= 1, got {k}; ask for at least one neighbour")
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and int(value) < 1:
                raise RetroRayError(f"{name} must be >= 1, got {value}; pass a positive value or None")
        qref = ray.put(q)
        handles = list(self.shards)
        if self._coarse is not None:
            c = self._coarse
            with self._coarse_lock:  # efSearch is set on the one quantizer copy that concurrent searches share
                Dq, Iq = ix.assign_lists(c["quantizer"], q, c["nprobe"] if nprobe is None else nprobe, c["nlist"],
                                         c["ef_search"] if ef_search is None else ef_search)
            dq_ref, iq_ref = ray.put(Dq), ray.put(Iq)

            def call(actor):
                return actor.search_preassigned.remote(qref, k, iq_ref, dq_ref)
        else:
            def call(actor):
                return actor.search.remote(qref, k, nprobe, ef_search)
        refs = [call(s) for s in handles]
        try:
            results = ray.get(refs, timeout=self.timeout_s)
        except GetTimeoutError:
            raise RetroRayError(
                f"index shards did not answer a search within {self.timeout_s}s; check the actors with "
                "`ray list actors` or raise timeout_s"
            ) from None
        except RayTaskError as e:
            _reraise_user_error(e)
        except RayActorError:
            results = []
            for i, ref in enumerate(refs):
                try:
                    results.append(ray.get(ref, timeout=self.timeout_s))
                except RayActorError as e:
                    actor = self._restart(i, handles[i], e)
                    try:
                        results.append(ray.get(call(actor), timeout=self.timeout_s))
                    except (RayActorError, GetTimeoutError):
                        raise RetroRayError(
                            f"index shard {i} died again after a restart from {self.paths[i]}; "
                            "check the node's memory and the shard file, then retry"
                        ) from None
        D, I = ix.merge_topk([r[0] for r in results], [r[1] for r in results], k, metric=self.metric)
        return D, I

    def node_ids(self) -> list[str]:
        """The Ray node each shard actor runs on, in shard order ("lost" for an actor that died)."""
        out = []
        for s in self.shards:
            try:
                out.append(ray.get(s.info.remote(), timeout=self.timeout_s)["node_id"])
            except RayActorError:
                out.append("lost")
        return out

    def shutdown(self) -> None:
        """Kill every shard actor."""
        for s in self.shards:
            try:
                ray.kill(s, no_restart=True)
            except Exception as e:  # noqa: BLE001 - already gone is fine
                logger.debug("shard actor already gone: %s", e)
