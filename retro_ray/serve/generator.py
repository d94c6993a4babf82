"""The RetroGenerator deployment: one Generator (retro_ray/serve/generate.py) per replica, its
Retriever, and the decode loop that batches every request the replica receives.

It owns what needs the model or the tokenizer: a prompt's length in tokens (checked against
max_prompt_tokens here, and only here), whether the model can read given neighbours, batching,
streaming, cancellation, the knowledge update (``add_documents``) and the replica's counters. The
request's shape and ranges were checked by the schemas, the server's other limits by the ingress.

Requests are admitted through @serve.batch; one decode loop per replica, in a worker thread, takes
up to max_batch_size waiting prompts (plain and streamed) each time it is free. Its Retriever
searches the merged index in-process (index=local) or the stage-2 IndexShard actors
(index=sharded, shared by every replica of the application).

A refused request raises ``RequestError`` (errors.py), which reaches the ingress as itself. Each
prompt is checked on its own *before* it joins a batch, so one bad request never fails the others
of its batch. A streamed prompt that fails after its stream began is reported as ``RowFailed``
while the other prompts of the request go on.

Knowledge update: ``add_documents`` runs in the replica that receives it, with that replica's live
Retriever. Every other replica catches up before its next batch through ``Retriever.sync_added()``
(a read of db/added/CURRENT.json when nothing changed; shard actors are compare-and-add, so
replicas sharing them never add a vector twice).
"""

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.serve.config import ServeConfig
from retro_ray.serve.embedder_deployment import EmbedderClient
from retro_ray.serve.errors import FAILED, RequestError
from retro_ray.serve.schemas import INFERENCE_KEYS, RETRO_KEYS

log = logging.getLogger("retro_ray.serve")


# --------------------------------------------------------------------------------------------------
# What crosses to the ingress on a stream
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """The first item of every stream: all its prompts passed their checks and wait for a batch."""

    prompts: int


@dataclass(frozen=True)
class RowEvent:
    """New text of one streamed prompt; on its last event, the whole generation (GenerationOut's JSON)."""

    index: int                  # the prompt's position in its request
    text: str
    finished: bool
    generation: dict | None = None


@dataclass(frozen=True)
class RowFailed:
    """A streamed prompt that failed after its stream began; the request's other prompts go on."""

    index: int
    error: RequestError


# --------------------------------------------------------------------------------------------------
# Inside the replica
# --------------------------------------------------------------------------------------------------


class _NoEventsError(Exception):
    """The Generator refused a batch before its first token (a user error in one of its requests)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class _Row:
    """One prompt in the replica's decode queue, and where its results go."""

    request: Any                          # GenerationRequest
    index: int                            # the prompt's position in its HTTP request
    done: asyncio.Future                  # the Generation, or a RequestError
    events: asyncio.Queue | None = None   # streamed rows: every RowEvent / RowFailed, in order
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, ev) -> None:
        if self.events is not None:
            gen = ev.generation
            self.events.put_nowait(RowEvent(self.index, ev.text, ev.finished,
                                            generation_dict(gen) if gen is not None else None))
        if ev.finished and not self.done.done():
            self.done.set_result(ev.generation)

    def fail(self, err: RequestError) -> None:
        if self.done.done():
            return
        self.done.set_result(err)
        if self.events is not None:
            self.events.put_nowait(RowFailed(self.index, err))


def _neighbor_dict(n) -> dict:
    return {"chunk_id": int(n.chunk_id), "doc_id": int(n.doc_id), "title": n.title, "text": n.text,
            "distance": None if n.distance is None else float(n.distance)}


def generation_dict(g) -> dict:
    """A Generation as the JSON of GenerationOut."""
    return {"prompt": g.prompt, "text": g.text, "tokens": [int(t) for t in g.tokens], "prompt_tokens": int(g.prompt_tokens),
            "finish_reason": g.finish_reason,
            "retrievals": [{"position": int(e.position), "query": e.query, "neighbors": [_neighbor_dict(n) for n in e.neighbors]}
                           for e in g.retrievals]}


