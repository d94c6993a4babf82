"""The project directory: every path, config.json, and each stage's completion marker.

No other code builds paths inside a project directory. The layout follows the NeMo / Megatron
"retro project dir" (see DESIGN.md)::

    config.json            preprocessing hyperparameters (ProjectConfig), written by prep
    data/                  docs.parquet (normalised corpus), <split>.bin/.idx, <split>_doc_ids.npy
    tokenizer/             tokenizer.json
    db/merged/             train.hdf5, valid.hdf5, sampled.hdf5
    .stages/<stage>.json   completion markers, holding each stage's Report
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retro_ray import config as C
from retro_ray.errors import RetroRayError

SPLITS = ("train", "valid", "test")


@dataclass
class Report:
    """What a stage did: counts, timings (seconds) and the outputs it wrote."""

    stage: str
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    skipped: bool = False  # True when the stage was already complete and did nothing

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        return cls(**{k: d[k] for k in ("stage", "counts", "timings", "outputs", "skipped") if k in d})

    def format(self) -> str:
        lines = [f"{self.stage}: {'already complete, nothing to do' if self.skipped else 'done'}"]
        for k, v in self.counts.items():
            lines.append(f"  {k:<28} {v:,}" if isinstance(v, int) else f"  {k:<28} {v}")
        for k, v in self.timings.items():
            lines.append(f"  {k + ' (s)':<28} {v:.2f}")
        for o in self.outputs:
            lines.append(f"  -> {o}")
        return "\n".join(lines)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are for everyone who can read the project
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def tmp_path_for(path: Path) -> Path:
    """A temporary name beside ``path`` (same directory, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class Project:
    """Paths and state of one project directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    # ---------------------------------------------------------------- paths
    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def docs_path(self) -> Path:
        """The normalised, de-duplicated corpus (doc_id, title, text), one row group per block."""
        return self.data_dir / "docs.parquet"

    @property
    def heldout_path(self) -> Path:
        """Documents held out of the project by corpus.holdout_fraction (JSONL of title, text)."""
        return self.data_dir / "heldout.jsonl"

    @property
    def doc_split_path(self) -> Path:
        """uint8 per document: 0 train, 1 valid, 2 test."""
        return self.data_dir / "doc_split.npy"

    @property
    def prep_blocks_dir(self) -> Path:
        return self.data_dir / "_blocks"

    def token_prefix(self, split: str) -> Path:
        """Megatron-style prefix of a token dataset: ``<prefix>.bin`` and ``<prefix>.idx``."""
        return self.data_dir / split

    @property
    def samples_dir(self) -> Path:
        """Cached sample orders (:class:`retro_ray.samples.GptSamples`), mapped by the query actors and
        the training workers."""
        return self.data_dir / "samples"

    def doc_ids_path(self, split: str) -> Path:
        """int64 [n_docs_in_split]: the global document id (row of docs.parquet) of each doc."""
        return self.data_dir / f"{split}_doc_ids.npy"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokenizer_path(self) -> Path:
        return self.tokenizer_dir / "tokenizer.json"

    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    def db_blocks_dir(self, split: str) -> Path:
        return self.db_dir / "blocks" / split

    def merged_db_path(self, name: str) -> Path:
        """``name`` is train, valid or sampled."""
        return self.db_dir / "merged" / f"{name}.hdf5"

    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    def embedding_block(self, split: str, block: int) -> Path:
        """float32 [chunks_in_block, dim]: the embeddings of one block of a split's chunks."""
        return self.embeddings_dir / split / f"{block:06d}.npy"

    def index_dir(self, index_type: str, index_dir_name: str) -> Path:
        return self.root / "index" / index_type / index_dir_name

    @property
    def stages_dir(self) -> Path:
        return self.root / ".stages"

    # ---------------------------------------------------------------- config.json
    def has_config(self) -> bool:
        return self.config_path.is_file()

    def read_config_dict(self) -> dict:
        if not self.has_config():
            raise RetroRayError(
                f"{self.root} is not a retro-ray project (no config.json); run "
                f"`retro-ray prep --project-dir {self.root}` first."
            )
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as e:
            raise RetroRayError(
                f"{self.config_path} is not valid JSON ({e.msg}); fix it or start over with --overwrite."
            ) from None

    def read_config(self) -> C.ProjectConfig:
        d = self.read_config_dict()
        d.pop("_derived", None)
        return C.build(C.ProjectConfig, d)

    def derived(self) -> dict:
        """Values computed by stages and recorded in config.json (vocab size, eod id, counts)."""
        return self.read_config_dict().get("_derived", {})

    def write_config(self, cfg: C.ProjectConfig, derived: dict | None = None) -> None:
        d = C.to_dict(cfg)
        if derived is not None:
            d["_derived"] = derived
        elif self.has_config():
            old = self.read_config_dict().get("_derived")
            if old is not None:
                d["_derived"] = old
        atomic_write_json(self.config_path, d)

    def update_derived(self, **values: Any) -> None:
        d = self.read_config_dict()
        d.setdefault("_derived", {}).update(values)
        atomic_write_json(self.config_path, d)

    def check_overrides(self, overrides: dict, changeable: tuple[str, ...] = ()) -> C.ProjectConfig:
        """Later stages may repeat a preprocessing setting, but never change it silently.

        Keys that start with one of ``changeable`` (e.g. ``"query."``) belong to the calling stage,
        which has not run yet: a new value is taken and recorded in config.json (and logged).
        """
        recorded = self.read_config()
        if not overrides:
            return recorded
        wanted = C.build(C.ProjectConfig, C.merge(C.to_dict(recorded), overrides))
        conflicts = C.diff(C.to_dict(recorded), C.to_dict(wanted))
        fixed = [c for c in conflicts if not c[0].startswith(changeable) or not changeable]
        if fixed:
            k, old, new = fixed[0]
            raise RetroRayError(
                f"{k}={new!r} was given but {self.config_path} has {k}={old!r} (set by prep); "
                "drop the override, or rerun `retro-ray prep ... --overwrite` to start over with it."
            )
        if conflicts:
            wanted.validate()
            import logging

            for k, old, new in conflicts:
                logging.getLogger(__name__).info("%s: %r -> %r (recorded in config.json)", k, old, new)
            self.write_config(wanted)
        return wanted

    # ---------------------------------------------------------------- stage markers
    def marker_path(self, stage: str) -> Path:
        return self.stages_dir / f"{stage}.json"

    def is_done(self, stage: str) -> bool:
        return self.marker_path(stage).is_file()

    def mark_done(self, report: Report) -> None:
        atomic_write_json(self.marker_path(report.stage), {"finished_at": time.time(), **report.to_dict()})

    def clear_done(self, stage: str) -> None:
        self.marker_path(stage).unlink(missing_ok=True)

    def report(self, stage: str) -> Report | None:
        p = self.marker_path(stage)
        if not p.is_file():
            return None
        return Report.from_dict(json.loads(p.read_text()))

    def require(self, stage: str, for_stage: str) -> None:
        if not self.is_done(stage):
            raise RetroRayError(
                f"`{for_stage}` needs the `{stage}` stage, which has not finished in {self.root}; "
                f"run `retro-ray {stage} --project-dir {self.root}` first."
            )

    # ---------------------------------------------------------------- housekeeping
    def wipe(self) -> None:
        """Remove everything retro-ray wrote (``--overwrite``); other files are left alone."""
        for p in [self.config_path, self.stages_dir, self.data_dir, self.tokenizer_dir, self.db_dir,
                  self.root / "index", self.root / "query", self.root / "embeddings"]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    @staticmethod
    def remove_stale_temporaries(directory: Path) -> None:
        """Delete temporary files (and half-removed scratch directories) a killed run left behind."""
        if directory.is_dir():
            for p in directory.glob(".*.tmp*"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    @staticmethod
    def remove_scratch_dir(directory: Path) -> None:
        """Delete a directory of per-block resume files once a stage has merged them.

        Ray ends the tasks of a killed driver asynchronously, so a task of the killed run may still be
        writing a block (``.<block>.tmp-<pid>``, then a rename) while the rerun finishes. The directory is
        first renamed away: any later write by path then fails inside that dead task (block tasks never
        create the directory) instead of landing in a directory being deleted.
        """
        if not directory.is_dir():
            return
        doomed = directory.with_name(f".{directory.name}.tmp-removing-{os.getpid()}")
        os.replace(directory, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def disk_usage(self, path: Path) -> int:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in self._walk(path))

    @staticmethod
    def _walk(path: Path) -> Iterator[Path]:
        if path.is_dir():
            for p in path.rglob("*"):
                if p.is_file():
                    yield p
