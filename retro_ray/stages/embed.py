"""Stage ``embed``: every chunk of db/merged/{train,valid}.hdf5 → a BERT embedding.

Ray Data over blocks of chunk ids → ``map_batches`` with :class:`EmbedChunks` (the embedder as a
callable class) on an actor pool → one ``embeddings/<split>/<block>.npy`` (float32 [n, dim]) per
block, written atomically; a rerun embeds only the blocks that are missing.

Invariance: chunks are embedded in fixed groups of ``GROUP_BATCHES × embedder.batch_size``
consecutive chunk ids (:meth:`~retro_ray.embedder.Embedder.embed_groups`); a block whose edges cut a group embeds the
whole group and keeps its own rows. The precision is decided once, before the first block, and
recorded with the block size in ``embeddings/layout.json``. So the files do not depend on
``embed.chunks_per_block``, on the number of actors or on which actor ran a block.

Sizing: one actor per GPU when the cluster has GPUs; otherwise one actor per whole CPU, each
reserving 0.9 CPU. Below 1 on purpose: an actor pool that reserves every CPU can starve Ray Data's
own tasks and hang (seen on 2-CPU machines); each actor runs torch with as many threads as the
CPUs it stands for.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import h5py
import numpy as np

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.metrics import stage_metrics
from retro_ray.project import Project, Report, atomic_write_json, save_npy_atomic
from retro_ray.runtime import connect, count_by_node, current_node, take_all_or_rerun, want_gpu
from retro_ray.stages import STAGES
from retro_ray.stages.base import Stage, StageRun

log = logging.getLogger(__name__)
NAME = "embed"
EMBED_SPLITS = ("train", "valid")


class EmbedChunks:
    """Callable class for ``map_batches``: a block of chunk ids in, its embeddings on disk."""

    def __init__(self, project_root: str, model_dir: str | None, max_chunk_length: int, batch_size: int,
                 precision: str, device: str, torch_threads: int) -> None:
        import torch

        from retro_ray.embedder import Embedder, EmbedderConfig
        from retro_ray.indexed import IndexedDataset
        from retro_ray.tokenizer import load_tokenizer

        torch.set_num_threads(max(1, torch_threads))
        self.project = Project(project_root)
        self.gpt = load_tokenizer(self.project.tokenizer_path)
        self.embedder = Embedder(EmbedderConfig(model_dir=model_dir, max_chunk_length=max_chunk_length,
                                                batch_size=batch_size, precision=precision, device=device))
        self.datasets = {s: IndexedDataset(self.project.token_prefix(s)) for s in EMBED_SPLITS}
        self.group = self.embedder.group_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from retro_ray.retrieval.chunks import decode_chunks

        out: dict[str, list] = {"block_key": [], "chunks": [], "seconds": [], "precision": [], "node_id": []}
        g = self.group
        for key, split, start, end, path in zip(batch["block_key"], batch["split"], batch["start"],
                                                batch["end"], batch["out"]):
            t0 = time.perf_counter()
            start, end = int(start), int(end)
            with h5py.File(self.project.merged_db_path(str(split)), "r") as f:
                lo, hi = start // g * g, min(-(-end // g) * g, int(f["chunks"].shape[0]))  # whole groups
                rows = f["chunks"][lo:hi]
            texts = decode_chunks(self.datasets[str(split)], rows, self.gpt)
            emb = np.ascontiguousarray(self.embedder.embed_groups(texts, g)[start - lo:end - lo])
            rows = rows[start - lo:end - lo]
            save_npy_atomic(Path(str(path)), emb)
            seconds = time.perf_counter() - t0
            m = stage_metrics(NAME)
            m.rows(len(rows))  # embed's rows are the chunks it embedded
            m.chunks(len(rows))
            m.seconds(seconds)
            m.chunks_per_second(len(rows) / max(seconds, 1e-9))
            out["block_key"].append(str(key))
            out["chunks"].append(len(rows))
            out["seconds"].append(time.perf_counter() - t0)
            out["precision"].append(self.embedder.precision)
            out["node_id"].append(current_node())
        return out


def actor_pool(num_actors: int | None, cpus_per_actor: float, use_gpu: str) -> dict:
    """How many actors, with which resources, for an embedding pool on the connected cluster."""
    import ray

    res = ray.cluster_resources()
    cpus = res.get("CPU", 0)
    if want_gpu(use_gpu):
        n = num_actors or int(res["GPU"])
        return {"size": n, "num_gpus": 1, "num_cpus": 1, "device": "cuda", "threads": 1}
    if cpus_per_actor <= 0:
        raise RetroRayError("cpus_per_actor must be positive.")
    n = num_actors or max(1, int(cpus // 1))
    if n * cpus_per_actor > cpus:
        raise RetroRayError(
            f"{n} actors × {cpus_per_actor} CPUs do not fit the cluster's {cpus:g} CPUs; "
            "lower num_actors or cpus_per_actor."
        )
    return {"size": n, "num_gpus": 0, "num_cpus": cpus_per_actor, "device": "cpu",
            "threads": max(1, math.ceil(cpus_per_actor))}


def decide_precision(wanted: str, device: str, settings) -> tuple[str, str]:
    """The one precision a whole embed run uses: ``wanted`` unless ``auto``; auto is decided by the
    embedder's own rule (fp16 on GPUs; on this CPU bf16 when native and close to fp32, else fp32)."""
    if wanted != "auto":
        return wanted, "asked for"
    if device == "cuda":
        return "fp16", "CUDA device"
    from retro_ray.embedder import Embedder, EmbedderConfig

    probe = Embedder(EmbedderConfig(model_dir=settings.model_dir, max_chunk_length=settings.max_chunk_length,
                                    precision="auto", device="cpu"))
    return probe.precision, probe.precision_reason


