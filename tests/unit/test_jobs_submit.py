"""jobs/submit without a cluster: argument checks and an unreachable cluster (no Ray started).

Submitting real jobs, a failing pipeline and a stopped job: tests/integration/test_jobs.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "jobs" / "submit"


def _run(*args, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    return subprocess.run([str(SUBMIT), *map(str, args)], env={**base, **env}, capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_is_executable_and_has_help():
    assert os.access(SUBMIT, os.X_OK)
    r = _run("--help")
    assert r.returncode == 0 and "pipeline" in r.stdout and "--project-dir" in r.stdout


@pytest.mark.parametrize("args,message", [
    ((), "usage"),
    (("nosuchstage", "--project-dir", "/tmp/p"), "unknown stage 'nosuchstage'"),
    (("prep",), "--project-dir DIR is required"),
    (("prep", "--project-dir", "runs/p"), "absolute path"),
    (("db", "--project-dir", "s3://bucket/p"), "not supported by the stages yet"),
    (("pipeline", "--project-dir", "/tmp/p", "--no-wait"), "--no-wait does not go with pipeline"),
    (("db", "--project-dir", "/tmp/p", "--overwrite"), "--overwrite belongs to prep"),
])
def test_usage_errors_exit_2_with_one_message(args, message):
    r = _run(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stdout + r.stderr


def test_unreachable_cluster_fails_naming_the_stage():
    """`serve` (a subcommand retro-ray may not have yet) is passed through, not rejected as unknown."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = _run("serve", "--project-dir", "/tmp/p", "--address", f"http://127.0.0.1:{port}")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stage 'serve': job retro-ray-serve-" in r.stderr and "could not be submitted" in r.stderr
