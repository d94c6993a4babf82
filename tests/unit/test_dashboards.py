"""The Grafana dashboard queries only metrics that retro_ray.metrics exports, under Ray's names.

The metric table (retro_ray.metrics.METRICS) is the one list of names; Ray exports each with a
``ray_`` prefix (counters end in ``_total``, histograms add ``_bucket`` / ``_sum`` / ``_count``).
The dashboard's PromQL is read by helpers in tests/support.py, which test_jobs uses as well.
tests/integration/test_jobs.py scrapes a real Ray node and checks the same names appear there.
"""

from __future__ import annotations

import json

import pytest
import yaml

from retro_ray import metrics as M
from tests.support import DASHBOARD, REPO, dashboard_panels, promql_metric_names


@pytest.fixture(scope="module")
def dash() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_promql_parser_finds_metric_names():
    expr = ('histogram_quantile(0.95, sum by (le, stage) (rate(ray_retro_ray_stage_duration_seconds_bucket'
            '{SessionName=~"$SessionName", stage="db"}[$__rate_interval]))) / on (stage) group_left '
            'sum(up{job="ray"}) or vector(0)')
    assert promql_metric_names(expr) == {"ray_retro_ray_stage_duration_seconds_bucket", "up"}


def test_every_panel_queries_only_exported_metric_names(dash):
    exported = M.exported_series()
    seen = set()
    for p in dashboard_panels(dash):
        if p["type"] == "row":
            continue
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            names = promql_metric_names(t["expr"])
            assert names, f"panel {p['title']!r}: no metric in {t['expr']!r}"
            unknown = names - exported
            assert not unknown, (f"panel {p['title']!r} queries {sorted(unknown)}, which retro_ray.metrics does not "
                                 f"export; exported: {sorted(exported)}")
            seen |= names
    # and every metric of the table is on the dashboard
    missing = [s.name for s in M.METRICS.values() if not set(s.exported_series) & seen]
    assert not missing, f"metrics with no panel: {missing}"


def test_dashboard_shape(dash):
    assert dash["uid"] == "retro-ray-stages"  # stable: links and provisioning refer to it
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    rows = [p["title"].split(":")[0] for p in dash["panels"] if p["type"] == "row"]
    assert rows == list(M.STAGES)  # one row per stage, in pipeline order
    ids = [p["id"] for p in dashboard_panels(dash)]
    assert len(ids) == len(set(ids))
    for p in dashboard_panels(dash):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])


def test_broken_query_is_caught(dash):
    """The check above can fail: a query of the un-prefixed name (what Ray does NOT export) is flagged."""
    exported = M.exported_series()
    bad = promql_metric_names('sum(rate(retro_ray_stage_rows_total{stage="db"}[5m]))')
    assert bad == {"retro_ray_stage_rows_total"} and not bad <= exported


def test_provisioning_files():
    ds = yaml.safe_load((REPO / "dashboards/provisioning/datasources.yaml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((REPO / "dashboards/provisioning/dashboards.yaml").read_text())
    assert prov["apiVersion"] == 1
    paths = [p["options"]["path"] for p in prov["providers"]]
    assert any(p.endswith("session_latest/metrics/grafana/dashboards") for p in paths)  # Ray's own, beside ours


def test_readme_lists_every_metric():
    text = (REPO / "dashboards" / "README.md").read_text()
    missing = [s.name for s in M.METRICS.values() if f"`{s.name}`" not in text or s.exported_name not in text]
    assert not missing, f"dashboards/README.md does not document {missing}"
