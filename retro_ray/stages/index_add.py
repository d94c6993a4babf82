"""Stage ``index-add``: every train chunk's embedding added to the trained index, in shards.

The empty index (``index-train``) goes to N ``IndexShard`` actors; shard i adds the embeddings of a
contiguous range of train chunk ids (ids = chunk ids) and saves ``shards/shard_<i>.faissindex``; the
shards are then merged into ``added.faissindex``, the single-file index for single-process use. A
rerun adds only missing shards.

Shard files and the merged index are written atomically (temporary file, fsync, rename), so a shard
file that exists is complete; a killed run leaves at most ``.<name>.tmp-*`` files, which the next
run deletes. Crash tests: ``RETRO_RAY_INDEX_ADD_KILL_SHARD=<shard>:<n>`` makes that shard's actor
SIGKILL itself after adding its ``n``-th block (``<shard>`` alone: after the first).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.metrics import stage_metrics
from retro_ray.project import Report
from retro_ray.runtime import connect, count_by_node
from retro_ray.stages import STAGES
from retro_ray.stages.base import Stage, StageRun

log = logging.getLogger(__name__)
NAME = "index-add"
KILL_SHARD_ENV = "RETRO_RAY_INDEX_ADD_KILL_SHARD"
ADD_BATCH = 8192  # vectors per add call to a shard, on a grid of chunk ids


def _crash_test_options(shard: int) -> dict:
    """Actor options that arm the KILL_SHARD_ENV crash point in ``shard``'s actor (none when unset)."""
    from retro_ray.retrieval.shards import KILL_AFTER_ADDS_ENV

    spec = os.environ.get(KILL_SHARD_ENV)
    if not spec:
        return {}
    target, _, blocks = spec.partition(":")
    try:
        target_shard, after = int(target), int(blocks or 1)
    except ValueError:
        raise RetroRayError(f"{KILL_SHARD_ENV}={spec!r} is not <shard>[:<blocks>]; unset it (it is for crash tests).") from None
    if target_shard != shard:
        return {}
    log.warning("index-add: %s=%s: shard %d will kill itself after %d block(s)", KILL_SHARD_ENV, spec, shard, after)
    return {"runtime_env": {"env_vars": {KILL_AFTER_ADDS_ENV: str(after)}}}


def _bytes_of(path: Path) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), dtype=np.uint8)


class IndexAdd(Stage):
    spec = STAGES["index-add"]
    run_config = C.IndexRunConfig

    def temporaries(self, run: StageRun) -> list[Path]:
        return [run.project.index_dir, run.project.index_shards_dir]  # never a finished file

    def work(self, run: StageRun) -> Report:
        import ray
        from tqdm import tqdm

        from retro_ray.retrieval.index import merge_shards, save_index
        from retro_ray.retrieval.shards import shard_ranges, start_shard
        from retro_ray.stages.embed import load_embeddings

        project, run_cfg, progress = run.project, run.cfg, run.progress
        derived = project.derived()
        num_shards = int(derived.get("index_num_shards") or run_cfg.num_shards)  # a resume keeps its sharding
        project.update_derived(index_num_shards=num_shards)
        t_start = time.perf_counter()
        n = int(derived["chunks_per_split"]["train"])
        ranges = shard_ranges(n, num_shards)
        files = project.shard_paths()
        todo = [i for i in range(num_shards) if not files[i].is_file()]
        t0 = time.perf_counter()
        shards_by_node: dict[str, int] = {}
        if todo:
            connect(run.address, progress)
            empty_ref = ray.put(_bytes_of(project.empty_index_path))
            shards = {i: start_shard(i, index_bytes=empty_ref, num_cpus=run_cfg.cpus_per_shard, **_crash_test_options(i))
                      for i in todo}
            pending = []
            doing = "adding"
            bar = tqdm(total=sum(ranges[i][1] - ranges[i][0] for i in todo), unit=" vectors", desc="index-add",
                       disable=True if not progress else None)
            try:
                # Feed each shard its range a batch at a time; actor calls run in order, in parallel across shards.
                # Batches sit on a fixed grid of chunk ids, not on the embed stage's block size: Faiss assigns
                # a batch's vectors to IVF lists together (a BLAS product with a flat quantizer), so a batch's
                # make-up must not follow a run setting.
                for i in todo:
                    start, end = ranges[i]
                    edges = sorted({start, end, *range(-(-start // ADD_BATCH) * ADD_BATCH, end, ADD_BATCH)})
                    for lo, hi in zip(edges[:-1], edges[1:]):
                        pending.append((shards[i].add.remote(ray.put(load_embeddings(project, "train", start=lo, end=hi)), lo),
                                        hi - lo, i))
                metrics = stage_metrics("index")
                t_prev = time.perf_counter()
                for ref, k, i in pending:
                    doing = f"adding shard {i}"
                    ray.get(ref)
                    bar.update(k)
                    now = time.perf_counter()
                    metrics.index_add_seconds(now - t_prev)  # wall time per added block, as seen by the driver
                    metrics.seconds(now - t_prev)
                    metrics.rows(k)
                    metrics.chunks(k)
                    t_prev = now
                doing = "saving the shards"
                ray.get([shards[i].save.remote(str(files[i])) for i in todo])
                shards_by_node = count_by_node(info["node_id"] for info in ray.get([s.info.remote() for s in shards.values()]))
            except ray.exceptions.RayActorError as e:
                raise RetroRayError(
                    f"an IndexShard actor died while {doing} ({str(e).splitlines()[0]}); nothing was marked done: "
                    "rerun `retro-ray index-add` to redo the missing shards."
                ) from None
            finally:
                bar.close()
                for s in shards.values():
                    ray.kill(s, no_restart=True)
        t_add = time.perf_counter() - t0
        t0 = time.perf_counter()
        merged = merge_shards([str(f) for f in files])
        if merged.ntotal != n:
            raise RetroRayError(
                f"the merged index holds {merged.ntotal} vectors but the database has {n} chunks; "
                f"delete {project.index_shards_dir} and rerun `retro-ray index-add`."
            )
        save_index(merged, project.added_index_path)
        stage_metrics("index").seconds(time.perf_counter() - t_start, step="run")
        report = Report(stage=NAME, counts={"vectors": int(merged.ntotal), "shards": num_shards,
                                            "shards_by_node": shards_by_node},
                        timings={"add": t_add, "merge": time.perf_counter() - t0},
                        outputs=[str(project.added_index_path), str(project.index_shards_dir)])
        return report

    def finish(self, run: StageRun, report: Report) -> None:
        pass  # work() recorded its time (as the `index` metrics' "run" step)


STAGE = IndexAdd()
run = STAGE.run
