"""jobs/submit against a real Ray head started with `ray start --head`, and metrics scraped from it.

The head runs in its own session (``start_new_session``) with a dedicated ``--temp-dir`` and free
ports, so it never touches another Ray instance on the machine; teardown stops only the processes
this module started (never `ray stop`, which would kill every Ray process of the machine).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from retro_ray import metrics as M
from tests.conftest import write_jsonl
from tests.unit.test_dashboards import dashboard_metric_names

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "jobs" / "submit"
BIN = Path(sys.executable).parent  # the environment running the tests: its `ray` and `retro-ray`
RAY = str(BIN / "ray")
STARTUP_TIMEOUT = 120
JOB_TIMEOUT = 240

SETTINGS = ["tokenizer.vocab_size=512", "split=90,10,0", "seq_length=128", "chunk_length=32"]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _wait_started(proc: subprocess.Popen, log: Path, dashboard: str, timeout: float) -> None:
    """Until `ray start` says the node is up (GCS, raylet, dashboard and its job agent) and the dashboard answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if "Ray runtime started" in log.read_text():
            try:
                urllib.request.urlopen(dashboard + "/api/version", timeout=2).read()
                return
            except urllib.error.HTTPError:  # 401 with token authentication: it is up
                return
            except OSError:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"the Ray head did not start in {timeout:.0f}s:\n{log.read_text()[-3000:]}")


class Head:
    def __init__(self, proc: subprocess.Popen, temp_dir: str, gcs: str, dashboard: str, env: dict):
        self.proc, self.temp_dir, self.gcs, self.dashboard, self.env = proc, temp_dir, gcs, dashboard, env
        # The plain ray CLI sends the cluster's token only with RAY_AUTH_MODE=token (Ray >= 2.59 turns
        # token auth on for a new local cluster); jobs/submit works that out by itself.
        self.cli_env = dict(env)
        if "RAY_AUTH_MODE" not in env and (Path.home() / ".ray" / "auth_token").is_file():
            self.cli_env["RAY_AUTH_MODE"] = "token"

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *map(str, args)], env=self.cli_env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def submit(self, *args: str, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run([str(SUBMIT), *map(str, args)], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)


def _stop_head(proc: subprocess.Popen) -> None:
    """Kill the `ray start --block` process and every process below it, by pid (never `ray stop`, which
    would stop every Ray instance of the machine). No graceful drain: the whole session is thrown away."""
    try:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:  # psutil refuses a pid that was reused meanwhile
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=15)
    proc.wait(timeout=15)