def plan_blocks(project: Project, chunks_per_block: int) -> list[dict]:
    items = []
    for split in EMBED_SPLITS:
        with h5py.File(project.merged_db_path(split), "r") as f:
            n = int(f["chunks"].shape[0])
        for b, start in enumerate(range(0, n, chunks_per_block)):
            items.append({"block_key": f"{split}/{b}", "split": split, "start": start,
                          "end": min(start + chunks_per_block, n), "out": str(project.embedding_block(split, b))})
    return items


def load_embeddings(project: Project, split: str, chunk_ids: np.ndarray | None = None,
                    start: int = 0, end: int | None = None) -> np.ndarray:
    """Embeddings of a split's chunks: a contiguous range, or the rows ``chunk_ids`` (sorted or not)."""
    per = int(project.report(NAME).counts["chunks_per_block"])
    if chunk_ids is not None:
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        blocks = chunk_ids // per
        out = None
        for b in np.unique(blocks):
            arr = np.load(project.embedding_block(split, int(b)), mmap_mode="r")
            sel = blocks == b
            if out is None:
                out = np.empty((len(chunk_ids), arr.shape[1]), dtype=np.float32)
            out[sel] = arr[chunk_ids[sel] - b * per]
        return out if out is not None else np.zeros((0, 0), np.float32)
    n = project.derived()["chunks_per_split"][split]
    end = n if end is None else end
    parts = []
    for b in range(start // per, (end - 1) // per + 1 if end > start else start // per):
        arr = np.load(project.embedding_block(split, b), mmap_mode="r")
        lo = max(start - b * per, 0)
        hi = min(end - b * per, len(arr))
        parts.append(np.asarray(arr[lo:hi]))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _layout(project: Project) -> dict | None:
    """The block size, group size and precision of the blocks already on disk (None: nothing embedded yet)."""
    path = project.embeddings_layout_path
    return json.loads(path.read_text()) if path.is_file() else None


class Embed(Stage):
    spec = STAGES["embed"]
    run_config = C.EmbedRunConfig
    owns = ("embedder.batch_size",)  # until a first block is embedded: then embeddings/layout.json fixes it

    def settle(self, run: StageRun, done: bool) -> C.ProjectConfig:
        # A resumed run keeps the block size, group size and precision of the blocks already on disk.
        layout = None if done else _layout(run.project)
        if layout is None:  # nothing embedded yet: embedder.batch_size may still change
            return super().settle(run, done)
        project, run_cfg = run.project, run.cfg
        given = run.settings.get("embedder", {}).get("batch_size")
        if given is not None and "batch_size" in layout and int(given) != int(layout["batch_size"]):
            raise RetroRayError(
                f"embedder.batch_size={given} was given but the embeddings in {project.embeddings_dir} are being "
                f"made with embedder.batch_size={layout['batch_size']}; drop the override, or delete that directory "
                "to start over"
            )
        cfg = project.check_overrides(run.settings)
        if run_cfg.precision != "auto" and layout.get("precision") not in (None, run_cfg.precision):
            raise RetroRayError(
                f"embed.precision={run_cfg.precision} was given but the embeddings in {project.embeddings_dir} are "
                f"being made in {layout['precision']}; drop the setting, or delete that directory to start over"
            )
        if layout["chunks_per_block"] != run_cfg.chunks_per_block:
            log.info("embed: resuming with the block size already on disk, %d chunks", layout["chunks_per_block"])
        return cfg

    def temporaries(self, run: StageRun) -> list[Path]:
        return [run.project.embeddings_split_dir(split) for split in EMBED_SPLITS]

    def work(self, run: StageRun) -> Report:
        import ray
        from ray.data import ActorPoolStrategy

        from retro_ray.embedder import load_wordpiece_tokenizer

        project, cfg, run_cfg = run.project, run.config, run.cfg
        layout = _layout(project)
        layout_path = project.embeddings_layout_path
        per_block = layout["chunks_per_block"] if layout else run_cfg.chunks_per_block
        group = int(cfg.embedder.batch_size)
        load_wordpiece_tokenizer(cfg.embedder.model_dir)  # a bad model directory fails here, once
        items = plan_blocks(project, per_block)
        todo = [it for it in items if not Path(it["out"]).is_file()]
        t0 = time.perf_counter()
        precision = (layout or {}).get("precision")
        by_node: dict[str, int] = {}
        if todo:
            connect(run.address, run.progress)
            pool = actor_pool(run_cfg.num_actors, run_cfg.cpus_per_actor, run_cfg.use_gpu)
            pool["size"] = min(pool["size"], len(todo))
            if precision is None:  # decided here, once, so that every actor (and a resumed run) uses the same
                precision, reason = decide_precision(run_cfg.precision, pool["device"], cfg.embedder)
                log.info("embed: precision %s (%s)", precision, reason)
            atomic_write_json(layout_path, {"chunks_per_block": per_block, "batch_size": group, "precision": precision})
            log.info("embed: %d blocks to do with %d actors (%s, %g CPU%s each)", len(todo), pool["size"],
                     pool["device"], pool["num_cpus"], f", {pool['num_gpus']} GPU" if pool["num_gpus"] else "")
            ds = ray.data.from_items(todo, override_num_blocks=len(todo))
            ds = ds.map_batches(
                EmbedChunks,
                fn_constructor_kwargs=dict(project_root=str(project.root), model_dir=cfg.embedder.model_dir,
                                           max_chunk_length=cfg.embedder.max_chunk_length,
                                           batch_size=group, precision=precision,
                                           device=pool["device"], torch_threads=pool["threads"]),
                batch_size=1,
                compute=ActorPoolStrategy(size=pool["size"]),
                num_cpus=pool["num_cpus"],
                num_gpus=pool["num_gpus"],
            )
            rows = take_all_or_rerun(ds, NAME)
            by_node = count_by_node(r["node_id"] for r in rows)
            got = {r["precision"] for r in rows}
            if got != {precision}:
                raise RetroRayError(f"embed actors ran in {', '.join(sorted(got))} instead of {precision}: a bug, please report it")
        seconds = time.perf_counter() - t0
        n_chunks = sum(it["end"] - it["start"] for it in items)
        n_done = sum(it["end"] - it["start"] for it in todo)
        dim = int(np.load(items[0]["out"], mmap_mode="r").shape[1]) if items else 0
        counts = {
            "train_chunks": sum(it["end"] - it["start"] for it in items if it["split"] == "train"),
            "valid_chunks": sum(it["end"] - it["start"] for it in items if it["split"] == "valid"),
            "chunks_embedded_this_run": n_done,
            "blocks": len(items),
            "chunks_per_block": per_block,
            "dim": dim,
            "precision": precision or project.derived().get("embed_precision", "unknown"),
            "batch_size": group,
            "chunks_per_s": round(n_done / seconds, 1) if n_done and seconds > 0 else 0,
            "blocks_by_node": by_node,
        }
        project.update_derived(embed_dim=dim, embed_precision=counts["precision"])
        report = Report(stage=NAME, counts=counts, timings={"embed": seconds},
                        outputs=[str(project.embeddings_split_dir(s)) for s in EMBED_SPLITS])
        log.info("embed: %d chunks in %.1f s (%s)", n_chunks, seconds, counts["precision"])
        return report


STAGE = Embed()
run = STAGE.run
