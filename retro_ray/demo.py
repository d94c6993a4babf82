"""`retro-ray demo` (`make demo`): the whole system on the default corpus, sized for a 2-core laptop.

    1. pipeline   prep → db → embed → index → query (conf/demo.yaml; about 0.5 % of the documents are
                  held out of training and of the database, in data/heldout.jsonl)
    2. train      a small RETRO (conf/train_demo.yaml) and its GPT baseline: the same decoder, steps
                  and data, retrieval off; then RETRO-fitting (conf/train_retrofit.yaml): the GPT
                  baseline's decoder, frozen, with a new encoder and CCA trained for the same steps
    3. export     model.pt, model-gpt.pt and model-retrofit.pt
    4. eval       perplexity / bits-per-byte of RETRO and of the RETRO-fit against the GPT baseline,
                  with the neighbour controls (another sample's, an oracle) and In-Context RALM on
                  the GPT, at k = 1, 2, 4, the leakage-filtered curve, and the knowledge update:
                  held-out documents before and after `add-docs` (eval/ and eval-retrofit/)
    5. serve      the Ray Serve app on localhost:8000, one sample request; it keeps answering until
                  Ctrl-C (or stops at once with --stop)

Every step is one `retro-ray` command (printed before it runs), on one local Ray cluster started
here; each is skipped or resumed when its outputs are already there, so a rerun is quick. The
timings of every step are printed at the end and written to <project>/demo_report.json.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import field
from pathlib import Path

from retro_ray.config import config_class, shipped_config_dir
from retro_ray.errors import RetroRayError


@config_class
class DemoConfig:
    train_steps: int = field(default=120, metadata={"help": "Optimizer steps for RETRO, the GPT baseline and the RETRO-fit."})
    retrofit_lr: float = field(
        default=1.0e-3,
        metadata={"help": "Learning rate of the RETRO-fit: the demo RETRO's, for a like-for-like budget (the paper's "
                          "2e-4, conf/train_retrofit.yaml, is for runs of thousands of steps)."},
    )
    eval_samples: int = field(default=64, metadata={"help": "Validation samples the evaluation scores."})
    port: int = field(default=8000, metadata={"help": "HTTP port of the Serve app."})


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "retro_ray.cli", *args]


class Demo:
    def __init__(self, project_dir: Path, cfg: DemoConfig, *, stop: bool = False, serve: bool = True,
                 progress: bool = True) -> None:
        self.p = project_dir
        self.cfg = cfg
        self.stop = stop
        self.serve_app = serve
        self.progress = progress
        self.timings: dict[str, float] = {}

    def run_step(self, name: str, cmd: list[str]) -> None:
        shown = " ".join(shlex.quote(c) for c in (["retro-ray", *cmd[3:]] if cmd[:3] == _cli() else cmd))
        print(f"\n== [{name}] {shown}", flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=os.environ.copy())
        self.timings[name] = round(time.perf_counter() - t0, 1)
        if r.returncode != 0:
            raise RetroRayError(f"demo step {name!r} failed (exit {r.returncode}); its output is above. Fix it and "
                                f"rerun `make demo`: finished steps are skipped.")

    def train(self, name: str, exp: Path, *extra: str, config: str = "demo") -> None:
        self.run_step(name, _cli("train", "--project-dir", str(self.p), "--exp-dir", str(exp), "--config", config,
                                 f"trainer.max_steps={self.cfg.train_steps}",
                                 f"trainer.val_check_interval={max(1, self.cfg.train_steps // 3)}",
                                 f"trainer.checkpoint_interval={self.cfg.train_steps}", *extra))

    def export(self, name: str, exp: Path, out: Path) -> None:
        report = exp / "train_report.json"
        if out.is_file() and report.is_file() and out.stat().st_mtime > report.stat().st_mtime:
            print(f"\n== [{name}] {out} is newer than the training run: kept", flush=True)
            self.timings[name] = 0.0
            return
        self.run_step(name, _cli("export", "--exp-dir", str(exp), "--out", str(out)))

    def main(self) -> int:
        t_start = time.perf_counter()
        if not os.environ.get("RAY_ADDRESS"):
            import ray

            from retro_ray.runtime import connect

            # One cluster for every step (each would otherwise start and stop its own), on loopback.
            connect(None, progress=self.progress)
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
            print(f"== local Ray cluster at {os.environ['RAY_ADDRESS']}", flush=True)
        no_progress = [] if self.progress else ["--no-progress"]
        self.run_step("pipeline", _cli("pipeline", "--project-dir", str(self.p), "--config",
                                       str(shipped_config_dir() / "demo.yaml"), *no_progress))
        self.train("train-retro", self.p / "exp")
        self.train("train-gpt", self.p / "exp-gpt", "model.retro.enabled=false", "exp_manager.name=gpt")
        self.export("export-gpt", self.p / "exp-gpt", self.p / "model-gpt.pt")
        self.train("train-retrofit", self.p / "exp-retrofit", f"model.init_from={self.p / 'model-gpt.pt'}",
                   f"model.optim.lr={self.cfg.retrofit_lr}", f"model.optim.sched.min_lr={self.cfg.retrofit_lr / 10}",
                   config="retrofit")
        self.export("export-retro", self.p / "exp", self.p / "model.pt")
        self.export("export-retrofit", self.p / "exp-retrofit", self.p / "model-retrofit.pt")
        results = {}
        for name, exp, out in (("eval", "exp", "eval"), ("eval-retrofit", "exp-retrofit", "eval-retrofit")):
            self.run_step(name, _cli("eval", "--project-dir", str(self.p), "--exp-dir", str(self.p / exp),
                                     "--baseline", str(self.p / "exp-gpt"), "--heldout",
                                     str(self.p / "data" / "heldout.jsonl"), "--out", str(self.p / out),
                                     f"max_samples={self.cfg.eval_samples}"))
            results[name] = json.loads((self.p / out / "results.json").read_text())
        self.timings["total_before_serve"] = round(time.perf_counter() - t_start, 1)
        summary = {"project_dir": str(self.p), "timings_s": self.timings, "results": results["eval"],
                   "results_retrofit": results["eval-retrofit"]}
        (self.p / "demo_report.json").write_text(json.dumps(summary, indent=1))
        self.print_summary(results["eval"], results["eval-retrofit"])
        return self.serve() if self.serve_app else 0

    def print_summary(self, results: dict, retrofit: dict) -> None:
        print("\n== demo: what was done, and where it is", flush=True)
        rows = [("project (data, index, neighbours)", self.p), ("RETRO run / model", f"{self.p / 'exp'} / {self.p / 'model.pt'}"),
                ("GPT baseline run / model", f"{self.p / 'exp-gpt'} / {self.p / 'model-gpt.pt'}"),
                ("RETRO-fit run / model", f"{self.p / 'exp-retrofit'} / {self.p / 'model-retrofit.pt'}"),
                ("evaluation reports", f"{self.p / 'eval' / 'report.md'}, {self.p / 'eval-retrofit' / 'report.md'}"),
                ("timings", self.p / "demo_report.json")]
        for what, where in rows:
            print(f"  {what:<36} {where}")
        print("== timings (s): " + ", ".join(f"{k} {v}" for k, v in self.timings.items()))
        def fmt(key: str, r: dict = results) -> str:
            v = r.get(key)
            return "n/a" if v is None else f"{v:.2f}"

        print("== headline figures (validation split, the same tokens for every figure):")
        print(f"  perplexity: RETRO {fmt('retro_ppl')}, RETRO with retrieval off {fmt('retro_off_ppl')}, "
              f"GPT baseline {fmt('gpt_ppl')}")
        print(f"  perplexity: RETRO-fit of the GPT baseline {fmt('retro_ppl', retrofit)}, with retrieval off "
              f"{fmt('retro_off_ppl', retrofit)} (its frozen decoder: the GPT's own)")
        for name, r in (("RETRO", results), ("RETRO-fit", retrofit)):
            print(f"  controls, {name}: another sample's neighbours {fmt('retro_other_ppl', r)}, an oracle neighbour (the "
                  f"chunk's own continuation) {fmt('retro_oracle_ppl', r)}, its own {fmt('retro_ppl', r)}")
        print(f"  In-Context RALM (the GPT baseline reading the same neighbours as text): {fmt('in_context_ppl')}")
        print(f"  held-out documents: perplexity {fmt('knowledge_update_before_ppl')} before add-docs, "
              f"{fmt('knowledge_update_after_ppl')} after (no retraining); RETRO-fit "
              f"{fmt('knowledge_update_before_ppl', retrofit)} -> {fmt('knowledge_update_after_ppl', retrofit)}")
        for goal in (results.get("goals") or {}).values():
            value = "n/a" if goal["value"] is None else f"{goal['value']:.3f}"
            verdict = {True: "met", False: "MISSED", None: "not measured"}[goal["met"]]
            print(f"  {verdict:>12}: {goal['goal']}: {value}")

    def serve(self) -> int:
        import requests
        from ray import serve

        from retro_ray.serve.app import serve_main
        from retro_ray.serve.config import ServeConfig

        print(f"\n== [serve] retro-ray serve --project-dir {self.p} --checkpoint {self.p / 'model.pt'} port={self.cfg.port}",
              flush=True)
        t0 = time.perf_counter()
        url = serve_main(str(self.p / "model.pt"), str(self.p), ServeConfig(port=self.cfg.port), blocking=False)
        # A prompt from a document the model never saw and the database only has since the eval's add-docs:
        # its neighbours should come from that document.
        held = self.p / "data" / "heldout.jsonl"
        title, prompt = "", "The Battle of Hastings"
        if held.is_file() and held.stat().st_size:
            doc = json.loads(held.read_text(encoding="utf-8").splitlines()[0])
            title, prompt = doc["title"], " ".join(doc["text"].split()[:12])
        sample = {"prompt": prompt, "tokens_to_generate": 32, "greedy": True}
        print(f"== sample request: curl -s {url}/generate -d '{json.dumps(sample)}'", flush=True)
        out = requests.post(f"{url}/generate", json=sample, timeout=300)
        self.timings["serve_first_answer"] = round(time.perf_counter() - t0, 1)
        gen = out.json()["generations"][0] if out.ok else out.json()
        if out.ok:
            print(f"  generated: {gen['text']!r} ({gen['finish_reason']})")
            for ev in gen["retrievals"][:3]:
                print(f"  neighbours read from token {ev['position']}: "
                      + "; ".join(f"[{n['title']}] {' '.join(n['text'].split())[:60]}" for n in ev["neighbors"]))
            if title:
                used = any(n["title"] == title for ev in gen["retrievals"] for n in ev["neighbors"])
                print(f"  the prompt comes from the held-out document {title!r}, added by add-docs after training: "
                      f"{'its chunks were retrieved' if used else 'its chunks were NOT among the neighbours'}")
        else:
            print(f"  the app answered {out.status_code}: {gen}")
        if self.stop:
            serve.shutdown()
            return 0 if out.ok else 1
        print(f"\n== the app is answering at {url} (OpenAPI docs at {url}/docs); Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
        return 0
