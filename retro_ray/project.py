"""The project directory: every path, config.json, and each stage's completion marker.

No other code builds paths inside a project directory. The layout follows the NeMo / Megatron
"retro project dir" (see DESIGN.md)::

    config.json            preprocessing hyperparameters (ProjectConfig), written by prep
    data/                  docs.parquet (normalised corpus), <split>.bin/.idx, <split>_doc_ids.npy
    tokenizer/             tokenizer.json
    db/merged/             train.hdf5, valid.hdf5, sampled.hdf5
    db/added/              documents added after training (add-docs; see retro_ray.retrieval.chunks)
    embeddings/<split>/    <block>.npy, and embeddings/layout.json
    index/<type>/<name>/   empty.faissindex, added.faissindex, shards/shard_<i>.faissindex
    query/<split>_<hash>/  <block>.npy neighbour ids and meta.json
    eval/                  the default output directory of `retro-ray eval`
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
from typing import TYPE_CHECKING, Any

from retro_ray import config as C
from retro_ray.errors import RetroRayError

if TYPE_CHECKING:
    import numpy as np

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


def save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    """``np.save`` to a temporary name beside ``path``, then a rename (the directory is made if missing)."""
    import numpy as np  # here, not at the top: the CLI imports this module before it knows it needs numpy

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


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

    # data/ and tokenizer/: the prep stage
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def docs_path(self) -> Path:
        """The normalised, de-duplicated corpus (doc_id, title, text), one row group per block."""
        return self.data_dir / "docs.parquet"

    @property
    def ingest_stats_path(self) -> Path:
        """The counts of the corpus ingest (documents read, kept, dropped and why)."""
        return self.data_dir / "ingest_stats.json"

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

    def prep_block(self, block: int) -> Path:
        """The tokens of one block of documents, per split (.npz); removed once merged."""
        return self.prep_blocks_dir / f"{block:06d}.npz"

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

    # db/: the db stage (merged/) and add-docs (added/)
    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    @property
    def db_scratch_dir(self) -> Path:
        """The db stage's per-block files of every split; removed once merged."""
        return self.db_dir / "blocks"

    def db_blocks_dir(self, split: str) -> Path:
        return self.db_scratch_dir / split

    def db_block(self, split: str, block: int) -> Path:
        """The chunk rows of one block of a split's documents (.npy)."""
        return self.db_blocks_dir(split) / f"{block:06d}.npy"

    @property
    def merged_db_dir(self) -> Path:
        return self.db_dir / "merged"

    def merged_db_path(self, name: str) -> Path:
        """``name`` is train, valid or sampled."""
        return self.merged_db_dir / f"{name}.hdf5"

    @property
    def added_dir(self) -> Path:
        """The store of the documents added after training (layout in retro_ray.retrieval.chunks)."""
        return self.db_dir / "added"

    @property
    def added_state_path(self) -> Path:
        """The store's commit record, CURRENT.json (replaced atomically)."""
        return self.added_dir / "CURRENT.json"

    @property
    def added_lock_path(self) -> Path:
        """The lock file that lets one add at a time write the store."""
        return self.added_dir / ".lock"

    @property
    def added_tokens_path(self) -> Path:
        return self.added_dir / "tokens.bin"

    @property
    def added_embeddings_path(self) -> Path:
        return self.added_dir / "embeddings.f32"

    def added_version_dir(self, version: int | str) -> Path:
        """The directory of one commit of the store: ``version`` is its number, or the directory name
        CURRENT.json records."""
        return self.added_dir / (version if isinstance(version, str) else f"v{version:06d}")

    def added_chunks_path(self, version: int | str) -> Path:
        """uint32 [chunks, 5]: the chunk rows of every added document, as of ``version``."""
        return self.added_version_dir(version) / "chunks.npy"

    def added_doc_table_path(self, version: int | str) -> Path:
        """The table of the added documents (doc_id, title, digest, token offsets), as of ``version``."""
        return self.added_version_dir(version) / "docs.parquet"

    @property
    def corpus_digests_path(self) -> Path:
        """Sorted keys of the digests of every corpus document (add-docs' cache), and its record."""
        return self.added_dir / "corpus_digests.npy"

    @property
    def corpus_digests_meta_path(self) -> Path:
        return self.added_dir / "corpus_digests.json"

    # embeddings/: the embed stage
    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    def embeddings_split_dir(self, split: str) -> Path:
        return self.embeddings_dir / split

    @property
    def embeddings_layout_path(self) -> Path:
        """The block size, group size and precision the embeddings are being made with."""
        return self.embeddings_dir / "layout.json"

    def embedding_block(self, split: str, block: int) -> Path:
        """float32 [chunks_in_block, dim]: the embeddings of one block of a split's chunks."""
        return self.embeddings_split_dir(split) / f"{block:06d}.npy"

    # index/: the index-train and index-add stages (and add-docs, which adds to the index files)
    @property
    def index_root(self) -> Path:
        return self.root / "index"

    @property
    def index_str(self) -> str:
        """The index string index-train resolved (config.json); an error before index-train ran."""
        index_str = self.derived().get("index_str")
        if index_str is None:
            raise RetroRayError(
                f"no index in {self.root} yet; run `retro-ray index --project-dir {self.root}` first."
            )
        return index_str

    @property
    def index_dir(self) -> Path:
        """``index/<type>/<index string>/``: the directory of the project's index."""
        from retro_ray.retrieval.index import index_dir_name, index_type

        index_str = self.index_str
        return self.index_root / index_type(index_str) / index_dir_name(index_str)

    @property
    def empty_index_path(self) -> Path:
        """The trained index, before any vector was added (index-train)."""
        return self.index_dir / "empty.faissindex"

    @property
    def added_index_path(self) -> Path:
        """The merged index: every vector, in one file, for single-process use (index-add)."""
        return self.index_dir / "added.faissindex"

    @property
    def index_shards_dir(self) -> Path:
        return self.index_dir / "shards"

    def shard_paths(self) -> list[Path]:
        """The index-add shard files, one per IndexShard (their number is recorded in config.json)."""
        n = int(self.derived()["index_num_shards"])
        shards = self.index_shards_dir
        return [shards / f"shard_{i:03d}.faissindex" for i in range(n)]

    @property
    def index_added_docs_path(self) -> Path:
        """Which commit of db/added the index files hold (add-docs writes it last)."""
        return self.index_dir / "added_docs.json"

    # query/: the query stage
    @property
    def query_root(self) -> Path:
        return self.root / "query"

    def neighbor_dir(self, split: str, digest: str) -> Path:
        """``query/<split>_<digest>/``; ``digest`` is the hash of everything the neighbours depend on."""
        return self.query_root / f"{split}_{digest}"

    def recorded_neighbor_dir(self, split: str) -> Path | None:
        """The neighbour directory of ``split`` that config.json records (the query stage's), or None."""
        recorded = self.derived().get("neighbor_dirs", {}).get(split)
        return None if recorded is None else self.root / recorded

    @staticmethod
    def neighbor_meta_path(neighbor_dir: Path) -> Path:
        """What a neighbour directory holds (meta.json): the inputs it was made from, its block size."""
        return neighbor_dir / "meta.json"

    @staticmethod
    def neighbor_block(neighbor_dir: Path, block: int) -> Path:
        """int64 [samples_in_block × chunks_per_sample, k]: the neighbour ids of one block of samples."""
        return neighbor_dir / f"{block:06d}.npy"

    # eval/ and the stage markers
    @property
    def eval_dir(self) -> Path:
        """Where `retro-ray eval` writes its report unless told otherwise."""
        return self.root / "eval"

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
                  self.index_root, self.query_root, self.embeddings_dir]:
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
