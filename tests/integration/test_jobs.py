"""jobs/submit against a real Ray head started with `ray start --head`, and the metrics that really running
every stage against it exports, scraped from the node's metrics endpoint and compared with the dashboard.

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
from tests.support import DASHBOARD, dashboard_metric_names, dashboard_panels, promql_metric_names, write_jsonl

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "jobs" / "submit"
BIN = Path(sys.executable).parent  # the environment running the tests: its `ray` and `retro-ray`
RAY = str(BIN / "ray")
STARTUP_TIMEOUT = 120
JOB_TIMEOUT = 240
STAGES_TIMEOUT = 480  # every stage, training and generation in one driver (~70 s on an idle 2-core machine)

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


# ---- metrics: really run every stage against the head, scrape the node, compare with the dashboard -----

# The settings of the stage run: the corpus fixture's ~100 documents, small blocks so that every block
# stage has several, two index shards, two neighbours saved (what the tiny model reads).
STAGE_SETTINGS = [*SETTINGS, "prep.docs_per_block=40", "db.docs_per_block=40", "embed.chunks_per_block=128",
                  "index.num_shards=2", "query.num_neighbors_query=8", "query.num_neighbors_save=2"]
TRAIN_SETTINGS = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.checkpoint_interval=4",
                  "trainer.limit_val_batches=1", "trainer.use_gpu=false", "trainer.num_checkpoints_to_keep=1",
                  "trainer.peak_flops=1e12"]  # a peak for MFU on a CPU (else MFU is null and not recorded)
GENERATE_SETTINGS = ["prompt=The old river crosses the quiet bridge", "inference.tokens_to_generate=40",
                     "inference.greedy=true"]

# A driver in its own process (so this test process never joins a Ray cluster), connected to the head:
# it prints the nodes' metrics endpoints, waits for a line on stdin (the test scrapes what earlier tests
# left on the node meanwhile), runs the CLI commands given as JSON argument lists (the pipeline, train,
# export, generate) in this one Ray session, and keeps the session until its stdin closes.
STAGE_DRIVER = """
import json, sys, time
import ray

ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)
nodes = [{"host": n["NodeManagerAddress"], "port": n["MetricsExportPort"]} for n in ray.nodes() if n["Alive"]]
print("NODES " + json.dumps(nodes), flush=True)
sys.stdin.readline()

from retro_ray.cli import main

for argv in json.loads(sys.argv[2]):
    t0 = time.perf_counter()
    rc = main(argv)
    print(f"RAN {argv[0]} rc={rc} {time.perf_counter() - t0:.1f}s", flush=True)
    if rc != 0:
        sys.exit(rc)
