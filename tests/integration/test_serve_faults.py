"""Serving under faults (issue 18 part 3): a generator replica killed (SIGKILL) under a 32-client load.

A real local Ray cluster, a small real project, a random-weight model, the app started by
``serve_main`` with two generator replicas, plain HTTP on loopback. Every client call has a timeout,
and the tests assert that every call returned: a request on the killed replica is made once more by
the ingress (on the other replica) or answered with the 503 ``replica_died`` error, never left
hanging; every other request succeeds; Serve replaces the replica; a stream on the killed replica
ends with an error event; and documents added while a replica dies under a /generate load are all
in the database and the index afterwards, none twice.

Each fault prints one line: what was killed, when, and what the clients got.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from ray import serve

from retro_ray.project import Project
from retro_ray.retrieval.chunks import ChunkDatabase, load_added, read_added_state
from retro_ray.retrieval.index import load_index
from retro_ray.serve.app import serve_main
from retro_ray.serve.config import ServeConfig
from retro_ray.serve.errors import REPLICA_DIED
from tests.support import copy_project, write_random_export

APP = "faults"
REPLICAS = 2
CLIENTS = 32
REQUESTS_PER_CLIENT = 6
TOKENS = 24
CALL_TIMEOUT_S = 90.0   # per HTTP call; a call that takes longer is a hang and fails the test
CFG = {"app_name": APP, "min_replicas": REPLICAS, "max_replicas": REPLICAS, "max_batch_size": 8,
       "batch_wait_timeout_s": 0.02, "generator_num_cpus": 0.4, "embedder_num_cpus": 0.1, "ingress_num_cpus": 0.05}


@pytest.fixture(scope="module")
def project(serve_cluster, small_project, tmp_path_factory) -> Project:
    return copy_project(small_project, tmp_path_factory.mktemp("serve_faults"))


@pytest.fixture(scope="module")
def url(serve_cluster, project) -> str:
    model = write_random_export(project.root.parent / "model.pt", project)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = serve_main(str(model), str(project.root), ServeConfig(port=port, **CFG), blocking=False)
    _wait_target(None, 240)
    return url


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _replica_pids() -> set[int]:
    """Process ids of the live RetroGenerator replicas (from the GCS actor table)."""
    from ray._private.state import actors

    return {int(a["Pid"]) for a in actors().values()
            if a["ActorClassName"].endswith(f":{APP}:RetroGenerator") and a["State"] == "ALIVE"}


def _wait_target(victim: int | None, timeout_s: float) -> tuple[float, set[int]]:
    """Wait until Serve reports the generator HEALTHY with REPLICAS running replicas, none of them ``victim``."""
    t0, last = time.monotonic(), None
    while time.monotonic() - t0 < timeout_s:
        app = serve.status().applications.get(APP)
        dep = app.deployments.get("RetroGenerator") if app else None
        pids = _replica_pids()
        last = (dep and (dep.status, dep.replica_states), pids)
        if (dep is not None and dep.status == "HEALTHY" and dep.replica_states.get("RUNNING") == REPLICAS
                and len(pids) == REPLICAS and victim not in pids):
            return time.monotonic() - t0, pids
        time.sleep(0.25)
    raise AssertionError(f"the generator did not get back to {REPLICAS} healthy replicas in {timeout_s}s: {last}")


def _call(method: str, url: str, body: dict | None = None) -> tuple[int | str, dict | str, float]:
    """(status or the exception's name, JSON body, seconds); never raises, never waits past CALL_TIMEOUT_S."""
    t = time.monotonic()
    try:
        r = requests.request(method, url, json=body, timeout=CALL_TIMEOUT_S)
    except requests.RequestException as e:
        return type(e).__name__, str(e), time.monotonic() - t
    try:
        out = r.json()
    except ValueError:
        out = r.text
    return r.status_code, out, time.monotonic() - t


def _ingress_counters(url: str) -> dict:
    status, body, _ = _call("GET", f"{url}/health")
    assert status == 200, body
    return body["ingress"]


def _is_replica_died(status, body) -> bool:
    return status == 503 and isinstance(body, dict) and body["error"]["code"] == "replica_died" \
        and body["error"]["message"] == REPLICA_DIED and body["error"]["type"] == "server_error"


class Load:
    """``clients`` threads, each sending ``per_client`` short /generate requests one after another."""

    def __init__(self, url: str, clients: int, per_client: int) -> None:
        self.url, self.done = url, 0
        self.results: list[tuple] = []
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(clients)
        self.futures = [self.pool.submit(self._client, c, per_client) for c in range(clients)]

    def _client(self, c: int, n: int) -> None:
        for k in range(n):
            res = _call("POST", f"{self.url}/generate", {"prompt": f"The history of mathematics {c}.{k}",
                                                          "tokens_to_generate": TOKENS,
                                                          # every answer is TOKENS long: the end-of-document
                                                          # token (an early stop by chance) is banned
                                                          "min_tokens_to_generate": TOKENS})
            with self.lock:
                self.results.append(res)
                self.done += 1

    def wait_done(self, n: int, timeout_s: float = 120) -> None:
        t0 = time.monotonic()
        while self.done < n:
            assert time.monotonic() - t0 < timeout_s, f"only {self.done} of {n} requests answered in {timeout_s}s"
            time.sleep(0.02)

    def join(self) -> list[tuple]:
        for f in self.futures:
            f.result(timeout=CALL_TIMEOUT_S * 10)  # each call is bounded; so is the whole
        self.pool.shutdown()
        return self.results


class Kill:
    """SIGKILL one generator replica now; a thread then times Serve's replacement of it (``replaced_s``)."""

    def __init__(self) -> None:
        pids = _replica_pids()
        assert len(pids) == REPLICAS, pids
        self.victim = min(pids)
        os.kill(self.victim, signal.SIGKILL)
        self.at = time.monotonic()
        self.replaced_s: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        try:
            _wait_target(self.victim, 180)
            self.replaced_s = time.monotonic() - self.at
        except BaseException as e:  # noqa: BLE001 -- reported by replaced()
            self.error = e

    def replaced(self) -> float:
        """Seconds from the kill until Serve reported REPLICAS healthy replicas again, the victim not among them."""
        self.thread.join(200)
        if self.error is not None:
            raise self.error
        assert self.replaced_s is not None, "the replacement watcher did not finish"
        return self.replaced_s


def _check_generate_results(results: list[tuple], expected: int) -> Counter:
    assert len(results) == expected
    hung = [r for r in results if not isinstance(r[0], int)]
    assert not hung, f"{len(hung)} calls did not return an HTTP answer: {hung[:3]}"
    odd = [r for r in results if r[0] != 200 and not _is_replica_died(r[0], r[1])]
    assert not odd, f"answers other than 200 and the 503 replica_died error: {odd[:3]}"
    for status, body, _ in results:
        if status == 200:
            assert len(body["generations"]) == 1 and len(body["generations"][0]["tokens"]) == TOKENS, body
    return Counter(r[0] for r in results)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_generator_replica_killed_under_load(url):
    before = _ingress_counters(url)
    total = CLIENTS * REQUESTS_PER_CLIENT
    t0 = time.monotonic()
    load = Load(url, CLIENTS, REQUESTS_PER_CLIENT)
    load.wait_done(CLIENTS)                 # every client has had an answer: the load is in full swing
    kill = Kill()
    done_at_kill = load.done
    results = load.join()
    load_s = time.monotonic() - t0
    codes = _check_generate_results(results, total)
    replaced_s = kill.replaced()
    after = _ingress_counters(url)
    retried = after["replica_died_retried"] - before["replica_died_retried"]
    failed = after["replica_died_failed"] - before["replica_died_failed"]
    print(f"\nFAULT generator replica pid {kill.victim} SIGKILLed {kill.at - t0:.1f}s into a {CLIENTS}-client load "
          f"({done_at_kill}/{total} requests answered by then): {codes.get(200, 0)} x 200, {codes.get(503, 0)} x 503 "
          f"replica_died, 0 unanswered; the ingress made {retried} calls again after the death (all answered) and "
          f"{failed} got the 503; slowest call {max(r[2] for r in results):.1f}s; load {load_s:.1f}s; "
          f"Serve healthy with {REPLICAS} replicas again {replaced_s:.1f}s after the kill",
          flush=True)
    assert codes[200] > 0
    assert codes.get(503, 0) == failed
    assert retried + failed >= 1, "no request was in flight on the killed replica"
    # New requests succeed, on both replicas (the replacement included).
    with ThreadPoolExecutor(8) as ex:
        fresh = list(ex.map(lambda i: _call("POST", f"{url}/generate", {"prompt": f"Again {i}", "tokens_to_generate": 8}),
                            range(16)))
    assert [r[0] for r in fresh] == [200] * 16, fresh


def test_documents_added_during_a_replica_death_are_all_kept(url, project):
    n_docs, per_request = 12, 2
    docs = [{"title": f"Fault doc {i}", "text": f"Zorblax fact number {i}: the quartz kettle {i} of moon Zorblax is "
             f"warmed by moss {i * 7} for {i + 3} minutes, and its tea is violet {i}."} for i in range(n_docs)]
    before = _ingress_counters(url)
    state = read_added_state(project)
    docs_before = int(state["docs"]) if state else 0
    chunks_before = len(ChunkDatabase(project))
    doc_results: list[tuple] = []

    def add(batch: list[dict]) -> None:
        # A client retries its 503 (adding is idempotent: a document already added is skipped).
        for _ in range(3):
            res = _call("POST", f"{url}/documents", {"documents": batch})
            doc_results.append(res)
            if res[0] == 200:
                return

    t0 = time.monotonic()
    load = Load(url, CLIENTS // 2, 4)
    with ThreadPoolExecutor(3) as ex:
        futures = [ex.submit(add, docs[i:i + per_request]) for i in range(0, n_docs, per_request)]
        while not doc_results and time.monotonic() - t0 < 120:
            time.sleep(0.02)
        kill = Kill()
        for f in futures:
            f.result(timeout=CALL_TIMEOUT_S * 4)
    gen_results = load.join()
    codes = _check_generate_results(gen_results, (CLIENTS // 2) * 4)
    hung = [r for r in doc_results if not isinstance(r[0], int)]
    assert not hung, hung
    doc_codes = Counter(r[0] for r in doc_results)
    assert set(doc_codes) <= {200, 503} and all(_is_replica_died(*r[:2]) for r in doc_results if r[0] == 503), doc_results
    replaced_s = kill.replaced()
    after = _ingress_counters(url)
    again = {k: after[k] - before[k] for k in after}

    added = load_added(project)
    assert int(added.state["docs"]) == docs_before + n_docs
    assert sorted(added.titles[docs_before:]) == sorted(d["title"] for d in docs)  # each once, none lost
    db = ChunkDatabase(project)
    assert len(db) > chunks_before
    assert load_index(project.added_index_path).ntotal == len(db)
    for _ in range(4):  # both replicas (the replacement too) read every chunk
        status, body, _ = _call("GET", f"{url}/health")
        assert status == 200 and body["generator"]["database_chunks"] == len(db), body
    print(f"\nFAULT generator replica pid {kill.victim} SIGKILLed {kill.at - t0:.1f}s into {n_docs} documents in "
          f"{n_docs // per_request} POST /documents with a {CLIENTS // 2}-client /generate load: documents "
          f"{dict(doc_codes)} (a client sends a 503'd request again), generate {dict(codes)}, calls made again by the "
          f"ingress {again['replica_died_retried']}, 503s {again['replica_died_failed']}; database "
          f"{docs_before} -> {added.state['docs']} documents (+{n_docs}, none lost or doubled), index {len(db)} vectors = "
          f"chunks; Serve healthy again {replaced_s:.1f}s after the kill", flush=True)


def test_streams_on_a_killed_replica_end_with_an_error_event(url):
    """A stream whose replica dies mid-generation ends with one error event (code replica_died), not a hang
    and not a cut connection; the others end with [DONE]."""
    n, first = 8, threading.Semaphore(0)

    def stream(i: int) -> tuple[list, str | None]:
        events: list = []
        try:
            with requests.post(f"{url}/v1/completions", stream=True, timeout=CALL_TIMEOUT_S,
                               json={"model": "model", "prompt": f"The river {i}", "max_tokens": 400, "stream": True,
                                     "temperature": 0.0}) as r:
                assert r.status_code == 200, r.text
                for line in r.iter_lines(decode_unicode=True):
                    if line:
                        if not events:
                            first.release()
                        data = line.removeprefix("data: ")
                        events.append(data if data == "[DONE]" else json.loads(data))
        except requests.RequestException as e:
            return events, type(e).__name__
        return events, None

    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as ex:
        futures = [ex.submit(stream, i) for i in range(n)]
        for _ in range(n // 2):  # half the streams are under way: kill while they all still run
            assert first.acquire(timeout=120), "the streams sent no event"
        kill = Kill()
        results = [f.result(timeout=CALL_TIMEOUT_S * 2) for f in futures]
    assert not [e for _, e in results if e], results
    done = sum(ev[-1] == "[DONE]" for ev, _ in results)
    died = [ev for ev, _ in results if ev[-1] != "[DONE]"]
    for ev in died:
        assert ev[-1]["error"]["code"] == "replica_died" and ev[-1]["error"]["message"] == REPLICA_DIED, ev[-1]
        assert all("choices" in e for e in ev[:-1])
    replaced_s = kill.replaced()
    print(f"\nFAULT generator replica pid {kill.victim} SIGKILLed {kill.at - t0:.1f}s into {n} streamed completions: "
          f"{done} ended with [DONE], {len(died)} with the replica_died error event, 0 hung or cut; Serve healthy "
          f"again {replaced_s:.1f}s after the kill"
          + ("" if died else " (no stream was on the killed replica: the error event was not exercised)"), flush=True)
    assert done + len(died) == n
