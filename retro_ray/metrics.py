"""retro-ray's own metrics, exported through Ray's metrics agent (``ray.util.metrics``).

One table, :data:`METRICS`, defines every metric: its name, kind, description, tag keys and (for a
histogram) bucket boundaries. This module creates the Ray metric objects from that table, and the
Grafana dashboard under ``dashboards/`` queries the names it exports (a test checks both sides).

Every stage uses one small API::

    from retro_ray.metrics import stage_metrics

    m = stage_metrics("embed")
    with m.timed():                    # retro_ray_stage_duration_seconds{stage="embed", step="block"}
        ...
    m.chunks(len(batch))               # retro_ray_stage_chunks_total{stage="embed"}
    m.chunks_per_second(rate)          # retro_ray_embed_chunks_per_second

Calls are no-ops while Ray is not initialised in the calling process (unit tests, a stage run with
``ray.init`` not yet called), and never raise because of Ray: a failure to record is logged once
and otherwise ignored. Ray metric objects are created once per process, on first use.

Prometheus names. Ray's exporter prepends ``ray_`` to an application metric's name, and a counter's
series carries a ``_total`` suffix (added when the name does not already end with it); a histogram
exports ``_bucket``, ``_sum`` and ``_count`` series. So ``retro_ray_stage_rows_total`` is scraped
as ``ray_retro_ray_stage_rows_total`` and ``retro_ray_index_add_seconds`` as
``ray_retro_ray_index_add_seconds_bucket`` / ``_sum`` / ``_count`` (checked against a real scrape
of Ray 2.60 by tests/integration/test_jobs.py). :attr:`MetricSpec.exported_series` gives them.
Ray also adds labels of its own to every series: ``SessionName``, ``NodeAddress``, ``WorkerId``,
``Component``, ``Version``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: What Ray's Prometheus exporter puts in front of every application metric name.
EXPORT_PREFIX = "ray_"

#: The values of the ``stage`` tag; the dashboard has one row per entry.
STAGES = ("prep", "db", "embed", "index", "query", "train", "serve")

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the table: what ``ray.util.metrics`` is given, and what Prometheus sees."""

    name: str
    kind: str  # COUNTER | GAUGE | HISTOGRAM
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()  # histogram bucket upper bounds

    @property
    def exported_name(self) -> str:
        """The metric family name in Prometheus."""
        name = EXPORT_PREFIX + self.name
        if self.kind == COUNTER and not name.endswith("_total"):
            name += "_total"
        return name

    @property
    def exported_series(self) -> tuple[str, ...]:
        """Every series name a PromQL query may use for this metric."""
        if self.kind == HISTOGRAM:
            return tuple(self.exported_name + s for s in ("_bucket", "_sum", "_count"))
        return (self.exported_name,)


# Bucket boundaries, in seconds
_BLOCK_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
_CALL_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_REQUEST_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)

# Names (use these constants, not string literals, at call sites)
STAGE_ROWS = "retro_ray_stage_rows_total"
STAGE_CHUNKS = "retro_ray_stage_chunks_total"
STAGE_DURATION = "retro_ray_stage_duration_seconds"
EMBED_CHUNKS_PER_SECOND = "retro_ray_embed_chunks_per_second"
INDEX_ADD_SECONDS = "retro_ray_index_add_seconds"
INDEX_SEARCH_SECONDS = "retro_ray_index_search_seconds"
QUERY_NEIGHBORS = "retro_ray_query_neighbors_total"
TRAIN_LOSS = "retro_ray_train_loss"
TRAIN_TOKENS_PER_SECOND = "retro_ray_train_tokens_per_second"
TRAIN_MFU = "retro_ray_train_mfu"
GENERATE_TOKENS_PER_SECOND = "retro_ray_generate_tokens_per_second"
GENERATE_LATENCY = "retro_ray_generate_latency_seconds"
SERVE_RETRIEVAL_LATENCY = "retro_ray_serve_retrieval_latency_seconds"