print("DONE", flush=True)
sys.stdin.read()
"""

# Ray's own labels on every series (which process, which node, which session): not a metric's tags.
RAY_LABELS = {"SessionName", "NodeAddress", "WorkerId", "Component", "Version", "otel_scope_name",
              "otel_scope_schema_url", "otel_scope_version"}

# Panel queries whose series no stage records yet, each with why. Only the label combination is
# missing: the metric names are all exported (checked below). A selector listed here must really be
# missing from the scrape: once a stage records it, the test fails until it is taken off this list.
KNOWN_GAPS: dict[str, str] = {}

_SAMPLE = re.compile(r'^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def _scrape(nodes: list[dict]) -> str:
    out = []
    for n in nodes:
        try:
            out.append(urllib.request.urlopen(f"http://{n['host']}:{n['port']}/metrics", timeout=5).read().decode())
        except OSError:
            pass
    return "\n".join(out)


class Scraper:
    """Scrapes the nodes every ``interval`` s in a thread and keeps every retro-ray series seen since it started.

    All along, not once at the end: Ray's metrics agent keeps a gauge only for two report intervals
    after a worker last reported it (it evicts stale gauges: ray._private.telemetry.
    open_telemetry_metric_recorder), so a gauge set once, or by a worker that has exited (the embedder
    pool, the Ray Train workers), is gone from a scrape taken seconds later. Counters and histograms
    stay (cumulative), dead workers' too.

    The agent also keeps the series of earlier tests' jobs (the head is the module's), so the first
    scrape is a baseline: :meth:`snapshot` gives the growth of each counter and histogram series since
    then, and only the gauges that were not there yet.
    """

    def __init__(self, nodes: list[dict], interval: float = 0.5):
        self.nodes, self.interval = nodes, interval
        self.series: dict[tuple[str, tuple], float] = {}  # (name, sorted labels) -> largest value seen
        self.baseline: dict[tuple[str, tuple], float] = {}
        self.scrapes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Scraper:
        self.scrape_once()
        self.baseline, self.series = self.series, {}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.scrape_once()
            self._stop.wait(self.interval)

    def scrape_once(self) -> None:
        text = _scrape(self.nodes)
        with self._lock:
            self.scrapes += 1
            for line in text.splitlines():
                if not line.startswith(M.EXPORT_PREFIX + "retro_ray_"):
                    continue
                m = _SAMPLE.match(line)
                if not m:
                    continue
                labels = tuple(sorted((k, v) for k, _, v in _LABEL.findall(m.group("labels") or "")))
                key = (m.group("name"), labels)
                value = float(m.group("value"))
                self.series[key] = max(value, self.series.get(key, value))

    def snapshot(self) -> dict[tuple[str, tuple], float]:
        out = {}
        with self._lock:
            for key, value in self.series.items():
                if key[0].endswith(("_total", "_bucket", "_count", "_sum")):  # cumulative
                    out[key] = value - self.baseline.get(key, 0.0)
                elif key not in self.baseline:  # a gauge
                    out[key] = value
        return out


def panel_selectors(dash_path: Path = DASHBOARD) -> set[tuple[str, tuple]]:
    """Every (metric name, label matchers) a dashboard panel selects; matchers on Grafana variables dropped."""
    dash = json.loads(dash_path.read_text())
    out = set()
    for p in dashboard_panels(dash):
        for t in p.get("targets", []):
            expr = t["expr"]
            for name in promql_metric_names(expr):
                for m in re.finditer(re.escape(name) + r"(?![A-Za-z0-9_:])(\{[^}]*\})?", expr):
                    matchers = tuple(sorted((k, op, v) for k, op, v in _LABEL.findall(m.group(1) or "")
                                            if "$" not in v))
                    out.add((name, matchers))
    return out


def selector_text(selector: tuple[str, tuple]) -> str:
    name, matchers = selector
    return name + ("{" + ",".join(f'{k}{op}"{v}"' for k, op, v in matchers) + "}" if matchers else "")


def _matches(labels: dict, matchers: tuple) -> bool:
    for k, op, v in matchers:
        have = labels.get(k, "")
        ok = {"=": have == v, "!=": have != v, "=~": re.fullmatch(v, have) is not None,
              "!~": re.fullmatch(v, have) is None}[op]
        if not ok:
            return False
    return True


def total(series: dict, name: str, **tags: str) -> float:
    """Sum over processes (WorkerId) of the series ``name`` with exactly these retro-ray tags."""
    return sum(v for (n, labels), v in series.items()
               if n == name and {k: x for k, x in labels if k not in RAY_LABELS} == tags)


def test_running_the_stages_exports_every_series_the_dashboard_queries(head, corpus, tmp_path):
    """prep → db → embed → index → query, train (tiny, 4 steps), export and generate, all really run against
    the head; every series a panel queries is scraped from the node's metrics endpoint with the panel's
    labels (stage, step, split) and a value > 0, under the names the metric table predicts."""
    project, exp, model = tmp_path / "proj", tmp_path / "exp", tmp_path / "model.pt"
    commands = [
        ["pipeline", "--project-dir", str(project), "--no-progress", f"corpus.path={corpus}", *STAGE_SETTINGS],
        ["train", "--project-dir", str(project), "--exp-dir", str(exp), "--config", "tiny", *TRAIN_SETTINGS],
        ["export", "--exp-dir", str(exp), "--out", str(model)],
        ["generate", "--checkpoint", str(model), "--project-dir", str(project), *GENERATE_SETTINGS],
    ]
    err_path = tmp_path / "driver.err"
    with open(err_path, "w") as err:
        driver = subprocess.Popen([sys.executable, "-c", STAGE_DRIVER, head.gcs, json.dumps(commands)], env=head.cli_env,
                                  cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: list[str] = []
    nodes_seen, done = threading.Event(), threading.Event()

    def read_stdout():
        for line in driver.stdout:
            lines.append(line)
            if line.startswith("NODES "):
                nodes_seen.set()
            elif line.startswith("DONE"):
                done.set()
        nodes_seen.set()
        done.set()  # the driver exited: whatever it printed is all there is

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()

    def failure(what: str) -> str:
        return f"{what}\n--- driver stdout:\n{''.join(lines)[-3000:]}\n--- driver stderr:\n{err_path.read_text()[-5000:]}"

    wanted_names = dashboard_metric_names()
    every_series = M.exported_series()
    selectors = panel_selectors()
    t0 = time.monotonic()
    try:
        assert nodes_seen.wait(120), failure("the driver did not connect")
        nodes = next((json.loads(x[len("NODES "):]) for x in lines if x.startswith("NODES ")), None)
        assert nodes, failure("the driver printed no nodes")
        with Scraper(nodes) as scraper:
            try:
                driver.stdin.write("go\n")
                driver.stdin.flush()
            except BrokenPipeError:  # the driver is gone: its output says why (below)
                pass
            assert done.wait(STAGES_TIMEOUT), failure(f"the stages did not finish in {STAGES_TIMEOUT}s")
            assert any(x.startswith("DONE") for x in lines), failure("a stage failed")
            stages_s = time.monotonic() - t0
            # What the driver recorded last reaches the agent at its next report (every 2 s here).
            deadline = time.monotonic() + 30
            while True:
                series = scraper.snapshot()
                found = {sel for sel in selectors
                         if any(n == sel[0] and v > 0 and _matches(dict(labels), sel[1])
                                for (n, labels), v in series.items())}
                if selectors - set(found) <= {s for s in selectors if selector_text(s) in KNOWN_GAPS} \
                        or time.monotonic() > deadline:
                    break
                time.sleep(1)
            scrapes = scraper.scrapes
    finally:
        if driver.poll() is None:
            driver.stdin.close()
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            driver.kill()
        reader.join(timeout=10)
    print(f"stages ran in {stages_s:.0f}s; {scrapes} scrapes; {''.join(x for x in lines if x.startswith('RAN'))}")

    exported = {n for (n, _), v in series.items() if v > 0}
    # the names: the dashboard's are the table's, and Ray exported exactly the table's
    assert wanted_names <= every_series
    assert not wanted_names - exported, f"dashboard queries no stage exported: {sorted(wanted_names - exported)}"
    assert not every_series - exported, f"table names no stage exported: {sorted(every_series - exported)}"
    assert exported <= every_series, f"Ray exported names the table does not predict: {sorted(exported - every_series)}"

    # the labels: every panel's selector (stage, step, split) matches a series with a value > 0
    missing = sorted(selector_text(s) for s in selectors - found)
    unexpected = [s for s in missing if s not in KNOWN_GAPS]
    assert not unexpected, f"panel queries that no stage run recorded: {unexpected}"
    closed = sorted(set(KNOWN_GAPS) - set(missing))
    assert not closed, f"now recorded, take them off KNOWN_GAPS: {closed}"
    assert set(KNOWN_GAPS) <= {selector_text(s) for s in selectors}, "KNOWN_GAPS names a query no panel makes"

    # the values are the stages' own counts (summed over the processes that recorded them)
    reports = {p.stem: json.loads(p.read_text())["counts"] for p in (project / ".stages").glob("*.json")}
    prep, db, embed, query = reports["prep"], reports["db"], reports["embed"], reports["query"]
    rows, chunks = "ray_retro_ray_stage_rows_total", "ray_retro_ray_stage_chunks_total"
    assert total(series, rows, stage="prep") == prep["train_docs"] + prep["valid_docs"] + prep["test_docs"], prep
    assert total(series, rows, stage="db") == db["train_docs"] + db["valid_docs"], db
    assert total(series, chunks, stage="db") == db["train_chunks"] + db["valid_chunks"], db
    assert total(series, rows, stage="embed") == total(series, chunks, stage="embed") == \
        embed["train_chunks"] + embed["valid_chunks"], embed
    assert total(series, chunks, stage="index") == total(series, rows, stage="index") == \
        reports["index-add"]["vectors"]
    assert total(series, rows, stage="query") == query["train_samples"] + query["valid_samples"], query
    assert total(series, chunks, stage="query") == query["train_chunks"] + query["valid_chunks"], query
    assert 0 < total(series, "ray_retro_ray_query_neighbors_total") <= \
        (query["train_chunks"] + query["valid_chunks"]) * 2  # num_neighbors_save=2
    duration = "ray_retro_ray_stage_duration_seconds_count"
    assert total(series, duration, stage="index", step="train") == 1
    assert total(series, duration, stage="query", step="block") == \
        len(list((project / "query").glob("*/[0-9]*.npy")))  # one per block file
    for stage in ("prep", "db", "embed", "index", "query", "train"):
        assert total(series, duration, stage=stage, step="run") == 1, stage
    assert total(series, duration, stage="train", step="step") == 4  # one per logged step (every step)
    assert total(series, duration, stage="train", step="validate") == 2  # steps 2 and 4
    assert total(series, duration, stage="train", step="checkpoint") == 1  # step 4
    assert total(series, "ray_retro_ray_generate_latency_seconds_count") == 1  # one request
    history = [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
    # the gauges: a value the run really had (the last one recorded, or an earlier one a scrape caught)
    losses = {round(r["train_loss"], 4) for r in history if r["kind"] == "train"}
    seen_losses = {round(v, 4) for (n, labels), v in series.items()
                   if n == "ray_retro_ray_train_loss" and dict(labels).get("split") == "train"}
    assert seen_losses and seen_losses <= losses, (seen_losses, losses)
