"""Same corpus, two versions of the code: every file the data stages write must be identical.

Builds a small project twice with ``retro-ray pipeline`` (prep → db → embed → index → query) and then
``retro-ray add-docs``, once with the code of a git commit (``--against``, default ``HEAD``) and once
with the working tree this script lives in (a copy of its ``retro_ray/``; or ``--ours <commit>``), on the same corpus, and compares
the two project directories:

* every file must exist in both and be identical byte for byte: token datasets (.bin/.idx, doc ids,
  docs.parquet, the split), tokenizer.json, db/merged/*.hdf5, embeddings (.npy, layout.json), the
  Faiss index files (empty, shards, merged), the query neighbours (.npy, meta.json), config.json,
  and add-docs' store (tokens, embeddings, chunk rows, document table);
* files that hold times, process ids or node ids are compared without them: the stage markers
  (.stages/<stage>.json: finished_at, timings, ``*_by_node`` and ``*_per_s`` counts left out; the
  output paths compared relative to the project), add-docs' CURRENT.json (committed_at) and the
  index's added_docs.json (finished_at);
* the `add-docs` reports printed by the CLI must list the same counts;
* ``data/samples/`` (the cached sample order, recomputed when absent) is a cache, not an output, and
  is left out.

Each version runs in a subprocess with PYTHONPATH set to its own tree (a ``git archive`` of the commit
in a temporary directory) and a Ray cluster of its own. The baseline project is kept under ``--work``
(default ``benchmarks/out/same_outputs``) and reused by later runs against the same commit, since a
commit's outputs do not change; ``--fresh`` rebuilds it.

    python benchmarks/check_same_outputs.py --against abcf1c4
    python benchmarks/check_same_outputs.py --against HEAD~1 --docs 200

Exit status 0 when the outputs are the same, 1 when they differ (the differences are listed).
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["tokenizer.vocab_size=1024", "split=90,10,0", "seq_length=256", "chunk_length=64",
            "query.num_neighbors_query=20", "query.num_neighbors_save=4", "query.train_samples=60",
            "index.num_shards=2", "index.index_str=IVF8,Flat"]  # IVF: index-train runs k-means
# Small blocks, so that every stage has several blocks (and resumable pieces) to put together.
BLOCKS = ["prep.docs_per_block=40", "db.docs_per_block=30", "embed.chunks_per_block=128", "query.samples_per_block=16"]
# Caches, not outputs: the sample order (data/samples/, recomputed when absent) is left out, so that a
# version that writes it compares with one that does not.
CACHES = ("data/samples/",)
# Report counts that hold node ids or rates: they differ from run to run by nature.
VOLATILE_COUNTS = ("_by_node", "_per_s")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def resolve(commit: str) -> str:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"check_same_outputs: {commit!r} is not a commit of {REPO}: {r.stderr.strip()}")
    return r.stdout.strip()


def export_tree(commit: str, dest: Path) -> Path:
    """The package of ``commit`` (git archive) in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "retro_ray"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def write_corpus(path: Path, first: int, count: int) -> Path:
    """``count`` documents of the bundled default corpus from document ``first`` on, as JSONL."""
    sys.path.insert(0, str(REPO))
    from retro_ray.config import CorpusConfig
    from retro_ray.corpus import IngestStats, iter_raw_documents

    rows = []
    for i, (title, text) in enumerate(iter_raw_documents(CorpusConfig(), IngestStats())):
        if i >= first + count:
            break
        if i >= first:
            rows.append({"title": title, "text": text})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def run_cli(tree: Path, args: list[str], log: Path) -> str:
    """``python -m retro_ray.cli ARGS`` with the code of ``tree`` and a Ray cluster of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tree)
    with tempfile.TemporaryDirectory(prefix="rrs-", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
        env["RAY_TMPDIR"] = ray_tmp
        r = subprocess.run([sys.executable, "-m", "retro_ray.cli", *args], cwd=tree, env=env,
                           capture_output=True, text=True)
    with open(log, "a") as f:
        f.write(f"$ retro-ray {' '.join(args)}\n{r.stdout}\n{r.stderr}\n")
    if r.returncode != 0:
        sys.exit(f"check_same_outputs: `retro-ray {' '.join(args)}` with {tree} failed (exit {r.returncode}); "
                 f"see {log}:\n{r.stderr[-3000:]}")
    return r.stdout


def build(tree: Path, root: Path, corpus: Path, added: Path) -> None:
    """The pipeline, then add-docs, into ``root/proj``; the CLI's add-docs report in ``root/add_docs.txt``."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    log = root / "log.txt"
    t0 = time.perf_counter()
    run_cli(tree, ["pipeline", "--project-dir", str(root / "proj"), "--no-progress", f"corpus.path={corpus}",
                   *SETTINGS, *BLOCKS], log)
    t1 = time.perf_counter()
    out = run_cli(tree, ["add-docs", "--project-dir", str(root / "proj"), str(added), "--no-progress"], log)
    (root / "add_docs.txt").write_text(_report_counts(out))
    (root / "DONE").write_text(f"pipeline {t1 - t0:.1f} s, add-docs {time.perf_counter() - t1:.1f} s\n")
    say(f"  pipeline {t1 - t0:.1f} s, add-docs {time.perf_counter() - t1:.1f} s")