@serve.deployment(name="RetroGenerator")
class RetroGenerator:
    """One replica: a Generator, its Retriever, and the one decode loop that serves every request.

    Batching has two layers. ``@serve.batch`` (``_admit``) groups the requests that arrive within
    ``batch_wait_timeout_s`` and hands their rows to the decode loop at once. The decode loop, each
    time it is free, takes up to ``max_batch_size`` of the rows waiting, plain and streamed alike.
    (@serve.batch alone forms a batch as soon as its wait ends, also while the previous batch still
    decodes, so under load it would decode many small batches one after another; benchmarks/README.md
    has the batch sizes measured with and without the merging.)
    """

    async def __init__(self, checkpoint: str, project_dir: str | None, cfg: dict, embedder=None) -> None:
        self.cfg: ServeConfig = C.build(ServeConfig, cfg)
        self.checkpoint = checkpoint
        self.project_dir = project_dir
        self.embedder_handle = embedder
        described = await embedder.describe.remote() if embedder is not None else None
        self.gen = await asyncio.to_thread(self._load, described)
        self.name = self.cfg.model_name or self.gen.name
        self._docs_lock = asyncio.Lock()
        self._pending: deque[_Row] = deque()
        self._wakeup = asyncio.Event()
        self.stats: dict[str, Any] = {"requests": 0, "batches": 0, "largest_batch": 0, "generated_tokens": 0,
                                      "decode_seconds": 0.0, "batch_sizes": {}, "active_rows": 0, "finish_reasons": {},
                                      "documents_added": 0}
        self._admit.set_max_batch_size(self.cfg.max_batch_size)
        self._admit.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())

    def _load(self, described: dict | None):
        import torch

        from retro_ray.serve.generate import Generator

        gen = Generator.load(self.checkpoint, self.project_dir, index="none", device=self.cfg.device,
                             name=self.cfg.model_name)
        if self.cfg.index != "none" and self.project_dir is not None and gen.model.config.retro.enabled:
            retriever = self._make_retriever(described)
            if retriever.db.chunk_length != gen.m:
                raise RetroRayError(f"the model reads chunks of {gen.m} tokens but {self.project_dir} holds chunks of "
                                    f"{retriever.db.chunk_length}; serve the model with the project it was trained on.")
            gen.retriever = retriever
        log.info("generator %s loaded on %s (torch threads %d, retrieval %s)", gen.name, gen.device,
                 torch.get_num_threads(), self.cfg.index if gen.retriever is not None else "off")
        return gen

    def _make_retriever(self, described: dict):
        from retro_ray.project import Project
        from retro_ray.retrieval.retriever import Retriever

        project = Project(self.project_dir)
        client = EmbedderClient(self.embedder_handle, described)
        if self.cfg.index == "local":
            return Retriever.local(project, embedder=client)
        from retro_ray.retrieval.shards import ShardedIndex, start_shard

        project.require("index-add", "serve")
        paths = project.shard_paths()
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise RetroRayError(f"shard file(s) missing: {', '.join(missing)}; rerun `retro-ray index` on {project.root}")
        # Named actors, so every replica of this application searches (and adds documents to) the same
        # shards; a replica that finds them gone restarts its own from the saved files (ShardedIndex).
        shards = [start_shard(i, path=p, name=f"retro-ray-{self.cfg.app_name}-shard-{i}", get_if_exists=True)
                  for i, p in enumerate(paths)]
        return Retriever(project, ShardedIndex(shards, paths), embedder=client)

    # ---- checks made before a request reaches the decode loop -------------------------------------

    def _prepare(self, spec: dict):
        from retro_ray.serve.generate import GenerationRequest, InferenceConfig, RetroInferenceSettings

        inf = {k: spec[k] for k in INFERENCE_KEYS if spec.get(k) is not None}
        if "end_strings" in inf:
            inf["end_strings"] = tuple(inf["end_strings"])
        retro = {k: spec[k] for k in RETRO_KEYS if spec.get(k) is not None}
        # The settings' ranges were checked by the request schema; the configs check them again on
        # construction, and a refusal there is a 400 for this prompt alone.
        try:
            inference = InferenceConfig(**inf, retro_inference=RetroInferenceSettings(**retro))
        except RetroRayError as e:
            raise RequestError(str(e)) from None
        n = self.gen.count_tokens(spec["prompt"])
        if n > self.cfg.max_prompt_tokens:
            raise RequestError(f"the prompt is {n} tokens, over this server's limit of {self.cfg.max_prompt_tokens}; "
                               "shorten it", code="context_length_exceeded", param="prompt")
        if n == 0 and not inference.add_BOS:
            raise RequestError("the prompt has no tokens; give some text, or set add_BOS=true", param="prompt")
        neighbors = spec.get("neighbors")
        if neighbors is not None and not self.gen.model.config.retro.enabled:
            raise RequestError(f"{self.name} is a GPT model (no retrieval): it cannot read neighbors; leave them out",
                               param="neighbors")
        return GenerationRequest(spec["prompt"], list(neighbors) if neighbors is not None else None, inference)

    def _rows(self, specs: list[dict], events: asyncio.Queue | None = None) -> list[_Row]:
        rows = []
        for i, spec in enumerate(specs):
            try:
                rows.append(_Row(self._prepare(spec), i, asyncio.get_running_loop().create_future(), events))
            except RequestError as e:
                if len(specs) > 1:
                    raise e.for_prompt(i) from None
                raise
        self.stats["requests"] += len(rows)
        return rows

    # ---- the decode loop ----------------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _admit(self, rows: list[_Row]) -> list[None]:
        """Hand the rows that arrived together to the decode loop (returns at once)."""
        self._pending.extend(rows)
        self._wakeup.set()
        return [None] * len(rows)

    async def _decode_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                rows: list[_Row] = []
                while self._pending and len(rows) < self.cfg.max_batch_size:
                    row = self._pending.popleft()
                    if not row.cancel.is_set():  # its client left while it waited
                        rows.append(row)
                    else:
                        row.fail(RequestError("cancelled before it started", 499))
                if rows:
                    try:
                        await self._decode(rows)
                    except Exception:  # noqa: BLE001 -- a bug; the loop must live on for the next requests
                        log.exception("decode loop failed")
                        for r in rows:
                            r.fail(RequestError(FAILED, 500))

    async def _decode(self, rows: list[_Row]) -> None:
        """Decode ``rows`` as one batch; a user error of one row (found before any token) fails only that row."""
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        sizes = self.stats["batch_sizes"]
        sizes[len(rows)] = sizes.get(len(rows), 0) + 1
        self.stats["active_rows"] += len(rows)
        t0 = time.perf_counter()
        try:
            if self.gen.retriever is not None:  # documents another replica added since the last batch
                await asyncio.to_thread(self.gen.retriever.sync_added)
            try:
                await self._run_stream(rows)
            except _NoEventsError as e:
                if len(rows) == 1:
                    rows[0].fail(RequestError(str(e.cause)))
                else:
                    for r in rows:
                        try:
                            await self._run_stream([r])
                        except _NoEventsError as e1:
                            r.fail(RequestError(str(e1.cause)))
        finally:
            self.stats["decode_seconds"] += time.perf_counter() - t0
            self.stats["active_rows"] -= len(rows)
            for r in rows:  # whatever happened, nobody waits forever
                r.fail(RequestError("generation ended without a result", 500))

    async def _run_stream(self, rows: list[_Row]) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        requests = [r.request for r in rows]

        def decode() -> None:  # in a worker thread: the event loop stays free for requests and /health
            try:
                for step in self.gen.stream(requests, is_cancelled=lambda i: rows[i].cancel.is_set()):
                    loop.call_soon_threadsafe(queue.put_nowait, ("step", step))
            except BaseException as e:  # noqa: BLE001 -- handed to the loop below
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

        worker = asyncio.ensure_future(asyncio.to_thread(decode))
        any_event = False
        try:
            while True:
                kind, item = await queue.get()
                if kind == "end":
                    break
                if kind == "error":
                    if isinstance(item, RetroRayError) and not any_event:
                        raise _NoEventsError(item)
                    if not isinstance(item, RetroRayError):
                        log.error("decode failed", exc_info=item)
                    for r in rows:
                        r.fail(RequestError(str(item) if isinstance(item, RetroRayError) else FAILED, 500))
                    continue
                any_event = True
                for ev in item:
                    row = rows[ev.index]
                    row.emit(ev)
                    if ev.finished and ev.generation is not None:
                        self._record(ev.generation)
        finally:
            if not worker.done():  # leaving early (the replica shuts down): stop the thread first
                for r in rows:
                    r.cancel.set()
            await worker

    def _record(self, g) -> None:
        self.stats["generated_tokens"] += len(g.tokens)
        reasons = self.stats["finish_reasons"]
        reasons[g.finish_reason] = reasons.get(g.finish_reason, 0) + 1

    # ---- entry points ------------------------------------------------------------------------------

    async def generate(self, specs: list[dict]) -> dict:
        """GenerateResponse's JSON: {"model", "generations": [GenerationOut]}; a refused prompt raises RequestError."""
        rows = self._rows(specs)
        try:
            await asyncio.gather(*[self._admit(r) for r in rows])
            results = [await r.done for r in rows]
        except asyncio.CancelledError:  # the client went away: its rows stop decoding
            for r in rows:
                r.cancel.set()
            raise
        for r in results:
            if isinstance(r, RequestError):
                raise r
        return {"model": self.name, "generations": [generation_dict(g) for g in results]}

    async def stream(self, specs: list[dict]) -> AsyncIterator[Accepted | RowEvent | RowFailed]:
        """First ``Accepted`` (a refused prompt raises RequestError instead), then every prompt's
        RowEvents in order, each prompt ending with a finished RowEvent or a RowFailed."""
        events: asyncio.Queue = asyncio.Queue()
        rows = self._rows(specs, events)
        yield Accepted(len(rows))
        try:
            await asyncio.gather(*[self._admit(r) for r in rows])
            remaining = len(rows)
            while remaining:
                ev = await events.get()
                if isinstance(ev, RowFailed) or ev.finished:
                    remaining -= 1
                yield ev
        finally:  # the client disconnected (or the stream ended): free the rows still decoding
            for r in rows:
                r.cancel.set()

    # ---- documents and status ---------------------------------------------------------------------

    async def add_documents(self, records: list[dict]) -> dict:
        """Add documents to the retrieval database and to this replica's live index."""
        if self.gen.retriever is None:
            why = "index=none" if self.cfg.index == "none" else "the model does not retrieve (GPT) or no project was given"
            raise RequestError(f"this server has no retrieval database to add to ({why})", 409, "no_retrieval")
        try:
            from retro_ray.stages.add_docs import add_documents
        except ImportError:
            raise RequestError("adding documents is not available in this version of retro-ray "
                               "(retro_ray.stages.add_docs is missing)", 501, "not_implemented") from None
        async with self._docs_lock:
            try:
                report = await asyncio.to_thread(add_documents, self.gen.retriever.project, records,
                                                 retriever=self.gen.retriever, progress=False)
            except RetroRayError as e:
                raise RequestError(str(e), 400) from None
        added = int(report.counts.get("docs_added", 0))
        self.stats["documents_added"] += added
        return {"added": added, "report": report.to_dict()}

    async def info(self) -> dict:
        import torch

        retriever = self.gen.retriever
        return {"model": self.name, "device": str(self.gen.device), "torch_threads": torch.get_num_threads(),
                "retrieval": self.cfg.index if retriever is not None else "off",
                "database_chunks": len(retriever.db) if retriever is not None else 0,
                "replica": serve.get_replica_context().replica_id.unique_id,
                "pending_rows": len(self._pending), **self.stats}