@pytest.fixture(scope="module")
def head():
    temp_dir = tempfile.mkdtemp(prefix="rrj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs_port, dash_port, client_port, agent_port = _free_ports(4)
    env = {**os.environ,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # job drivers find retro-ray
           "RAY_metrics_report_interval_ms": "2000"}  # workers report metrics every 2 s, not 10 s
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(k, None)
    log_path = Path(temp_dir) / "head.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", f"--port={gcs_port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash_port}", "--include-dashboard=true", f"--ray-client-server-port={client_port}",
         f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dash_port}"
    try:
        _wait_started(proc, log_path, dashboard, STARTUP_TIMEOUT)
        yield Head(proc, temp_dir, f"127.0.0.1:{gcs_port}", dashboard, {**env, "RAY_ADDRESS": dashboard})
    finally:
        _stop_head(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~100 documents of a few sentences each, made up from a fixed vocabulary (seeded)."""
    rng = random.Random(7)
    nouns = ["river", "castle", "engine", "forest", "market", "harbour", "library", "comet", "valley", "bridge",
             "garden", "museum", "glacier", "orchestra", "railway", "island", "desert", "factory", "temple", "tower"]
    verbs = ["crosses", "protects", "powers", "surrounds", "supplies", "shelters", "records", "follows", "feeds",
             "connects"]
    adjs = ["old", "northern", "quiet", "famous", "hidden", "wide", "ancient", "modern", "busy", "frozen"]
    records = []
    for i in range(100):
        sentences = []
        for _ in range(rng.randint(4, 8)):
            a, b = rng.sample(nouns, 2)
            sentences.append(f"The {rng.choice(adjs)} {a} {rng.choice(verbs)} the {rng.choice(adjs)} {b} "
                             f"near {rng.choice(nouns)} number {rng.randint(1, 999)}.")
        records.append({"title": f"Document {i}", "text": " ".join(sentences)})
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", records)


def _job_list(head: Head) -> str:
    r = head.ray("job", "list")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_prep_and_db_jobs(head, corpus, tmp_path):
    project = tmp_path / "proj"
    r = head.submit("prep", "--project-dir", project, f"corpus.path={corpus}", *SETTINGS, "prep.docs_per_block=40",
                    "--no-progress")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout + r.stderr
    for rel in ("config.json", "tokenizer/tokenizer.json", "data/docs.parquet", "data/train.bin", "data/train.idx",
                "data/valid.bin", "data/valid.idx", ".stages/prep.json"):
        assert (project / rel).is_file(), rel

    r = head.submit("db", "--project-dir", project, "db.docs_per_block=40", "--no-progress")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rel in ("db/merged/train.hdf5", "db/merged/valid.hdf5", "db/merged/sampled.hdf5", ".stages/db.json"):
        assert (project / rel).is_file(), rel
    # the job ran the CLI of the submitted tree: its report is in the job's log
    assert "db: done" in r.stdout


def test_runtime_env_ships_the_tree_without_the_bulk(head):
    """What jobs/runtime_env.yaml gives a job: the submitted tree as cwd and first on the path, minus excludes."""
    probe = ("import os, retro_ray; print('PROBE', os.path.realpath(retro_ray.__file__), os.getcwd(), "
             "os.path.isfile('jobs/submit'), os.path.exists('.venv'), os.path.exists('.git'))")
    r = head.ray("job", "submit", "--working-dir", REPO, "--runtime-env", REPO / "jobs/runtime_env.yaml", "--",
                 "python", "-c", probe, timeout=JOB_TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fields = re.search(r"PROBE (\S+) (\S+) (\S+) (\S+) (\S+)", r.stdout).groups()
    module, cwd, has_submit, has_venv, has_git = fields
    assert module.startswith(os.path.realpath(cwd)) and not module.startswith(str(REPO)), fields
    assert (has_submit, has_venv, has_git) == ("True", "False", "False"), fields


def test_pipeline_stops_at_the_failing_stage(head, tmp_path):
    project = tmp_path / "bad"
    missing = tmp_path / "no_such_corpus.jsonl"
    r = head.submit("pipeline", "--project-dir", project, f"corpus.path={missing}", *SETTINGS, "--no-progress")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "pipeline stopped at stage 'prep'" in r.stderr
    assert re.search(r"stage 'prep' did not succeed: job retro-ray-pipeline-\S+-prep is FAILED", r.stderr)
    assert "not run: db embed index query" in r.stderr
    assert str(missing) in out  # the stage's own one-line error reached the job log
    stamp = re.search(r"job (retro-ray-pipeline-\S+)-prep", r.stderr).group(1)
    jobs = _job_list(head)
    assert f"{stamp}-prep" in jobs and f"{stamp}-db" not in jobs  # db was never submitted
    assert not (project / ".stages" / "prep.json").exists()


def test_stopped_job_is_a_failure(head, corpus, tmp_path):
    """A job stopped on the cluster makes jobs/submit fail, although `ray job submit` exits 0 then."""
    project = tmp_path / "stopped"
    proc = subprocess.Popen([str(SUBMIT), "prep", "--project-dir", str(project), f"corpus.path={corpus}", *SETTINGS],
                            env=head.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines: list[str] = []
    found = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)
            if "as job " in line:
                found.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert found.wait(60), "".join(lines)
        job_id = re.search(r"as job (\S+)", "".join(lines)).group(1)
        deadline = time.monotonic() + 90
        while True:  # the job may not exist yet for a moment: retry the stop
            r = head.ray("job", "stop", job_id)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.returncode == 0, r.stdout + r.stderr
        proc.wait(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 1, err[-3000:]
    assert f"stage 'prep' did not succeed: job {job_id} is STOPPED" in err


def _scrape(head_nodes: list[dict]) -> str:
    out = []
    for n in head_nodes:
        url = f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        try:
            out.append(urllib.request.urlopen(url, timeout=5).read().decode())
        except OSError:
            pass
    return "\n".join(out)


# A driver in its own process (so this test process never joins a Ray cluster): an actor records every
# metric through retro_ray.metrics, the driver prints each node's metrics endpoint and then holds the
# actor (whose worker exports the series) until its stdin closes.
RECORDER = """
import json, sys
import ray

ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)


