"""Retriever: text or GPT-token chunks → embeddings → neighbour chunk ids → neighbour tokens.

The one retrieval path of the project: ``query`` (pretraining neighbours), ``search`` (the CLI) and
serving all go through it. It searches either the sharded index (``IndexShard`` actors, for a
cluster) or the merged ``added.faissindex`` in this process (for a laptop or a one-off search);
both give the same results.

Documents added after training (``retro-ray add-docs``, :mod:`retro_ray.stages.add_docs`) are found
too. add-docs commits the chunk database before the index files, and a retriever opens its index
before its chunk database, so every id a search returns resolves. A live retriever picks up later
adds with :meth:`Retriever.sync_added` (``add_documents(..., retriever=r)`` calls it): the chunk
database first, then the new vectors into the searcher it holds, without reloading anything.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from retro_ray.errors import RetroRayError
from retro_ray.project import Project
from retro_ray.retrieval.chunks import ChunkDatabase


class LocalIndex:
    """The merged index in this process, with the same ``search`` signature as ``ShardedIndex``.

    A lock serialises searches with ``add_with_ids`` (Faiss does not allow an add during a search).
    """

    def __init__(self, path) -> None:
        from retro_ray.retrieval.index import get_search_params, load_index

        self.index = load_index(path)
        self._defaults = get_search_params(self.index)
        self.dim = int(self.index.d)
        self._lock = threading.Lock()

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None):
        from retro_ray.retrieval.index import merge_topk, metric_name, search

        d_nprobe, d_ef = self._defaults
        with self._lock:
            D, I = search(self.index, queries, k, nprobe=nprobe if nprobe is not None else d_nprobe,
                          ef_search=ef_search if ef_search is not None else d_ef)
        return merge_topk([D], [I], k, metric=metric_name(self.index))  # equal distances ordered by id, as sharded

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray, expected_ntotal: int | None = None) -> int:
        """Add vectors under ``ids``; with ``expected_ntotal``, only if the index holds exactly that many
        (else nothing is added). Returns the vector count afterwards."""
        from retro_ray.retrieval.shards import add_ids

        with self._lock:
            if expected_ntotal is None or int(self.index.ntotal) == int(expected_ntotal):
                self.index = add_ids(self.index, vectors, ids)
            return int(self.index.ntotal)


@dataclass
class Neighbors:
    ids: np.ndarray        # int64 [n, k]; -1 = none
    distances: np.ndarray  # float32 [n, k]


class Retriever:
    def __init__(self, project: Project, searcher, embedder=None, nprobe: int | None = None,
                 ef_search: int | None = None, device: str = "auto", batch_size: int | None = None) -> None:
        self.project = project
        self.searcher = searcher
        cfg = project.read_config()
        self.nprobe = cfg.query.nprobe if nprobe is None else nprobe
        self.ef_search = cfg.query.ef_search if ef_search is None else ef_search
        if embedder is None:
            from retro_ray.embedder import Embedder, EmbedderConfig

            precision = str(project.derived().get("embed_precision", "auto")).split(",")[0]
            if precision not in ("fp32", "bf16", "fp16"):
                precision = "auto"
            embedder = Embedder(EmbedderConfig(model_dir=cfg.embedder.model_dir,
                                               max_chunk_length=cfg.embedder.max_chunk_length,
                                               precision=precision, device=device,
                                               batch_size=batch_size or cfg.embedder.batch_size))
        self.embedder = embedder
        if getattr(searcher, "dim", embedder.dim) != embedder.dim:
            raise RetroRayError(
                f"the embedder gives {embedder.dim}-d vectors but the index holds {searcher.dim}-d ones; "
                "embed with the model the index was built with (embedder.model_dir in config.json)."
            )
        # After the searcher: an add committed in between is then in the database, never only in the index.
        self.db = ChunkDatabase(project, "train")
        self._sync_lock = threading.Lock()
        self._synced_version = -1

    @classmethod
    def local(cls, project: Project, **kw) -> Retriever:
        project.require("index-add", "search")
        return cls(project, LocalIndex(project.added_index_path), **kw)

    @classmethod
    def sharded(cls, project: Project, **kw) -> Retriever:
        from retro_ray.retrieval.shards import ShardedIndex

        project.require("index-add", "search")
        return cls(project, ShardedIndex.from_paths(project.shard_paths()), **kw)

    def sync_added(self) -> int:
        """Bring this retriever up to the last committed ``add-docs``; returns the vectors it added.

        The chunk database loads the new commit first, then the searcher gets the vectors it lacks
        (read from the added store, not re-embedded): into the in-process index, or into each shard
        actor (compare-and-add, so clients sharing the actors never add twice). Searches may run
        meanwhile. Cheap when nothing was added since the last call.
        """
        with self._sync_lock:
            self.db.refresh()
            added = self.db.added
            if added is None or added.version == self._synced_version:
                return 0
            if hasattr(self.searcher, "add_to_shards"):
                n = self._sync_shards(added)
            elif hasattr(self.searcher, "add_with_ids") and hasattr(self.searcher, "ntotal"):
                n = self._sync_local(added)
            else:
                raise RetroRayError(
                    f"cannot add documents to a live {type(self.searcher).__name__}; use a LocalIndex or a "
                    "ShardedIndex searcher, or build a new Retriever after add-docs"
                )
            self._synced_version = added.version
            return n

    def _sync_local(self, added) -> int:
        n_base, n_added = self.db.n_train, len(added)
        have = self.searcher.ntotal - n_base
        if have > n_added:
            raise RetroRayError(
                f"the index holds {have} added vectors but the added-documents store only {n_added} chunks; "
                "the store was removed or replaced: rebuild the index (`retro-ray index-add`) or restore db/added"
            )
        if have == n_added:
            return 0
        ids = np.arange(n_base + have, n_base + n_added, dtype=np.int64)
        self.searcher.add_with_ids(added.embeddings(have, n_added), ids, expected_ntotal=n_base + have)
        return len(ids)

    def _sync_shards(self, added) -> int:
        from retro_ray.retrieval.shards import added_chunk_ids, shard_ranges

        sharded = self.searcher
        num_shards = len(sharded.shards)
        n_base, n_added = self.db.n_train, len(added)
        project_shards = int(self.project.derived().get("index_num_shards") or num_shards)
        if num_shards != project_shards:
            raise RetroRayError(
                f"this ShardedIndex has {num_shards} shards but the project's index has {project_shards}; "
                "start it from the project's shard files (Retriever.sharded) to add documents to it"
            )
        base = [hi - lo for lo, hi in shard_ranges(n_base, num_shards)]
        total = 0
        for _ in range(3):  # a concurrent client may win a compare-and-add: re-read and go again
            sharded.refresh()
            adds, expected = {}, {}
            for i in range(num_shards):
                have = sharded.shard_ntotal[i] - base[i]
                ids = added_chunk_ids(i, num_shards, n_base, n_added, start=max(have, 0))
                if have > len(added_chunk_ids(i, num_shards, n_base, n_added)) or have < 0:
                    raise RetroRayError(
                        f"index shard {i} holds {sharded.shard_ntotal[i]} vectors, which no commit of the "
                        "added-documents store explains; rebuild the index (`retro-ray index-add`) or restore db/added"
                    )
                if len(ids):
                    local = ids - n_base
                    block = added.embeddings(int(local[0]), int(local[-1]) + 1)
                    adds[i] = (block[local - local[0]], ids)
                    expected[i] = sharded.shard_ntotal[i]
            if not adds:
                return total
            counts = sharded.add_to_shards(adds, expected)
            total += sum(len(adds[i][1]) for i in adds if counts[i] == expected[i] + len(adds[i][1]))
        raise RetroRayError(
            "the shard actors kept changing while adding documents to them; retry Retriever.sync_added()"
        )

    def search_embeddings(self, vectors: np.ndarray, k: int) -> Neighbors:
        import time

        from retro_ray.metrics import stage_metrics

        t0 = time.perf_counter()
        D, I = self.searcher.search(vectors, k, nprobe=self.nprobe, ef_search=self.ef_search)
        stage_metrics("query").index_search_seconds(time.perf_counter() - t0)
        return Neighbors(ids=np.asarray(I, dtype=np.int64), distances=np.asarray(D, dtype=np.float32))

    def search_texts(self, texts: list[str], k: int) -> Neighbors:
        return self.search_embeddings(self.embedder.embed(texts), k)

    def search_token_chunks(self, chunks: list[list[int]] | np.ndarray, k: int) -> Neighbors:
        """GPT-token chunks (e.g. the chunks of a sample, or of a generation) → neighbours."""
        texts = self.db.tokenizer.decode_batch([list(map(int, c)) for c in chunks], skip_special_tokens=True)
        return self.search_texts(texts, k)

    def neighbor_tokens(self, ids: np.ndarray) -> np.ndarray:
        """int64 [..., 2 × chunk_length]: each neighbour chunk + its same-document continuation."""
        return self.db.neighbor_tokens(ids)