def _report_counts(printed: str) -> str:
    """The lines of a printed Report without its timings and output paths."""
    return "\n".join(ln for ln in printed.splitlines() if "(s)" not in ln and "->" not in ln) + "\n"


def _marker(path: Path) -> dict:
    d = json.loads(path.read_text())
    d.pop("finished_at", None)
    d.pop("timings", None)
    d["counts"] = {k: v for k, v in d.get("counts", {}).items() if not k.endswith(VOLATILE_COUNTS)}
    d["outputs"] = [re.sub(r"^.*/proj(?=/|$)", "<project>", o) for o in d.get("outputs", [])]  # the project's own path
    return d


def _without_time(path: Path) -> dict:
    d = json.loads(path.read_text())
    d.pop("committed_at", None)
    d.pop("finished_at", None)
    return d


def compare(a: Path, b: Path) -> tuple[int, list[str]]:
    """(files compared, differences) between two project directories."""
    def files(root: Path) -> set[str]:
        rels = (str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return {r for r in rels if not r.startswith(CACHES)}

    fa, fb = files(a), files(b)
    problems = [f"only in {a}: {f}" for f in sorted(fa - fb)] + [f"only in {b}: {f}" for f in sorted(fb - fa)]
    for rel in sorted(fa & fb):
        pa, pb = a / rel, b / rel
        if rel.startswith(".stages/"):
            same = _marker(pa) == _marker(pb)
        elif rel == "db/added/CURRENT.json" or rel.endswith("/added_docs.json"):
            same = _without_time(pa) == _without_time(pb)
        elif rel == "db/added/.lock":
            same = True  # an empty lock file
        else:
            same = filecmp.cmp(pa, pb, shallow=False)
        if not same:
            problems.append(f"differs: {rel}")
    return len(fa & fb), problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="HEAD", help="the commit whose outputs are the reference (default HEAD)")
    ap.add_argument("--ours", help="a commit to check instead of the working tree")
    ap.add_argument("--docs", type=int, default=160, help="corpus documents (default 160)")
    ap.add_argument("--added-docs", type=int, default=12, help="documents for add-docs (default 12)")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "out" / "same_outputs")
    ap.add_argument("--fresh", action="store_true", help="rebuild the baseline project even if one is kept")
    args = ap.parse_args()

    against = resolve(args.against)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(work / f"corpus_{args.docs}.jsonl", 0, args.docs)
    added = write_corpus(work / f"added_{args.docs}_{args.added_docs}.jsonl", args.docs, args.added_docs)
    settings = hashlib.sha256(json.dumps([SETTINGS, BLOCKS]).encode()).hexdigest()[:8]
    key = f"{args.docs}_{args.added_docs}_{settings}"

    base = work / f"baseline_{against[:12]}_{key}"
    if args.fresh or not (base / "DONE").is_file():
        with tempfile.TemporaryDirectory(prefix="same-outputs-") as tmp:
            tree = export_tree(against, Path(tmp) / "tree")
            say(f"baseline: {against[:12]} ({args.docs} documents, then {args.added_docs} added)")
            build(tree, base, corpus, added)
    else:
        say(f"baseline: {against[:12]}, kept in {base}")

    ours = work / f"ours_{key}"
    with tempfile.TemporaryDirectory(prefix="same-outputs-") as tmp:
        if args.ours:
            commit = resolve(args.ours)
            tree, label = export_tree(commit, Path(tmp) / "tree"), commit[:12]
        else:  # a copy, so that edits made while it runs do not mix into this build
            tree, label = Path(tmp) / "tree", f"working tree {REPO}"
            shutil.copytree(REPO / "retro_ray", tree / "retro_ray", ignore=shutil.ignore_patterns("__pycache__"))
        say(f"ours: {label}")
        build(tree, ours, corpus, added)

    n, problems = compare(base / "proj", ours / "proj")
    if (base / "add_docs.txt").read_text() != (ours / "add_docs.txt").read_text():
        problems.append("the add-docs reports differ: " + str(base / "add_docs.txt") + " vs " + str(ours / "add_docs.txt"))
    if problems:
        say(f"DIFFERENT: {len(problems)} of {n} files differ from {against[:12]}'s:")
        for p in problems:
            print("  " + p)
        return 1
    say(f"SAME: all {n} files the stages wrote are identical to {against[:12]}'s "
        "(stage markers, CURRENT.json and added_docs.json without their times and node ids)")
    shutil.rmtree(ours, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
