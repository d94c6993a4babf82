"""retro_ray.metrics without Ray: the table, the exported names, and no-op calls.

A real export through Ray's metrics agent is checked in tests/integration/test_jobs.py.
"""

from __future__ import annotations

import pickle
import sys

import pytest

from retro_ray import metrics as M


def test_table_names_and_kinds():
    assert len(M.METRICS) == 13
    for name, spec in M.METRICS.items():
        assert name == spec.name and name.startswith("retro_ray_")
        assert spec.kind in (M.COUNTER, M.GAUGE, M.HISTOGRAM)
        if spec.kind == M.HISTOGRAM:
            assert spec.boundaries and list(spec.boundaries) == sorted(spec.boundaries) and spec.boundaries[0] > 0
        else:
            assert not spec.boundaries
    assert M.METRICS[M.STAGE_ROWS].tag_keys == ("stage",)
    assert M.METRICS[M.STAGE_DURATION].tag_keys == ("stage", "step")


def test_exported_names_follow_rays_rules():
    assert M.METRICS[M.STAGE_ROWS].exported_series == ("ray_retro_ray_stage_rows_total",)
    assert M.METRICS[M.QUERY_NEIGHBORS].exported_series == ("ray_retro_ray_query_neighbors_total",)
    assert M.METRICS[M.EMBED_CHUNKS_PER_SECOND].exported_series == ("ray_retro_ray_embed_chunks_per_second",)
    assert M.METRICS[M.INDEX_ADD_SECONDS].exported_series == (
        "ray_retro_ray_index_add_seconds_bucket", "ray_retro_ray_index_add_seconds_sum",
        "ray_retro_ray_index_add_seconds_count")
    # a counter whose name lacks _total gets it
    assert M.MetricSpec("x_rows", M.COUNTER, "").exported_name == "ray_x_rows_total"


def test_calls_are_noops_without_ray(monkeypatch):
    """No Ray initialised: every call returns at once and creates no Ray metric object."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # pragma: no cover - another test left Ray running
        pytest.skip("Ray is initialised in this process")
    M._objects.clear()
    m = M.stage_metrics("embed")
    m.rows(10)
    m.chunks(10)
    m.seconds(1.5)
    m.seconds(100.0, step="run")
    with m.timed():
        pass
    with m.timed(M.INDEX_SEARCH_SECONDS):
        pass
    m.chunks_per_second(123.0)
    m.index_add_seconds(0.1)
    m.index_search_seconds(0.01)
    m.neighbors(5)
    m.train_loss(3.2)
    m.train_loss(3.4, split="valid")
    m.train_tokens_per_second(1e4)
    m.train_mfu(0.4)
    m.generate_tokens_per_second(30)
    m.generate_latency_seconds(0.5)
    m.serve_retrieval_latency_seconds(0.02)
    M.record(M.STAGE_ROWS, 0, stage="db")
    assert M._objects == {}


def test_ray_not_imported_means_inactive(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert M.ray_active() is False


def test_misuse_is_an_error_even_without_ray():
    with pytest.raises(KeyError, match="not a retro-ray metric"):
        M.record("retro_ray_no_such_metric", 1)
    with pytest.raises(ValueError, match="unknown stage"):
        M.stage_metrics("tokenize")
    with pytest.raises(ValueError, match="not a histogram"):
        with M.stage_metrics("db").timed(M.STAGE_ROWS):
            pass


def test_stage_metrics_is_cached_and_pickles_small():
    m = M.stage_metrics("query")
    assert M.stage_metrics("query") is m
    data = pickle.dumps(m)
    assert len(data) < 200
    assert pickle.loads(data) is m  # unpickles to the process's own instance
