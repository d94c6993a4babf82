"""run_block_tasks on a local Ray cluster: order, errors, one tokenizer thread per one-CPU task."""

from __future__ import annotations

import os
import signal

import pytest

from retro_ray.errors import RetroRayError
from retro_ray.runtime import run_block_tasks


def test_results_come_back_in_item_order_with_the_task_environment(ray_address):
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


def test_a_user_error_in_a_task_is_raised_as_itself(ray_address):
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



_NOISY_TASK = """
import logging, time
from retro_ray.runtime import hide_known_ray_noise
hide_known_ray_noise()
import ray  # after: Ray reads the skip pattern when it is imported
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=True)

@ray.remote
def task():
    logging.getLogger("ray.train.v2").warning(
        "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
    print("a line the user should see", flush=True)

ray.get(task.remote())
time.sleep(3)  # the log monitor forwards worker output about once a second
ray.shutdown()
"""


def test_the_driver_hides_ray_trains_state_api_warning(ray_address):
    """Ray Train 2.60's placement-group cleaner logs this once a second on a cluster without the
    State API (runtime.hide_known_ray_noise); the driver drops that line and prints the rest. A second
    process, with a cluster of its own, since the setting is read when ray is imported."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DEDUP_LOGS_SKIP_REGEX")}
    r = subprocess.run([sys.executable, "-c", _NOISY_TASK], capture_output=True, text=True, timeout=180, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "a line the user should see" in out, out[-3000:]
    assert "Failed to query Ray Train Controller" not in out


def test_a_skip_pattern_the_user_set_is_kept(monkeypatch):
    from retro_ray.runtime import hide_known_ray_noise

    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "mine")
    hide_known_ray_noise()
    assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == "mine"


_LISTENERS = """
import json, sys
from retro_ray.runtime import connect
connect(None, progress=False)
import psutil, ray

@ray.remote
def task():
    return 1

ray.get(task.remote())  # a worker is up too
me = psutil.Process()
found = set()
for p in [me, *me.children(recursive=True)]:
    try:
        found |= {c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
print(json.dumps(sorted(found)))
ray.shutdown()
"""


@pytest.mark.parametrize("setting", [None, "1"], ids=["default", "every-interface"])
def test_a_local_cluster_listens_on_loopback_only(setting):
    """connect() with no address starts a cluster whose every listening socket (GCS, raylet, object
    manager, agents, driver and worker) is on 127.0.0.1; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, Ray's own
    default, listens on the machine's address or all interfaces (which shows the check can fail)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    if setting is not None:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = setting
    # Its own session, so that a timeout takes the cluster it started down with it.
    proc = subprocess.Popen([sys.executable, "-c", _LISTENERS], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, stderr[-2000:]
    ips = set(json.loads(stdout.strip().splitlines()[-1]))
    loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
    assert len(ips) >= 1
    if setting is None:
        assert ips <= loopback, f"listening beyond loopback: {sorted(ips - loopback)}"
    else:
        assert ips - loopback, "Ray's default was expected to listen beyond loopback"
