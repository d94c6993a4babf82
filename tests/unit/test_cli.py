"""The `retro-ray` command's own behaviour: help texts and one-line errors (no Ray needed)."""

import subprocess
import sys

import pytest


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "retro_ray.cli", *args], capture_output=True, text=True)


def _help(cmd: str, capsys) -> str:
    """`retro-ray CMD --help` in this process (a subprocess per command cost ~2 s of imports each)."""
    from retro_ray.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([cmd, "--help"])
    assert exit_info.value.code == 0, cmd
    return capsys.readouterr().out


def test_every_subcommand_has_help(capsys):
    for cmd in ("prep", "db", "embed", "index", "index-train", "index-add", "query", "pipeline", "search",
                "info", "train", "export"):
        assert f"usage: retro-ray {cmd}" in _help(cmd, capsys)
    assert "model.retro.retro_num_neighbors" in _help("train", capsys)
    assert "query.nprobe" in _help("query", capsys)
    # ... and the real entry point prints the same.
    r = _cli("query", "--help")
    assert r.returncode == 0 and "query.nprobe" in r.stdout, r.stderr


def test_stage_errors_are_one_line(tmp_path):
    for args, expected in [
        (["db", "--project-dir", str(tmp_path / "none")], "is not a retro-ray project (no config.json)"),
        (["train", "--project-dir", str(tmp_path / "none"), "--exp-dir", str(tmp_path / "e")], "not a retro-ray project"),
        (["train", "--project-dir", str(tmp_path), "--exp-dir", str(tmp_path / "e"), "--config", "nope"],
         "training config nope is neither a YAML file nor a shipped config"),
        (["export", "--exp-dir", str(tmp_path), "--out", str(tmp_path / "m.pt")], "no retro-ray training checkpoint"),
    ]:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)
