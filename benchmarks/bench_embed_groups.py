"""What batch-invariant embedding costs: fixed groups of chunk ids against length-sorted blocks.

Both sides embed the same chunks (the first ``--chunks`` of a project's db/merged/train.hdf5), with
the same ``Embedder`` (the project's model, ``--precision``, batch 64), in this process, torch on one
thread (as an embed actor runs it):

    groups   ``Embedder.embed_groups(block, 1024)``: consecutive groups of 16 × 64 chunk ids, each
             sorted by length and cut into batches of 64. What the embed stage does since it became
             independent of run settings.
    sorted   ``Embedder.embed(block)`` on blocks of ``--block`` chunks: the block is sorted by length
             and cut into batches of 64, so batches of similar length pad little, but a chunk's
             batch (and so its last bits) follows the block size. What the stage did before.

Rounds alternate the order (groups, sorted / sorted, groups); the ratio of median rates is printed,
with the padded share of the tokens each side computes (the cause of any difference).

Run:  .venv/bin/python benchmarks/bench_embed_groups.py --project runs/demo [--chunks 4096] [--repeat 3]
--project must have finished `db`. Writes results/bench_embed_groups.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from benchlib import Region, say

BATCH = 64


def padded_share(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Padding tokens / all tokens computed, for batches given as index arrays into ``lengths``."""
    real = sum(int(lengths[b].sum()) for b in batches)
    total = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - real / total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", default="runs/demo", help="a project that has finished `db` (only read)")
    ap.add_argument("--chunks", type=int, default=4096)
    ap.add_argument("--block", type=int, default=2048, help="block size of the sorted side (embed.chunks_per_block)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_embed_groups.json"))
    args = ap.parse_args()

    import h5py
    import torch

    from retro_ray.embedder import Embedder, EmbedderConfig, group_size
    from retro_ray.indexed import IndexedDataset
    from retro_ray.project import Project
    from retro_ray.retrieval.chunks import decode_chunks
    from retro_ray.tokenizer import load_tokenizer

    project = Project(args.project)
    pcfg = project.read_config()
    with h5py.File(project.merged_db_path("train"), "r") as f:
        rows = f["chunks"][:args.chunks]
    texts = decode_chunks(IndexedDataset(project.token_prefix("train")), rows, load_tokenizer(project.tokenizer_path))
    torch.set_num_threads(1)
    e = Embedder(EmbedderConfig(model_dir=pcfg.embedder.model_dir, max_chunk_length=pcfg.embedder.max_chunk_length,
                                batch_size=BATCH, precision=args.precision, device="cpu"))
    group = group_size(BATCH)
    say(f"{len(texts)} chunks of {project.root}; precision {e.precision} ({e.precision_reason}); torch 1 thread")

    lengths = np.array([len(x) for x in e.tokenize(texts)])
    def batches(unit: int) -> list[np.ndarray]:  # what Embedder.embed makes of units of `unit` chunks
        out = []
        for lo in range(0, len(texts), unit):
            idx = np.arange(lo, min(lo + unit, len(texts)))
            idx = idx[np.argsort(-lengths[idx], kind="stable")]
            out += [idx[a:a + BATCH] for a in range(0, len(idx), BATCH)]
        return out

    pad = {"groups": padded_share(lengths, batches(group)), "sorted": padded_share(lengths, batches(args.block))}
    for mult in (1, 4, 16, 32):
        say(f"padded share with groups of {mult} x {BATCH}: {padded_share(lengths, batches(mult * BATCH)):.3f}")
    say(f"padded share of computed tokens: groups {pad['groups']:.3f}, sorted {pad['sorted']:.3f}")

    def run(name: str) -> float:
        with Region(name) as r:
            if name == "groups":
                e.embed_groups(texts, group)
            else:
                for lo in range(0, len(texts), args.block):
                    e.embed(texts[lo:lo + args.block])
        say(f"{name:7s} {len(texts) / r.seconds:7.1f} chunks/s | {r.line()}")
        return len(texts) / r.seconds

    e.embed(texts[:BATCH])  # warm-up
    rates: dict[str, list[float]] = {"groups": [], "sorted": []}
    for rnd in range(args.repeat):
        for name in (("groups", "sorted") if rnd % 2 == 0 else ("sorted", "groups")):
            rates[name].append(run(name))
    med = {k: float(np.median(v)) for k, v in rates.items()}
    ratio = med["groups"] / med["sorted"]
    print(f"\nembed groups benchmark: {len(texts)} chunks, {e.precision}, {args.repeat} rounds, medians")
    print(f"  groups of {group} chunk ids (invariant) {med['groups']:7.1f} chunks/s  (padding {pad['groups']:.1%})")
    print(f"  blocks of {args.block} sorted by length       {med['sorted']:7.1f} chunks/s  (padding {pad['sorted']:.1%})")
    print(f"  RATIO groups / sorted {ratio:.3f}")
    out = {"chunks": len(texts), "precision": e.precision, "block": args.block, "batch": BATCH, "rates": rates,
           "median": med, "ratio": ratio, "padded_share": pad, "group": group, "when": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"  wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