@ray.remote(num_cpus=0.1)
class Recorder:
    def record(self):
        import numpy as np
        from retro_ray.metrics import INDEX_ADD_SECONDS, STAGES, stage_metrics

        for stage in STAGES:
            m = stage_metrics(stage)
            m.rows(3)
            m.chunks(7)
            with m.timed():
                pass
            m.seconds(12.0, step="run")
        m = stage_metrics("embed")
        m.chunks_per_second(512.0)
        with m.timed(INDEX_ADD_SECONDS):
            pass
        m.index_search_seconds(0.004)
        m.neighbors(np.int64(20))  # numpy counts are fine
        m.train_loss(3.5)
        m.train_loss(3.9, split="valid")
        m.train_tokens_per_second(2.5e4)
        m.train_mfu(0.41)
        m.generate_tokens_per_second(42.0)
        m.generate_latency_seconds(0.8)
        m.serve_retrieval_latency_seconds(0.012)
        return True


recorder = Recorder.remote()
assert ray.get(recorder.record.remote(), timeout=120)
nodes = [{"host": n["NodeManagerAddress"], "port": n["MetricsExportPort"]} for n in ray.nodes() if n["Alive"]]
print("NODES " + json.dumps(nodes), flush=True)
sys.stdin.read()
"""


def _scrape(nodes: list[dict]) -> str:
    out = []
    for n in nodes:
        try:
            out.append(urllib.request.urlopen(f"http://{n['host']}:{n['port']}/metrics", timeout=5).read().decode())
        except OSError:
            pass
    return "\n".join(out)


def test_metrics_are_exported_under_the_dashboards_names(head):
    driver = subprocess.Popen([sys.executable, "-c", RECORDER, head.gcs], env=head.cli_env, cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        for line in driver.stdout:
            if line.startswith("NODES "):
                break
        assert line.startswith("NODES "), driver.stderr.read()[-3000:] if driver.poll() is not None else line
        nodes = json.loads(line[len("NODES "):])

        wanted = dashboard_metric_names()
        every_series = M.exported_series()
        assert wanted <= every_series
        deadline = time.monotonic() + 90  # Ray's workers report to the metrics agent every few seconds
        while True:
            text = _scrape(nodes)
            exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                        if line.startswith("ray_retro_ray_")}
            if every_series <= exported or time.monotonic() > deadline:
                break
            time.sleep(2)
    finally:
        driver.stdin.close()
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            driver.kill()
    assert not wanted - exported, f"dashboard queries not exported by Ray: {sorted(wanted - exported)}"
    assert not every_series - exported, f"table names not exported: {sorted(every_series - exported)}"
    assert exported <= every_series, f"Ray exported names the table does not predict: {sorted(exported - every_series)}"
    # tag values arrive as labels: stage, step, and the loss's split
    assert re.search(r'ray_retro_ray_stage_rows_total\{[^}]*stage="query"[^}]*\} 3', text)
    assert re.search(r'ray_retro_ray_stage_duration_seconds_count\{[^}]*step="run"', text)
    assert re.search(r'ray_retro_ray_query_neighbors_total\{[^}]*\} 20', text)
    assert re.search(r'ray_retro_ray_train_loss\{[^}]*split="valid"[^}]*\} 3\.9', text)
