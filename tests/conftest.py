"""Fixtures shared by every test. Integration modules each get a local Ray cluster of their own (module
scope) from tests/integration/conftest.py; helpers that test modules import live in tests/support.py."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Every test cluster listens on loopback only, as the CLI's local clusters do (retro_ray.runtime).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray's files of this test session in a directory of its own (short: Ray's socket paths must fit 107
# bytes). Ray's ray.init() without an address connects to the cluster named in <temp>/ray/
# ray_current_cluster, which `ray start` or another process's test cluster on this machine may have
# written; here only this session's clusters are found, and this session's are found by no one else.
_RAY_TMPDIR = None
if "RAY_TMPDIR" not in os.environ:
    _RAY_TMPDIR = tempfile.mkdtemp(prefix="rrt-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = _RAY_TMPDIR


@pytest.fixture(scope="module")
def one_faiss_thread():
    """Faiss on one OpenMP thread for a module: OPQ / k-means training spin-waits badly when the test
    machine is oversubscribed, and one thread keeps such modules fast and their timing steady."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="session")
def wiki_docs() -> list[tuple[str, str]]:
    """(title, text) of the first 400 documents of the bundled default corpus."""
    from retro_ray.config import CorpusConfig
    from retro_ray.corpus import IngestStats, iter_raw_documents

    docs = []
    for title, text in iter_raw_documents(CorpusConfig(), IngestStats()):
        docs.append((title, text))
        if len(docs) == 400:
            break
    return docs


@pytest.fixture(scope="module")
def torch_one_thread():
    """Decode steps are many tiny ops: on a busy 2-core machine two intra-op threads make them ~25x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_exit_status: int | None = None


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's own shutdown once every result is reported.

    Threads of native libraries (Ray's core worker, Faiss/OpenMP, HTTP clients of the Serve tests)
    have crashed that shutdown with SIGSEGV after the summary was printed, turning a passing run into
    a failing exit status. By now all hooks have run (summary, cache); only finalisation is skipped.
    """
    if _RAY_TMPDIR is not None:
        shutil.rmtree(_RAY_TMPDIR, ignore_errors=True)
    if _exit_status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)
