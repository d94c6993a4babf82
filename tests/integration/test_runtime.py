"""run_block_tasks on a local Ray cluster: order, errors, one tokenizer thread per one-CPU task."""

from __future__ import annotations

import os

import pytest
import ray

from retro_ray.errors import RetroRayError
from retro_ray.runtime import run_block_tasks


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_results_come_back_in_item_order_with_the_task_environment(ray_cluster):
    def fn(item):  # defined here so that it travels by value
        import time

        time.sleep(0.05 * (item["block_key"] % 3))
        return {"block_key": item["block_key"], "square": item["block_key"] ** 2,
                "parallelism": os.environ.get("TOKENIZERS_PARALLELISM")}

    items = [{"block_key": k} for k in range(12)]
    rows = run_block_tasks(fn, items, 1, "test")
    assert [r["block_key"] for r in rows] == list(range(12))
    assert [r["square"] for r in rows] == [k * k for k in range(12)]
    assert {r["parallelism"] for r in rows} == {"false"}  # one-CPU tasks: HF tokenizers on one thread
    rows = run_block_tasks(fn, items[:2], 2, "test")
    assert {r["parallelism"] for r in rows} == {None}  # a task with more CPUs keeps the default
    assert run_block_tasks(fn, [], 1, "test") == []


def test_a_user_error_in_a_task_is_raised_as_itself(ray_cluster):
    def fn(item):
        if item["block_key"] == 3:
            raise RetroRayError("block 3 is bad; fix it")
        return {"block_key": item["block_key"]}

    with pytest.raises(RetroRayError, match="^block 3 is bad; fix it$"):
        run_block_tasks(fn, [{"block_key": k} for k in range(6)], 1, "test")

    def bug(item):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        run_block_tasks(bug, [{"block_key": 0}], 1, "test")


def test_a_local_cluster_started_by_a_stage_serves_the_state_api(ray_cluster):
    """connect() starts a local cluster with its dashboard: Ray Train's placement-group cleaner polls the
    State API every second and, without it, logs a warning each time. A second process, since this
    module's cluster is already connected here."""
    import subprocess
    import sys

    code = ("import logging, ray; from ray.util.state import list_nodes; logging.basicConfig(level=logging.INFO); "
            "from retro_ray.runtime import connect; connect(); "
            "nodes = list_nodes(address=ray.get_runtime_context().gcs_address); print('nodes', len(nodes))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0 and "nodes 1" in r.stdout, (r.stdout[-1000:], r.stderr[-3000:])
    assert "dashboard at http://" in r.stderr  # the log line names the dashboard
