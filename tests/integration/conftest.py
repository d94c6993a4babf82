"""Fixtures shared by integration modules."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def serve_cluster() -> str:
    """A local 2-CPU Ray cluster for one module of Serve tests; its GCS address. Serve is shut down with it."""
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    serve.shutdown()
    ray.shutdown()
