"""Retriever: text or GPT-token chunks → embeddings → neighbour chunk ids → neighbour tokens.

The one retrieval path of the project: ``query`` (pretraining neighbours), ``search`` (the CLI) and
serving all go through it. It searches either the sharded index (``IndexShard`` actors, for a
cluster) or the merged ``added.faissindex`` in this process (for a laptop or a one-off search);
both give the same results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retro_ray.errors import RetroRayError
from retro_ray.project import Project
from retro_ray.retrieval.chunks import ChunkDatabase


class LocalIndex:
    """The merged index in this process, with the same ``search`` signature as ``ShardedIndex``."""

    def __init__(self, path) -> None:
        from retro_ray.retrieval.index import get_search_params, load_index

        self.index = load_index(path)
        self._defaults = get_search_params(self.index)
        self.dim = int(self.index.d)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None):
        from retro_ray.retrieval.index import search

        d_nprobe, d_ef = self._defaults
        return search(self.index, queries, k, nprobe=nprobe if nprobe is not None else d_nprobe,
                      ef_search=ef_search if ef_search is not None else d_ef)


@dataclass
class Neighbors:
    ids: np.ndarray        # int64 [n, k]; -1 = none
    distances: np.ndarray  # float32 [n, k]


class Retriever:
    def __init__(self, project: Project, searcher, embedder=None, nprobe: int | None = None,
                 ef_search: int | None = None, device: str = "auto", batch_size: int = 64) -> None:
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
                                               precision=precision, device=device, batch_size=batch_size))
        self.embedder = embedder
        if getattr(searcher, "dim", embedder.dim) != embedder.dim:
            raise RetroRayError(
                f"the embedder gives {embedder.dim}-d vectors but the index holds {searcher.dim}-d ones; "
                "embed with the model the index was built with (embedder.model_dir in config.json)."
            )
        self.db = ChunkDatabase(project, "train")

    @classmethod
    def local(cls, project: Project, **kw) -> Retriever:
        from retro_ray.prep.index import index_paths

        project.require("index-add", "search")
        return cls(project, LocalIndex(index_paths(project)["added"]), **kw)

    @classmethod
    def sharded(cls, project: Project, **kw) -> Retriever:
        from retro_ray.prep.index import shard_paths
        from retro_ray.retrieval.shards import ShardedIndex

        project.require("index-add", "search")
        return cls(project, ShardedIndex.from_paths(shard_paths(project)), **kw)

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
