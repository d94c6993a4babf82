"""The numbers of cluster/PLAN.md: a 2 T-token database and RETRO training, from measured rates.

Inputs, all measured in this repository (the file each comes from is printed beside its use):

* ``results/bench_scaling.json`` (bench_scaling.py): CPU-seconds per item of prep, db, embed,
  index-add and query, as the *marginal* cost between two corpus sizes (fixed costs such as Ray's
  start-up cancel out), and one thread's cost of one product-quantised code distance in a search;
* ``results/bench_index_train_*.json`` (bench_index_train.py): the FLOP/s the IVF k-means reaches,
  on this CPU and on an H200;
* ``results/gpu_model_bench_h100_compile_sweep.json`` (gpu_model_bench.py): the MFU of a
  RETRO-125M training step in bf16 on an H100;
* the shipped configs ``train_{148m,410m,1.5b,9.5b}.yaml`` through ``retro-ray train --dry-run``'s
  model (parameters, FLOPs per token, memory per GPU).

Everything else is arithmetic, and the model of each cost is stated where it is used.

    .venv/bin/python benchmarks/plan_cluster.py [--tokens 2e12] [--target-hours 24] > /tmp/plan.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BF16_PEAK = 989e12          # dense bf16 FLOP/s of an H100 / H200 (NVIDIA's data sheet), as gpu_model_bench uses
KMEANS_ITERS = 10           # retro_ray.retrieval.kmeans: the IVF k-means' iterations
GiB, TB = 1024**3, 1e12


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def marginal(small: dict, large: dict) -> float:
    """CPU-seconds per item between two sizes: what one more item costs, fixed costs excluded."""
    return (large["cpu_s"] - small["cpu_s"]) / max(1, large["items"] - small["items"])


def fmt(x: float, digits: int = 3) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1e15 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:,.{max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=float, default=2e12, help="tokens in the retrieval database (default 2e12)")
    ap.add_argument("--train-tokens", type=float, default=None,
                    help="training tokens, whose chunks the query stage searches (default: one pass over the database)")
    ap.add_argument("--target-hours", type=float, default=24.0, help="wall-clock per data stage to size nodes for")
    ap.add_argument("--cores-per-node", type=int, default=16, help="CPU worker node size (cluster/aws.yaml: 16)")
    ap.add_argument("--node-memory-gib", type=float, default=64.0, help="memory of a CPU worker node (m6i.4xlarge: 64)")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0)
    ap.add_argument("--train-days", type=float, default=30.0, help="wall-clock of a training run to size GPUs for")
    ap.add_argument("--scaling", default="bench_scaling.json")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from retro_ray.retrieval.index import FAISS_MIN_POINTS_PER_CENTROID, choose_index_string

    sc = load(args.scaling)
    sizes = sorted(sc["sizes"].values(), key=lambda s: s["corpus"]["copies"])

    def having(stage: str) -> list[dict]:
        return [s for s in sizes if stage in s["stages"]]

    def pair(stage: str) -> tuple[dict, dict]:
        """The stage's rows at the two largest sizes that measured it (the marginal cost between them)."""
        h = having(stage)
        return h[-2]["stages"][stage], h[-1]["stages"][stage]

    small = sizes[0]
    large = [s for s in sizes if "scan" in s][-1]  # the largest size that ran every stage
    S, L = small["stages"], large["stages"]
    chunk, dim = 64, 384
    T = args.tokens
    N = T / chunk                                     # database chunks = vectors
    Q = (args.train_tokens or T) / chunk              # query chunks
    index_str = choose_index_string(int(N), dim)
    nlist = int(index_str.split("IVF")[1].split("_")[0])
    m_pq = int(index_str.rsplit("PQ", 1)[1])
    d_opq = int(index_str.split("_")[1].split(",")[0])
    ntrain = nlist * FAISS_MIN_POINTS_PER_CENTROID
    tokens_per_byte = large["stages"]["prep"]["items"] / large["corpus"]["text_bytes"]
    scan = large["scan"]
    out = []
    p = out.append

    p("## Inputs\n")
    p(f"- database: {T:.3g} tokens = **{N / 1e9:,.2f} B chunks** of {chunk} tokens; query chunks (training "
      f"tokens / {chunk}): {Q / 1e9:,.2f} B")
    p(f"- measured sizes (bench_scaling.json): {small['corpus']['copies']}x and {large['corpus']['copies']}x "
      f"the default corpus ({small['corpus']['text_bytes'] / 1e6:.1f} and {large['corpus']['text_bytes'] / 1e6:.1f} MB "
      f"of text, {S['db']['items']:,} and {L['db']['items']:,} chunks; prep, db and embed also at "
      f"{sizes[-1]['corpus']['copies']}x), machine with {sc['machine']['cpus']} cores, "
      f"index `{sc['index_str']}` at both sizes")
    p(f"- auto index for {N / 1e9:.2f} B vectors of {dim} dims: `{index_str}`")
    p("")

    # ---------------------------------------------------------------- storage
    emb_bytes = N * dim * 4
    idx_bytes = N * (m_pq + 8) + nlist * d_opq * 4
    p("## Storage\n")
    p("| what | per chunk | at the database size |")
    p("|---|---|---|")
    text_tb = T / tokens_per_byte / TB
    p(f"| text (docs.parquet), {1 / tokens_per_byte:.2f} bytes a token (measured, 8k BPE) | "
      f"{chunk / tokens_per_byte:.0f} B | {text_tb:,.1f} TB |")
    p(f"| token files, 2 bytes a token (vocabulary < 65,536; 4 above) | {2 * chunk} B | {T * 2 / TB:,.1f} TB |")
    p(f"| chunk table db/merged/train.hdf5, uint32 [n, 5] | 20 B | {N * 20 / TB:,.2f} TB |")
    p(f"| embeddings, float32 x {dim} | {dim * 4:,} B | {emb_bytes / TB:,.1f} TB |")
    p(f"| index `{index_str}`: {m_pq}-byte code + 8-byte id, plus {nlist:,} centroids | {m_pq + 8} B | {idx_bytes / TB:,.2f} TB |")
    p(f"| measured index bytes a vector at {scan['vectors']:,} vectors (`{sc['index_str']}`, its lists and "
      f"quantizer included) | {scan['bytes_per_vector']:.1f} B | |")
    p("")

    # ---------------------------------------------------------------- CPU stages
    rows = []
    # prep and db: the smaller size's whole cost per item, Ray's start-up included (an upper bound). Not
    # the marginal cost: the larger corpus repeats the smaller one's text, and the BPE tokenizer's and
    # db's per-word caches make repeated words nearly free, which would flatter it.
    for stage, unit, items in (("prep", "token", T), ("db", "chunk", N)):
        c = S[stage]["cpu_s"] / S[stage]["items"]
        rows.append((stage, unit, c, items, c * items,
                     f"bench_scaling {stage} at {small['corpus']['copies']}x, whole cost / items (marginal: "
                     f"{marginal(S[stage], L[stage]):.2e}, flattered by the repeated text)"))
    a, b = pair("embed")
    c = marginal(a, b)
    rows.append(("embed", "chunk", c, N, c * N, f"bench_scaling embed, marginal between {a['items']:,} and {b['items']:,} chunks"))
    # index-add: the measured marginal cost a vector, plus the coarse assignment's growth with nlist (HNSW:
    # ~log nlist), plus OPQ and PQ encoding, which do not grow.
    c_add = marginal(S["index-add"], L["index-add"])
    coarse_meas = scan["quantization_s_per_query"]
    coarse_at = coarse_meas * math.log2(nlist) / math.log2(max(2, scan["nlist"]))
    c_add_at = c_add + (coarse_at - coarse_meas)
    rows.append(("index-add", "chunk", c_add_at, N, c_add_at * N,
                 f"bench_scaling marginal {c_add * 1e6:.0f} us + HNSW coarse step x log(nlist) "
                 f"({coarse_meas * 1e6:.0f} -> {coarse_at * 1e6:.0f} us)"))
    # query: the measured marginal cost a query chunk less its measured search, plus the search at the
    # database size: coarse step + nprobe x (N / nlist) code distances x the measured cost of one.
    c_q = marginal(S["query"], L["query"])
    nprobe = scan["nprobe"]
    dist_at = nprobe * N / nlist
    search_at = coarse_at + dist_at * scan["ns_per_distance"] * 1e-9
    c_q_at = c_q - scan["s_per_query"] + search_at
    rows.append(("query", "query chunk", c_q_at, Q, c_q_at * Q,
                 f"bench_scaling marginal {c_q * 1e3:.2f} ms - measured search {scan['s_per_query'] * 1e3:.2f} ms + "
                 f"search at size {search_at * 1e3:.1f} ms ({dist_at:,.0f} distances x {scan['ns_per_distance']:.1f} ns)"))
    # index-train: k-means FLOPs at the FLOP/s measured on the H200 (one task: one node, one GPU)
    kt = load("bench_index_train_h200.json")
    kt_flops = 2 * kt["n_train"] * int(kt["index_str"].split("IVF")[1].split("_")[0]) * kt["dim"] * KMEANS_ITERS
    gpu_kmeans_rate = kt_flops / kt["torch_s"]
    train_flops = 2 * ntrain * nlist * d_opq * KMEANS_ITERS
    cpu_kt = load("bench_index_train_cpu_160k.json")
    cpu_flops = 2 * cpu_kt["n_train"] * int(cpu_kt["index_str"].split("IVF")[1].split("_")[0]) * cpu_kt["dim"] * KMEANS_ITERS
    cpu_rate_per_core = cpu_flops / cpu_kt["torch_s"] / cpu_kt["faiss_threads"]

    p(f"## Data stages: CPU work and nodes for {args.target_hours:g} h each\n")
    p(f"Node = {args.cores_per_node} cores. Rates are CPU-seconds of the stage's whole process tree (driver, Ray, "
      "workers) per item, so they include Ray's own work; a cluster keeps its cores about as busy as the "
      "2-core run did (Ray Data streams blocks to every free CPU).\n")
    p("| stage | CPU-s per item | items | core-hours | nodes for the target | where the rate comes from |")
    p("|---|---|---|---|---|---|")
    totals = {}
    for stage, unit, c, items, total, src in rows:
        core_h = total / 3600
        nodes = core_h / (args.cores_per_node * args.target_hours)
        totals[stage] = core_h
        p(f"| {stage} | {fmt(c)} s a {unit} | {items / 1e9:,.2f} B | {core_h:,.0f} | {math.ceil(nodes):,} | {src} |")
    gpu_h = train_flops / gpu_kmeans_rate / 3600
    cpu_h = train_flops / cpu_rate_per_core / 3600
    p(f"| index-train | {train_flops:.2e} FLOPs of k-means ({ntrain / 1e6:,.1f} M points = 39 x {nlist:,} lists, "
      f"{d_opq} dims after OPQ, {KMEANS_ITERS} iterations) | 1 task | {cpu_h:,.0f} on CPU cores / **{gpu_h:,.1f} GPU-hours** | "
      f"one GPU node: {gpu_h:,.1f} h | k-means FLOP/s measured: {gpu_kmeans_rate / 1e12:.1f} T on an H200 "
      f"(bench_index_train_h200.json), {cpu_rate_per_core / 1e9:.0f} G per CPU core (bench_index_train_cpu_160k.json) |")
    p("")
    fastest = max(totals, key=totals.get)
    p(f"Largest cost: **{fastest}** ({totals[fastest]:,.0f} core-hours, "
      f"{totals[fastest] / sum(totals.values()):.0%} of the CPU stages).\n")

    # the query stage's levers: fewer query chunks, more lists (fewer distances per query, more k-means)
    base_other = c_q - scan["s_per_query"]
    p("The query stage's cost is almost all code distances. Its levers, each computed with the same rates:\n")
    p("| variant | distances a query | query core-hours | index-train k-means |")
    p("|---|---|---|---|")
    for label, lists, q in (("as above", nlist, Q), (f"4x the lists ({4 * nlist:,})", 4 * nlist, Q),
                            ("neighbours for a fifth of the database's tokens", nlist, Q / 5),
                            ("both", 4 * nlist, Q / 5)):
        d = nprobe * N / lists
        per_q = base_other + coarse_meas * math.log2(lists) / math.log2(max(2, scan["nlist"])) + d * scan["ns_per_distance"] * 1e-9
        kfl = 2 * lists * FAISS_MIN_POINTS_PER_CENTROID * lists * d_opq * KMEANS_ITERS
        p(f"| {label} | {d:,.0f} | {per_q * q / 3600:,.0f} | {kfl / gpu_kmeans_rate / 3600:,.1f} GPU-hours |")
    p("")

    # growth: cost of each stage at 10x the database, relative to 1x
    p("How each cost grows with the database size n (training on the database, so queries grow with n too):\n")
    p("| stage | cost model | x10 database costs |")
    p("|---|---|---|")
    p("| prep, db, embed, index-add | linear in n (index-add: + log n for the coarse step) | ~10x |")
    p("| index-train | 39 nlist points x nlist centroids, nlist ~ 8 sqrt(n) | ~10x |")
    p(f"| query | n queries x nprobe x n / nlist distances = n x sqrt(n) | ~{10 ** 1.5:.0f}x |")
    p("")

    # memory
    p("## Memory per worker, measured at several sizes\n")
    p("The largest peak USS (private memory) of any one Ray worker of the stage, its PSS (with its share of "
      "libraries, the object store and mapped files), and the driver's (the `retro-ray <stage>` process) PSS:\n")
    p("| stage | corpus sizes | worker USS | growth | worker PSS | driver PSS |")
    p("|---|---|---|---|---|---|")
    for stage in ("prep", "db", "embed", "index-train", "index-add", "query"):
        h = having(stage)
        rs = [s["stages"][stage] for s in h]
        growth = rs[-1]["worker_peak_uss"] / max(1, rs[0]["worker_peak_uss"]) - 1
        def mib(key: str, rs: list[dict] = rs) -> str:
            return " / ".join(f"{r[key] / 2**20:,.0f}" for r in rs)

        p(f"| {stage} | {' / '.join(str(s['corpus']['copies']) + 'x' for s in h)} | {mib('worker_peak_uss')} MiB | "
          f"{growth:+.0%} | {mib('worker_peak_pss')} MiB | {mib('driver_peak_pss')} MiB |")
    p("")

    # shards
    shard_gib = args.node_memory_gib * 0.5
    shards = math.ceil(idx_bytes / (shard_gib * GiB))
    p(f"IndexShard actors hold their shard in memory: {idx_bytes / TB:,.2f} TB of codes in shards of at most "
      f"{shard_gib:g} GiB (half a {args.node_memory_gib:g} GiB node) is **index.num_shards={shards}**.\n")

    # training
    p("## Training clusters\n")
    h100 = load("gpu_model_bench_h100_compile_sweep.json")["125m_b32_retro"]
    mfu = h100["mfu"]
    from retro_ray.train.config import load_train_config, resolve_model_config
    from retro_ray.train.plan import plan

    D = args.train_tokens or T
    p(f"GPU-hours = FLOPs per token x {D:.3g} training tokens / ({BF16_PEAK / 1e12:.0f} TFLOP/s x MFU {mfu:.1%}, "
      "RETRO-125M bf16 on an H100, gpu_model_bench_h100_compile_sweep.json). Sequence 2048, GPT-2 vocabulary.\n")
    p(f"| config | parameters | FLOPs per token | GPUs, ZeRO (the config's) | memory per GPU (estimate) | GPU-hours | "
      f"days on those GPUs | GPUs for {args.train_days:g} days |")
    p("|---|---|---|---|---|---|---|---|")
    for name in ("148m", "410m", "1.5b", "9.5b"):
        cfg = load_train_config(name)
        model = resolve_model_config(cfg, 2048, chunk, 50257)
        pl = plan(model, num_gpus=cfg.trainer.num_workers, zero_stage=cfg.trainer.zero_stage,
                  precision=cfg.trainer.precision, micro_batch_size=cfg.model.micro_batch_size,
                  global_batch_size=cfg.model.global_batch_size,
                  activation_checkpointing=cfg.trainer.activation_checkpointing)
        gh = pl.flops_per_token * D / (BF16_PEAK * mfu) / 3600
        p(f"| train_{name}.yaml | {pl.parameters / 1e9:.3g} B | {pl.flops_per_token:.3g} | {pl.num_gpus}, stage {pl.zero_stage} | "
          f"{pl.total_bytes / GiB:,.1f} GiB of {args.gpu_memory_gib:g} | {gh:,.0f} | {gh / pl.num_gpus / 24:,.1f} | "
          f"{math.ceil(gh / (args.train_days * 24)):,} |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