#: The contract with the dashboards: every metric retro-ray exports, by the name given to Ray.
METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        MetricSpec(STAGE_ROWS, COUNTER,
                   "Rows a stage has finished: documents (prep, db), chunks embedded (embed), vectors added "
                   "(index), samples (query).", ("stage",)),
        MetricSpec(STAGE_CHUNKS, COUNTER, "Retrieval chunks a stage has produced or processed.", ("stage",)),
        MetricSpec(STAGE_DURATION, HISTOGRAM,
                   "Wall-clock seconds of one unit of a stage's work: step=block for a block task or an actor "
                   "batch, step=run for a whole run of the stage; index has step=train (index-train); train has "
                   "step=step (one optimizer step, mean over a logging window), step=validate and step=checkpoint.",
                   ("stage", "step"), _BLOCK_SECONDS),
        MetricSpec(EMBED_CHUNKS_PER_SECOND, GAUGE, "Chunks per second of one embedder actor, over its last batch."),
        MetricSpec(INDEX_ADD_SECONDS, HISTOGRAM, "Seconds of one Faiss add call (one batch of vectors, one shard).",
                   (), _CALL_SECONDS),
        MetricSpec(INDEX_SEARCH_SECONDS, HISTOGRAM,
                   "Seconds of one Faiss search call (one batch of queries, one shard or the merged index).",
                   (), _CALL_SECONDS),
        MetricSpec(QUERY_NEIGHBORS, COUNTER, "Neighbour chunk ids found for pretraining samples (excluding -1 = none)."),
        MetricSpec(TRAIN_LOSS, GAUGE, "Language-model loss (nats/token) of the last step (split=train) or evaluation "
                   "(split=valid).", ("split",)),
        MetricSpec(TRAIN_TOKENS_PER_SECOND, GAUGE, "Training throughput of this worker, tokens per second."),
        MetricSpec(TRAIN_MFU, GAUGE, "Model FLOPs utilisation of this worker, 0..1."),
        MetricSpec(GENERATE_TOKENS_PER_SECOND, GAUGE, "Generated tokens per second of the last request."),
        MetricSpec(GENERATE_LATENCY, HISTOGRAM, "Seconds from a generation request's arrival to its last token.",
                   (), _REQUEST_SECONDS),
        MetricSpec(SERVE_RETRIEVAL_LATENCY, HISTOGRAM,
                   "Seconds of one retrieval at serve time (embed the chunk, search, fetch neighbour tokens).",
                   (), _CALL_SECONDS),
    )
}


def exported_series() -> set[str]:
    """Every Prometheus series name that retro-ray's metrics export (what a dashboard may query)."""
    return {name for spec in METRICS.values() for name in spec.exported_series}


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------

_lock = threading.Lock()
_objects: dict[str, Any] = {}  # name → ray.util.metrics object, created once per process
_failed: set[str] = set()  # names whose recording failed once (logged once, then silent)


def ray_active() -> bool:
    """Whether this process is connected to Ray (a driver after ``ray.init``, or a Ray worker).

    Does not import Ray: when nothing has imported it, Ray cannot be initialised.
    """
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized())
    except Exception:  # pragma: no cover - a half-imported ray
        return False


def _create(spec: MetricSpec) -> Any:
    from ray.util import metrics as rm

    if spec.kind == COUNTER:
        return rm.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
    if spec.kind == GAUGE:
        return rm.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
    return rm.Histogram(spec.name, description=spec.description, boundaries=list(spec.boundaries),
                        tag_keys=spec.tag_keys)


def _metric(spec: MetricSpec) -> Any:
    obj = _objects.get(spec.name)
    if obj is None:
        with _lock:
            obj = _objects.get(spec.name)
            if obj is None:
                obj = _objects[spec.name] = _create(spec)
    return obj


def record(name: str, value: float, **tags: str) -> None:
    """Record ``value`` on the metric ``name`` of :data:`METRICS`.

    A counter is incremented by ``value`` (values <= 0 are ignored), a gauge is set to it, a
    histogram observes it. ``tags`` must give every tag key of the metric. An unknown name is a
    programming error and raises ``KeyError`` even without Ray; anything that goes wrong inside Ray
    is logged once per metric and otherwise ignored.
    """
    spec = METRICS.get(name)
    if spec is None:
        raise KeyError(f"{name!r} is not a retro-ray metric; known: {', '.join(sorted(METRICS))}")
    if not ray_active():
        return
    try:
        value = float(value)  # numpy scalars too (Ray accepts only int and float)
        if spec.kind == COUNTER and not value > 0:
            return
        metric = _metric(spec)
        str_tags = {k: str(v) for k, v in tags.items()} or None
        if spec.kind == COUNTER:
            metric.inc(value, tags=str_tags)
        elif spec.kind == GAUGE:
            metric.set(value, tags=str_tags)
        else:
            metric.observe(value, tags=str_tags)
    except Exception as e:  # metrics must never break a stage
        if name not in _failed:
            _failed.add(name)
            log.warning("could not record metric %s: %s (further failures of it are not logged)", name, e)


