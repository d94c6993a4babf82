"""Fixtures shared by integration modules: a local Ray cluster for each module, and the small project
built once per session."""

from __future__ import annotations

import pytest
import ray

from retro_ray.project import Project
from tests.support import SMALL_DOCS, build_small_project


def _local_cluster(**env: str):
    """A local 2-CPU Ray cluster, no dashboard, workers' output not forwarded to the driver; yields its GCS
    address and shuts it down after. ``env`` is set while it runs (the processes Ray starts inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray.get_runtime_context().gcs_address
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_address() -> str:
    """A fresh local Ray cluster for one module (this process is its driver); its GCS address, for the
    subprocesses a test starts (RAY_ADDRESS)."""
    yield from _local_cluster()


@pytest.fixture(scope="module")
def train_ray_address() -> str:
    """ray_address for a module that runs Ray Train: the Train controller polls its workers every 0.5 s
    instead of every 2 s, which ends each run sooner."""
    yield from _local_cluster(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")


@pytest.fixture(scope="module")
def serve_cluster(ray_address) -> str:
    """ray_address for a module of Serve tests; Serve is shut down before the cluster."""
    from ray import serve

    yield ray_address
    serve.shutdown()


@pytest.fixture(scope="session")
def small_project(wiki_docs, tmp_path_factory) -> Project:
    """The small project: `retro-ray pipeline` (SMALL_PIPELINE) on the first SMALL_DOCS bundled documents,
    built once per session on a local cluster the CLI starts for it. Never changed: a module takes a copy
    of its own (copy_project)."""
    return build_small_project(tmp_path_factory.mktemp("small-project"), wiki_docs[:SMALL_DOCS], None)
