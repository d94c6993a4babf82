"""Serving benchmark: RETRO generation over HTTP (Ray Serve) against the same Generator in this process.

serve       the application of retro_ray.serve.app (make_app + serve.run: ingress → generator with
            @serve.batch → embedder deployment; index=local; one generator replica) on 127.0.0.1.
            C client threads (C = 1, 8, 32), each a closed loop over its own keep-alive connection:
            POST /generate with a distinct prompt, greedy, --tokens tokens. A bounded number of
            requests per level (--requests, at least 2 per client).
in-process  the same Generator (same model.pt, project, Retriever.local, the project's embedder in
            this process) behind the same batching policy without HTTP: C client threads put requests
            on a queue, one decode thread takes up to max_batch_size waiting requests (after waiting
            batch_wait_timeout_s for more) and calls Generator.generate on them. Run twice: with as
            many torch threads as the serving replica has (Ray gives a fractional-CPU replica one),
            and with torch's default (every core). It is loaded beside the idle application and the
            levels are interleaved (serve, in-process, in-process all threads), so a busy shared
            machine skews all three alike; the load average is recorded with each figure.
check       every answer is a 200 with --tokens tokens (or an end-of-document stop); zero errors or the
            benchmark fails. A few greedy answers are compared between the two (they must be equal).
Reported    requests/s, p50 and p99 latency per level, and serve / in-process for each: what Serve,
            HTTP and the separate embedder replica cost.

Run:  .venv/bin/python benchmarks/bench_serve.py [--project-dir runs/wiki --checkpoint model.pt]
      [--requests 64] [--tokens 16] [--levels 1,8,32] [--work-dir /tmp/bench_serve]
Without --project-dir/--checkpoint a small project (150 documents of the bundled corpus, the test
suite's settings) and a random-weight model are built in --work-dir first (about a minute; reused).
Writes <work-dir>/bench_serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

TOPICS = ["river", "painting", "war", "planet", "language", "city", "theorem", "empire", "music", "disease", "ocean", "poem"]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prompts_for(n: int) -> list[str]:
    return [f"Entry {i}: the history of the {TOPICS[i % len(TOPICS)]}" for i in range(n)]


def summarize(latencies: list[float], wall: float) -> dict:
    lat = np.asarray(latencies) * 1000
    return {"requests": len(lat), "wall_s": round(wall, 3), "req_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def closed_loop(clients: int, total: int, one) -> tuple[list[float], float, list[str]]:
    """``clients`` threads share ``total`` requests; ``one(i) -> error or None``. (latencies, wall, errors)."""
    counter = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            err = one(i)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if err:
                    errors.append(err)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - t0, errors


def check_generation(g: dict, tokens: int) -> str | None:
    if len(g["tokens"]) != tokens and g["finish_reason"] != "eod":
        return f"{len(g['tokens'])} tokens ({g['finish_reason']}) instead of {tokens}"
    return None


# --------------------------------------------------------------------------------------------------
# In-process baseline: the same batching policy, no HTTP
# --------------------------------------------------------------------------------------------------


class InProcessBatcher:
    def __init__(self, gen, max_batch_size: int, wait_s: float) -> None:
        self.gen, self.max_batch_size, self.wait_s = gen, max_batch_size, wait_s
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, request):
        done = threading.Event()
        box: dict = {}
        self.q.put((request, done, box))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _run(self) -> None:
        while True:
            batch = [self.q.get()]
            deadline = time.perf_counter() + self.wait_s
            while len(batch) < self.max_batch_size:
                left = deadline - time.perf_counter()
                try:
                    batch.append(self.q.get(timeout=max(left, 0)) if left > 0 else self.q.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self.gen.generate([b[0] for b in batch])
                for (_, done, box), r in zip(batch, results):
                    box["result"] = r
                    done.set()
            except Exception as e:  # noqa: BLE001 -- reported as errors of every request of the batch
                for _, done, box in batch:
                    box["error"] = e
                    done.set()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project-dir")
    ap.add_argument("--checkpoint")
    ap.add_argument("--work-dir", default="/tmp/bench_serve")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated per request")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    import ray

    if bool(args.project_dir) != bool(args.checkpoint):
        ap.error("give both --project-dir and --checkpoint, or neither")
    if args.project_dir:
        project_dir, checkpoint = Path(args.project_dir), Path(args.checkpoint)
    else:
        from retro_ray.project import Project
        from tests.support import build_small_project, write_random_export

        project_dir, checkpoint = work / "proj", work / "model.pt"
        if not (Project(project_dir).is_done("query") and checkpoint.is_file()):
            from retro_ray.config import CorpusConfig
            from retro_ray.corpus import IngestStats, iter_raw_documents

            say("building a small project and a random-weight model in " + str(work))
            docs = []
            for title, text in iter_raw_documents(CorpusConfig(), IngestStats()):
                docs.append((title, text))
                if len(docs) == 150:
                    break
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            project = build_small_project(work, docs, ray.get_runtime_context().gcs_address)
            ray.shutdown()
            write_random_export(checkpoint, project)

    import requests
    import torch

    from retro_ray.serve.app import make_app
    from retro_ray.serve.config import ServeConfig
    from retro_ray.serve.generate import GenerationRequest, Generator, InferenceConfig

    cfg = ServeConfig(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
                      min_replicas=1, max_replicas=1, max_tokens_to_generate=max(512, args.tokens))
    results: dict = {"tokens": args.tokens, "requests_per_level": args.requests, "max_batch_size": args.max_batch_size,
                     "cpus": os.cpu_count(), "serve": {}}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.perf_counter()
    serve.run(make_app(str(checkpoint), str(project_dir), cfg, token=""), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    info = requests.get(f"{url}/health", timeout=60).json()["generator"]
    say(f"serve app up in {time.perf_counter() - t0:.1f}s; replica torch threads {info['torch_threads']}")
    sessions = threading.local()

    def http_one(prompt: str) -> dict:
        s = getattr(sessions, "s", None)
        if s is None:
            s = sessions.s = requests.Session()
        r = s.post(f"{url}/generate", json={"prompt": prompt, "tokens_to_generate": args.tokens, "greedy": True}, timeout=600)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        return r.json()["generations"][0]

    for p in prompts_for(4):
        http_one(p)  # warm-up
    served_check = {p: http_one(p)["tokens"] for p in prompts_for(3)}

    # The in-process Generator lives beside the idle application, so both are measured level by level
    # under the same (shared-machine) conditions.
    gen = Generator.load(checkpoint, project_dir, index="local", device="cpu")
    batcher = InProcessBatcher(gen, args.max_batch_size, args.batch_wait_timeout_s)

    def local_one(prompt: str):
        g = batcher.submit(GenerationRequest(prompt, None, InferenceConfig(tokens_to_generate=args.tokens, greedy=True)))
        return {"tokens": g.tokens, "finish_reason": g.finish_reason}

    default_threads = torch.get_num_threads()
    baselines = {"in_process": int(info["torch_threads"]), "in_process_all_threads": default_threads}
    for p in prompts_for(4):
        local_one(p)
    for p, tokens in served_check.items():
        if local_one(p)["tokens"] != tokens:
            raise SystemExit(f"in-process and served greedy tokens differ for {p!r}: not the same work")

    def measure(c: int, call) -> dict:
        total = max(args.requests, 2 * c)
        ps = prompts_for(total)

        def one(i: int) -> str | None:
            try:
                return check_generation(call(ps[i]), args.tokens)
            except Exception as e:  # noqa: BLE001
                return str(e)

        lat, wall, errors = closed_loop(c, total, one)
        if errors:
            raise SystemExit(f"{c} clients: {len(errors)} errors, first: {errors[0]}")
        return summarize(lat, wall) | {"load_avg": round(os.getloadavg()[0], 2)}

    results["torch_threads"] = baselines
    for c in levels:
        before = requests.get(f"{url}/health", timeout=60).json()["generator"]
        results["serve"][c] = measure(c, http_one)
        after = requests.get(f"{url}/health", timeout=60).json()["generator"]
        batches = after["batches"] - before["batches"]
        results["serve"][c] |= {"mean_batch": round((after["requests"] - before["requests"]) / max(1, batches), 2),
                                "replica_decode_s": round(after["decode_seconds"] - before["decode_seconds"], 3)}
        say(f"serve                     {c:>2} clients: {results['serve'][c]}")
        for name, threads in baselines.items():
            torch.set_num_threads(threads)
            results.setdefault(name, {})[c] = measure(c, local_one)
            say(f"{name + f' ({threads} thr)':<25} {c:>2} clients: {results[name][c]}")
    serve.shutdown()
    ray.shutdown()

    print()
    print(f"torch threads: serving replica {baselines['in_process']}, in-process {baselines['in_process']} "
          f"and {baselines['in_process_all_threads']} (all)")
    print(f"{'clients':>7} | {'serve req/s':>11} {'p50 ms':>7} {'p99 ms':>7} | {'in-proc req/s':>13} {'p50 ms':>7} "
          f"{'p99 ms':>7} | {'ratio':>5} | {'in-proc all thr':>15} {'ratio':>5}")
    for c in levels:
        s, b, a = results["serve"][c], results["in_process"][c], results["in_process_all_threads"][c]
        ratio, ratio_all = s["req_per_s"] / b["req_per_s"], s["req_per_s"] / a["req_per_s"]
        results.setdefault("ratio_req_per_s", {})[c] = round(ratio, 3)
        results.setdefault("ratio_req_per_s_all_threads", {})[c] = round(ratio_all, 3)
        print(f"{c:>7} | {s['req_per_s']:>11.2f} {s['p50_ms']:>7.1f} {s['p99_ms']:>7.1f} | {b['req_per_s']:>13.2f} "
              f"{b['p50_ms']:>7.1f} {b['p99_ms']:>7.1f} | {ratio:>4.2f}x | {a['req_per_s']:>15.2f} {ratio_all:>4.2f}x")
    out = work / "bench_serve.json"
    out.write_text(json.dumps(results, indent=2))
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
