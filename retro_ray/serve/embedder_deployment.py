"""The RetroEmbedder deployment (the retriever's BERT chunk encoder, batched across generator
replicas) and EmbedderClient, the ``embedder`` a generator replica's Retriever calls it through.

Named ``embedder_deployment`` rather than ``embedder``: ``retro_ray/embedder.py`` is the encoder
itself (``Embedder``), which this deployment loads; ``retro_ray.serve.embedder`` beside it would
read as a second implementation of the same thing.
"""

import asyncio

from ray import serve


class EmbedderClient:
    """The ``embedder`` a Retriever needs (``.dim``, ``.embed(texts)``), backed by the RetroEmbedder deployment.

    ``embed`` blocks, so call it off the event loop (the decode thread does).
    """

    def __init__(self, handle, described: dict) -> None:
        self.handle = handle
        self.dim = int(described["dim"])
        self.model_dir = described["model_dir"]      # add_documents checks these against the project's
        self.max_length = int(described["max_length"])

    def embed(self, texts):
        import numpy as np

        return np.asarray(self.handle.embed.remote(list(texts)).result(), dtype=np.float32)


@serve.deployment(name="RetroEmbedder")
class RetroEmbedder:
    """The retriever's BERT encoder, as configured in the project's config.json; batches calls from every replica."""

    def __init__(self, project_dir: str, device: str = "auto") -> None:
        from retro_ray.embedder import Embedder, EmbedderConfig
        from retro_ray.project import Project

        project = Project(project_dir)
        cfg = project.read_config()
        precision = str(project.derived().get("embed_precision", "auto")).split(",")[0]
        if precision not in ("fp32", "bf16", "fp16"):
            precision = "auto"
        self.embedder = Embedder(EmbedderConfig(model_dir=cfg.embedder.model_dir, max_chunk_length=cfg.embedder.max_chunk_length,
                                                precision=precision, device=device))

    async def describe(self) -> dict:
        e = self.embedder
        return {"dim": int(e.dim), "model_dir": str(e.model_dir), "max_length": int(e.max_length)}

    async def embed(self, texts: list[str]):
        return await self._embed_batch(texts)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _embed_batch(self, batches: list[list[str]]):
        flat = [t for b in batches for t in b]
        vectors = await asyncio.to_thread(self.embedder.embed, flat)
        out, start = [], 0
        for b in batches:
            out.append(vectors[start:start + len(b)])
            start += len(b)
        return out

