"""Stage ``query``: neighbours for every chunk of every train / valid sample.

A sample is ``seq_length + 1`` tokens of the shuffled, concatenated documents of a split
(:mod:`retro_ray.samples`); its first ``seq_length`` tokens are ``seq_length / chunk_length`` chunks.
For each chunk: decode → embed → search ``query.num_neighbors_query`` candidates through the sharded
index → drop candidates from any document the sample spans (they would leak the text being
predicted) → keep the first ``query.num_neighbors_save``, padded with -1.

Output: ``query/<split>_<hash>/<block>.npy`` int64 [samples_in_block × chunks_per_sample, k_save]
and ``meta.json``; ``<hash>`` covers everything the neighbours depend on (data, split, seed,
lengths, tokenizer, embedder, index and search settings, sample count), and config.json records
the directory names. Ray Data runs it over blocks of samples with an actor pool whose actors embed
and search the shard actors; a rerun does only the missing blocks.

Invariance: query chunks are embedded and searched in fixed groups of whole samples (as many as
fit the embedder's group of ``GROUP_BATCHES × embedder.batch_size`` chunks, at least one), counted from sample 0 of the split; a block whose
edges cut a group computes the whole group and keeps its own rows. Candidates are ranked by
(distance, chunk id). So the neighbours do not depend on ``query.samples_per_block``, on the number
of actors or on which actor ran a block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.metrics import stage_metrics
from retro_ray.project import Project, Report, atomic_write_json, save_npy_atomic
from retro_ray.runtime import connect, count_by_node, current_node, take_all_or_rerun, want_gpu
from retro_ray.stages import STAGES
from retro_ray.stages.base import Stage, StageRun

log = logging.getLogger(__name__)
NAME = "query"
SHARD_CPUS = 0.25  # Ray CPUs of each index shard actor the query stage starts
QUERY_SPLITS = ("train", "valid")


def neighbor_inputs(project: Project, split: str) -> dict:
    """Everything the neighbours of ``split`` depend on (hashed into the directory name)."""
    cfg = C.to_dict(project.read_config())
    d = project.derived()
    q = dict(cfg["query"])
    samples = q.pop("train_samples") if split == "train" else q.pop("valid_samples")
    q.pop("valid_samples" if split == "train" else "train_samples")
    # Settings added after projects already existed are hashed only when set away from their default,
    # so that a project made before them keeps its neighbours.
    corpus = {k: v for k, v in cfg["corpus"].items() if not (k == "holdout_fraction" and v == 0.0)}
    embedder = {k: v for k, v in cfg["embedder"].items() if not (k == "batch_size" and v == 64)}
    return {
        "split": split, "corpus": corpus, "tokenizer": cfg["tokenizer"], "split_weights": cfg["split"],
        "seed": cfg["seed"], "seq_length": cfg["seq_length"], "chunk_length": cfg["chunk_length"],
        "embedder": embedder, "embed_precision": d.get("embed_precision"), "index": cfg["index"],
        "index_str": d.get("index_str"), "search": q, "samples": samples,
        "data": {"tokens": d.get("tokens_per_split"), "docs": d.get("docs_per_split"),
                 "db_chunks": d.get("chunks_per_split"), "vocab_size": d.get("vocab_size")},
    }


def neighbor_hash(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def neighbor_dir(project: Project, split: str) -> Path:
    """The directory of ``split``'s neighbours for the project's current settings."""
    return project.neighbor_dir(split, neighbor_hash(neighbor_inputs(project, split)))


def make_samples(project: Project, split: str):
    from retro_ray.indexed import IndexedDataset
    from retro_ray.samples import GptSamples

    cfg = project.read_config()
    n = cfg.query.train_samples if split == "train" else cfg.query.valid_samples
    return GptSamples(IndexedDataset(project.token_prefix(split)), cfg.seq_length, n, cfg.seed, split=split,
                      cache_dir=project.samples_dir)


class QueryNeighbors:
    """Callable class for ``map_batches``: a block of samples in, its neighbour ids on disk."""

    def __init__(self, project_root: str, shard_handles: list, shard_files: list[str], device: str,
                 torch_threads: int) -> None:
        t0 = time.perf_counter()
        import torch

        from retro_ray.retrieval.retriever import Retriever
        from retro_ray.retrieval.shards import ShardedIndex

        torch.set_num_threads(max(1, torch_threads))
        self.project = Project(project_root)
        cfg = self.project.read_config()
        self.cfg = cfg
        self.retriever = Retriever(self.project, ShardedIndex(shard_handles, shard_files), device=device)
        self.group = samples_per_group(cfg)
        self.samples = {s: make_samples(self.project, s) for s in QUERY_SPLITS}
        self.doc_ids = {s: np.load(self.project.doc_ids_path(s), mmap_mode="r") for s in QUERY_SPLITS}
        self.n_train = self.retriever.db.n_train
        log.info("query actor ready: %.1f s in __init__, %.1f s since its process started", time.perf_counter() - t0,
                 time.time() - _process_start())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"block_key": [], "chunks": [], "found": [], "node_id": []}
        m = self.cfg.chunk_length
        k_query, k_save = self.cfg.query.num_neighbors_query, self.cfg.query.num_neighbors_save
        for key, split, start, end, path in zip(batch["block_key"], batch["split"], batch["start"],
                                                batch["end"], batch["out"]):
            t0 = time.perf_counter()
            split, start, end = str(split), int(start), int(end)
            g = self.group
            lo, hi = start // g * g, min(-(-end // g) * g, len(self.samples[split]))  # whole groups
            spans = [self.samples[split].span(i) for i in range(lo, hi)]
            per_sample = self.cfg.seq_length // m
            ids = []
            for a in range(0, len(spans), g):  # one embedding + search per group, as every run makes it
                chunks = np.concatenate([s.tokens[:-1].reshape(-1, m) for s in spans[a:a + g]])  # [g*C, m]
                ids.append(self.retriever.search_token_chunks(chunks, k_query).ids)
            spans = spans[start - lo:end - lo]
            found_ids = np.concatenate(ids)[(start - lo) * per_sample:(end - lo) * per_sample]  # [n, k_query]
            # Global ids of the documents each chunk's sample spans, and of each candidate.
            cand_docs = self.retriever.db.global_doc_ids(found_ids)               # [n, k_query]
            neighbors = np.full((len(found_ids), k_save), -1, dtype=np.int64)
            for s_i, span in enumerate(spans):
                own = self.doc_ids[split][span.docs]
                rows = slice(s_i * per_sample, (s_i + 1) * per_sample)
                # Pretraining neighbours come from the training database only: chunks added later with
                # add-docs (ids >= n_train) are for inference, and would make a rerun differ.
                keep = (found_ids[rows] >= 0) & (found_ids[rows] < self.n_train) & ~np.isin(cand_docs[rows], own)
                for r, (ids_r, keep_r) in enumerate(zip(found_ids[rows], keep)):
                    chosen = ids_r[keep_r][:k_save]
                    neighbors[s_i * per_sample + r, :len(chosen)] = chosen
            save_npy_atomic(Path(str(path)), neighbors)
            metrics = stage_metrics(NAME)
            metrics.seconds(time.perf_counter() - t0)
            metrics.rows(len(spans))
            metrics.chunks(len(found_ids))
            metrics.neighbors(int((neighbors >= 0).sum()))
            out["block_key"].append(str(key))
            out["chunks"].append(len(found_ids))
            out["found"].append(int((neighbors >= 0).sum()))
            out["node_id"].append(current_node())
        return out


def samples_per_group(cfg) -> int:
    """Samples whose chunks are embedded and searched together: as many as fit the embedder's group."""
    from retro_ray.embedder import group_size

    return max(1, group_size(cfg.embedder.batch_size) // (cfg.seq_length // cfg.chunk_length))


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def _pool_size(num_actors: int | None, cpus_per_actor: float, reserved: float) -> int:
    import ray

    cpus = ray.cluster_resources().get("CPU", 0) - reserved
    fit = int(math.floor(cpus / cpus_per_actor + 1e-9))
    if fit < 1:
        raise RetroRayError(
            f"no room for a query actor: the cluster has {cpus + reserved:g} CPUs and the index shards take "
            f"{reserved:g}; lower query.cpus_per_actor or index.cpus_per_shard."
        )
    return min(num_actors, fit) if num_actors else fit


def load_neighbors(project: Project, split: str) -> tuple[list[np.ndarray], dict]:
    """The neighbour blocks of a split (memory-mapped) and its meta.json; checks the hash."""
    d = project.recorded_neighbor_dir(split)
    if d is None or not project.is_done(NAME):
        raise RetroRayError(
            f"no neighbours for the {split} split in {project.root}; run `retro-ray query --project-dir "
            f"{project.root}` first."
        )
    meta = json.loads(project.neighbor_meta_path(d).read_text())
    now = neighbor_inputs(project, split)
    if meta["inputs"] != now:
        changed = C.diff(meta["inputs"], now)
        k, old, new = changed[0]
        raise RetroRayError(
            f"the neighbours in {d} were computed with {k}={old!r}, but the project now has {k}={new!r}; "
            "rerun `retro-ray query` (it writes a new directory) or restore the setting."
        )
    blocks = sorted(d.glob("[0-9]*.npy"))
    return [np.load(b, mmap_mode="r") for b in blocks], meta


class Query(Stage):
    spec = STAGES["query"]
    run_config = C.QueryRunConfig
    owns = ("query.",)  # the search settings, until the neighbours are made

    def temporaries(self, run: StageRun) -> list[Path]:
        return [run.project.samples_dir, *(neighbor_dir(run.project, split) for split in QUERY_SPLITS)]

    def work(self, run: StageRun) -> Report:
        import ray
        from ray.data import ActorPoolStrategy

        from retro_ray.retrieval.shards import ShardedIndex

        project, cfg, run_cfg = run.project, run.config, run.cfg
        items, dirs, counts = [], {}, {}
        for split in QUERY_SPLITS:
            samples = make_samples(project, split)  # writes the sample order the actors then map
            d = dirs[split] = neighbor_dir(project, split)
            d.mkdir(parents=True, exist_ok=True)
            meta = {"inputs": neighbor_inputs(project, split), "num_samples": len(samples),
                    "samples_per_block": run_cfg.samples_per_block,
                    "chunks_per_sample": cfg.seq_length // cfg.chunk_length,
                    "num_neighbors_save": cfg.query.num_neighbors_save}
            meta_path = project.neighbor_meta_path(d)
            if meta_path.is_file():  # a resume keeps the block size already on disk
                meta["samples_per_block"] = json.loads(meta_path.read_text())["samples_per_block"]
            atomic_write_json(meta_path, meta)
            per = meta["samples_per_block"]
            for b, start in enumerate(range(0, len(samples), per)):
                out = project.neighbor_block(d, b)
                if not out.is_file():
                    items.append({"block_key": f"{split}/{b}", "split": split, "start": start,
                                  "end": min(start + per, len(samples)), "out": str(out)})
            counts[f"{split}_samples"] = len(samples)
            counts[f"{split}_chunks"] = len(samples) * meta["chunks_per_sample"]
        recorded = {split: str(d.relative_to(project.root)) for split, d in dirs.items()}
        project.update_derived(neighbor_dirs=recorded)
        t0 = time.perf_counter()
        if items:
            connect(run.address, run.progress)
            files = project.shard_paths()
            index = ShardedIndex.from_paths(files, num_cpus=SHARD_CPUS)
            try:
                gpu = want_gpu(run_cfg.use_gpu)
                size = (run_cfg.num_actors or int(ray.cluster_resources()["GPU"])) if gpu else \
                    _pool_size(run_cfg.num_actors, run_cfg.cpus_per_actor, SHARD_CPUS * len(files))
                size = min(size, len(items))
                log.info("query: %d blocks with %d actors, %d shards", len(items), size, len(files))
                ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                    QueryNeighbors,
                    fn_constructor_kwargs=dict(project_root=str(project.root), shard_handles=index.shards,
                                               shard_files=[str(f) for f in files],
                                               device="cuda" if gpu else "cpu",
                                               torch_threads=1 if gpu else max(1, math.ceil(run_cfg.cpus_per_actor))),
                    batch_size=1, compute=ActorPoolStrategy(size=size),
                    num_cpus=1 if gpu else run_cfg.cpus_per_actor, num_gpus=1 if gpu else 0,
                )
                counts["blocks_by_node"] = count_by_node(r["node_id"] for r in take_all_or_rerun(ds, NAME))
                counts["shards_by_node"] = count_by_node(index.node_ids())
            finally:
                index.shutdown()
        seconds = time.perf_counter() - t0
        n_chunks = sum(it["end"] - it["start"] for it in items) * (cfg.seq_length // cfg.chunk_length)
        counts["chunks_queried_this_run"] = n_chunks
        counts["chunks_per_s"] = round(n_chunks / seconds, 1) if n_chunks and seconds > 0 else 0
        for split in QUERY_SPLITS:
            counts[f"{split}_dir"] = recorded[split]
        report = Report(stage=NAME, counts=counts, timings={"query": seconds},
                        outputs=[str(d) for d in dirs.values()])
        return report


STAGE = Query()
run = STAGE.run
