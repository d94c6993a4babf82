"""Stage ``index-train``: the Faiss index of the database, trained and still empty.

``faiss.index_factory(dim, index_str)`` trained on the embeddings of db/merged/sampled.hdf5, in one
Ray task (on a GPU when the cluster has one, which Faiss uses for the IVF k-means) →
``index/<type>/<index_str>/empty.faissindex``. ``index.index_str=auto`` chooses from the database
size (see :func:`retro_ray.retrieval.index.choose_index_string`). ``index-add`` (its own stage) then
adds every chunk; the ``index`` command runs both.
"""

from __future__ import annotations

import logging
import time

import h5py
import numpy as np

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.metrics import stage_metrics
from retro_ray.project import Project, Report
from retro_ray.runtime import connect, want_gpu
from retro_ray.stages import STAGES
from retro_ray.stages.base import Stage, StageRun

log = logging.getLogger(__name__)
NAME = "index-train"


def resolve_index_string(project: Project, index_str: str) -> str:
    if index_str != "auto":
        return index_str
    from retro_ray.retrieval.index import choose_index_string

    d = project.derived()
    return choose_index_string(int(d["chunks_per_split"]["train"]), int(d["embed_dim"]))


def _train_cpus() -> int:
    """CPUs for the index-train task: the free CPUs of the largest node, at least 1.

    k-means and OPQ use every thread they are given, and index-train runs alone in the pipeline, so
    one CPU (a task's default) would leave the rest of a laptop idle.
    """
    import ray

    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    return max(1, int(min(largest, ray.available_resources().get("CPU", 1))))


def _train_remote(
    index_str: str, vectors: np.ndarray, use_gpu: bool, kmeans: str, threads: int
) -> tuple[np.ndarray, str]:
    """The trained empty index as bytes, and where its IVF k-means ran (see ``train_index``'s ``info``)."""
    import faiss
    import torch

    from retro_ray.retrieval.index import index_to_bytes, train_index

    # A pooled worker may have been started for a one-CPU task: size both thread pools explicitly.
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    info: dict = {}
    index = train_index(index_str, vectors, use_gpu=use_gpu, info=info, kmeans=kmeans)
    return index_to_bytes(index), info["kmeans"]


class IndexTrain(Stage):
    spec = STAGES["index-train"]
    run_config = C.IndexRunConfig
    owns = ("index.index_str",)  # until the index is trained: then it is fixed

    def work(self, run: StageRun) -> Report:
        import ray

        from retro_ray.retrieval.index import index_from_bytes, save_index
        from retro_ray.stages.embed import load_embeddings

        project, cfg, run_cfg = run.project, run.config, run.cfg
        index_str = resolve_index_string(project, cfg.index.index_str)
        project.update_derived(index_str=index_str)
        empty_path = project.empty_index_path
        t0 = time.perf_counter()
        with h5py.File(project.merged_db_path("sampled"), "r") as f:
            ids = f["chunk_ids"][:]
        vectors = load_embeddings(project, "train", chunk_ids=ids)
        t_load = time.perf_counter() - t0
        connect(run.address, run.progress)
        use_gpu = want_gpu(run_cfg.use_gpu)
        log.info("index-train: %s on %d sampled chunks (%s)", index_str, len(ids), "GPU" if use_gpu else "CPU")
        t0 = time.perf_counter()
        cpus = _train_cpus()
        task = ray.remote(_train_remote).options(num_cpus=cpus, num_gpus=1 if use_gpu else 0)
        try:
            data, backend = ray.get(task.remote(index_str, vectors, use_gpu, run_cfg.kmeans, cpus))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RetroRayError):
                raise RetroRayError(str(e.cause)) from None
            raise
        save_index(index_from_bytes(data), empty_path)
        t_train = time.perf_counter() - t0
        stage_metrics("index").seconds(t_train, step="train")
        log.info("index-train: k-means ran on %s (%d CPU threads)", backend, cpus)
        report = Report(stage=NAME, counts={"index_str": index_str, "training_vectors": len(ids),
                                            "dim": int(vectors.shape[1]), "kmeans": backend, "cpu_threads": cpus},
                        timings={"load_embeddings": t_load, "train": t_train},
                        outputs=[str(empty_path)])
        return report

    def finish(self, run: StageRun, report: Report) -> None:
        pass  # work() recorded the training time (as the `index` metrics' "train" step)


STAGE = IndexTrain()
run = STAGE.run