class StageMetrics:
    """The metrics API of one stage; get it with :func:`stage_metrics`.

    Holds only the stage name, so it is cheap to pass into Ray tasks and actors (it pickles as a call
    to :func:`stage_metrics`); the Ray metric objects live in each process's own cache.
    """

    __slots__ = ("stage",)

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __reduce__(self):
        return stage_metrics, (self.stage,)

    def __repr__(self) -> str:
        return f"StageMetrics({self.stage!r})"

    # -- every stage -------------------------------------------------------------------------
    def rows(self, n: int) -> None:
        """``n`` more rows done (documents, chunks, vectors or samples: see the metric's description)."""
        record(STAGE_ROWS, n, stage=self.stage)

    def chunks(self, n: int) -> None:
        """``n`` more retrieval chunks produced or processed."""
        record(STAGE_CHUNKS, n, stage=self.stage)

    def seconds(self, s: float, step: str = "block") -> None:
        """One unit of work took ``s`` seconds; ``step="run"`` for a whole run of the stage."""
        record(STAGE_DURATION, s, stage=self.stage, step=step)

    @contextmanager
    def timed(self, name: str = STAGE_DURATION, step: str = "block") -> Iterator[None]:
        """Time the ``with`` body and record it: by default as one block of this stage, or on a
        histogram of the table given by ``name`` (e.g. ``INDEX_ADD_SECONDS``). Recorded on errors too."""
        spec = METRICS[name]
        if spec.kind != HISTOGRAM:
            raise ValueError(f"{name} is a {spec.kind}, not a histogram of seconds")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            if name == STAGE_DURATION:
                self.seconds(dt, step=step)
            else:
                record(name, dt)

    # -- embed ---------------------------------------------------------------------------------
    def chunks_per_second(self, rate: float) -> None:
        """Embedding throughput of this actor (``retro_ray_embed_chunks_per_second``)."""
        record(EMBED_CHUNKS_PER_SECOND, rate)

    # -- index / retrieval ---------------------------------------------------------------------
    def index_add_seconds(self, s: float) -> None:
        record(INDEX_ADD_SECONDS, s)

    def index_search_seconds(self, s: float) -> None:
        record(INDEX_SEARCH_SECONDS, s)

    # -- query ---------------------------------------------------------------------------------
    def neighbors(self, n: int) -> None:
        """``n`` more neighbour ids found (count the ids that are not -1)."""
        record(QUERY_NEIGHBORS, n)

    # -- train ---------------------------------------------------------------------------------
    def train_loss(self, loss: float, split: str = "train") -> None:
        record(TRAIN_LOSS, loss, split=split)

    def train_tokens_per_second(self, rate: float) -> None:
        record(TRAIN_TOKENS_PER_SECOND, rate)

    def train_mfu(self, mfu: float) -> None:
        record(TRAIN_MFU, mfu)

    # -- serve ---------------------------------------------------------------------------------
    def generate_tokens_per_second(self, rate: float) -> None:
        record(GENERATE_TOKENS_PER_SECOND, rate)

    def generate_latency_seconds(self, s: float) -> None:
        record(GENERATE_LATENCY, s)

    def serve_retrieval_latency_seconds(self, s: float) -> None:
        record(SERVE_RETRIEVAL_LATENCY, s)


_stage_cache: dict[str, StageMetrics] = {}


def stage_metrics(stage: str) -> StageMetrics:
    """The metrics of ``stage`` (one of :data:`STAGES`); the same object for every call in a process."""
    m = _stage_cache.get(stage)
    if m is None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} for metrics; one of {', '.join(STAGES)}")
        m = _stage_cache.setdefault(stage, StageMetrics(stage))
    return m
