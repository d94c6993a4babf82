"""Project housekeeping: scratch directories removed safely while a killed run's task still writes."""
from __future__ import annotations

import os
import threading

from retro_ray.project import Project


def _late_block_task(directory, stop: threading.Event, written: list, failed: list) -> None:
    """What a block task of a killed run does: write a temporary by path, then rename it into place."""
    i = 0
    while not stop.is_set():
        out = directory / f"{i:06d}.npy"
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(b"x" * 4096)
            os.replace(tmp, out)
        except FileNotFoundError as e:
            failed.append(e)
            return
        written.append(out)
        i += 1


def test_scratch_dir_removal_survives_a_concurrent_writer(tmp_path):
    blocks = tmp_path / "data" / "_blocks"
    blocks.mkdir(parents=True)
    for i in range(3000):  # make the removal take long enough for the writer to interleave
        (blocks / f"old-{i:06d}.npy").write_bytes(b"y")
    stop, written, failed = threading.Event(), [], []
    writer = threading.Thread(target=_late_block_task, args=(blocks, stop, written, failed))
    writer.start()
    while len(written) < 20 and writer.is_alive():
        pass
    Project.remove_scratch_dir(blocks)
    writer.join(timeout=30)
    stop.set()
    assert failed, "the late writer kept writing after the directory was removed"
    assert not blocks.exists()
    assert list(blocks.parent.iterdir()) == []


def test_scratch_dir_removal_is_a_no_op_when_absent(tmp_path):
    Project.remove_scratch_dir(tmp_path / "never-made")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_include_half_removed_directories(tmp_path):
    half = tmp_path / "._blocks.tmp-removing-123"
    half.mkdir()
    (half / "000001.npz").write_bytes(b"z")
    (tmp_path / ".docs.parquet.tmp-99").write_bytes(b"z")
    (tmp_path / "docs.parquet").write_bytes(b"keep")
    Project.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.parquet"]
