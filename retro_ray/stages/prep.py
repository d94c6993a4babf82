"""Stage ``prep``: corpus → normalised documents → GPT tokenizer → token datasets per split.

Steps, each committed atomically and skipped on a rerun once done:

1. ingest   stream the corpus into data/docs.parquet (normalised, empty and duplicate docs dropped)
2. split    seeded document-level shuffle into train / valid / test (data/doc_split.npy)
3. tokenizer  train byte-level BPE on the train split, or convert the one given (tokenizer/)
4. tokenize   Ray tasks, one per block of documents → data/_blocks/<block>.npz
5. merge      the blocks, in order, into data/<split>.bin/.idx (Megatron MMIDIDX) and
              data/<split>_doc_ids.npy (the docs.parquet row of each document)

Every document is followed by the end-of-document token, as Megatron's ``--append-eod`` does.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from retro_ray import config as C
from retro_ray.corpus import ingest
from retro_ray.errors import RetroRayError
from retro_ray.indexed import IndexedDataset, IndexedDatasetWriter
from retro_ray.metrics import stage_metrics
from retro_ray.project import SPLITS, Project, Report, atomic_write_json, tmp_path_for
from retro_ray.runtime import connect, count_by_node, run_block_tasks
from retro_ray.stages import STAGES
from retro_ray.stages.base import Stage, StageRun
from retro_ray.tokenizer import load_tokenizer, load_user_tokenizer, resolve_eod_token, token_dtype, train_tokenizer

log = logging.getLogger(__name__)
NAME = "prep"


def split_sizes(n_docs: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Documents per split: cumulative rounding, so the sizes add up to ``n_docs`` exactly."""
    bounds = [0]
    acc = 0.0
    for f in fractions:
        acc += f
        bounds.append(int(round(acc * n_docs)))
    bounds[-1] = n_docs
    return tuple(bounds[i + 1] - bounds[i] for i in range(3))  # type: ignore[return-value]


def assign_splits(n_docs: int, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """uint8 [n_docs]: 0 train, 1 valid, 2 test, by a seeded shuffle of the documents."""
    sizes = split_sizes(n_docs, fractions)
    order = np.random.default_rng(seed).permutation(n_docs)
    out = np.empty(n_docs, dtype=np.uint8)
    start = 0
    for s, size in enumerate(sizes):
        out[order[start:start + size]] = s
        start += size
    return out


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _iter_split_texts(docs_path: Path, doc_split: np.ndarray, split: int):
    pf = pq.ParquetFile(docs_path)
    for rg in range(pf.num_row_groups):
        t = pf.read_row_group(rg, columns=["doc_id", "text"])
        ids = t.column("doc_id").to_numpy()
        keep = doc_split[ids] == split
        for text, k in zip(t.column("text").to_pylist(), keep):
            if k:
                yield text


# A worker process keeps its tokenizer between tasks (loading it takes a moment).
_TOKENIZERS: dict[str, object] = {}


def _cached_tokenizer(path: str):
    tok = _TOKENIZERS.get(path)
    if tok is None:
        tok = _TOKENIZERS[path] = load_tokenizer(Path(path))
    return tok


def tokenize_block(item: dict) -> dict:
    """Tokenize one row group of docs.parquet; write its tokens per split to a .npz block file."""
    t0 = time.perf_counter()
    out = Path(item["out"])
    tok = _cached_tokenizer(item["tokenizer"])
    table = pq.ParquetFile(item["docs"]).read_row_group(item["block"], columns=["doc_id", "text"])
    doc_ids = table.column("doc_id").to_numpy().astype(np.int64)
    texts = table.column("text").to_pylist()
    split_of = np.load(item["doc_split"], mmap_mode="r")[doc_ids]
    eod = item["eod_id"]
    dtype = np.dtype(item["dtype"])
    # encode_batch_fast (tokenizers >= 0.20) skips the offsets, which are not needed here.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int32, count=len(encodings))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for e in encodings:
        n = len(e.ids)
        flat[pos:pos + n] = e.ids
        flat[pos + n] = eod
        pos += n + 1
    arrays = {}
    for s, name in enumerate(SPLITS):
        in_split = split_of == s
        arrays[f"{name}_doc_ids"] = doc_ids[in_split]
        arrays[f"{name}_lengths"] = lengths[in_split]
        arrays[f"{name}_tokens"] = flat[np.repeat(in_split, lengths)]
    # The driver made out.parent; not recreating it here keeps a killed run's late task from writing
    # into a directory the rerun has removed (Project.remove_scratch_dir).
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, out)
    m = stage_metrics(NAME)
    m.rows(len(texts))
    m.seconds(time.perf_counter() - t0)
    return {"block_key": item["block_key"], "docs": len(texts), "tokens": int(lengths.sum())}


def _prepare_tokenizer(project: Project, cfg: C.ProjectConfig, doc_split: np.ndarray, progress: bool) -> None:
    if project.tokenizer_path.is_file():
        return
    if cfg.tokenizer.path:
        tok = load_user_tokenizer(cfg.tokenizer.path, cfg.tokenizer)
        log.info("tokenizer: using %s (%d tokens)", cfg.tokenizer.path, tok.get_vocab_size())
    else:
        if not (doc_split == 0).any():
            raise RetroRayError(
                f"split={cfg.split!r} leaves no training documents to train the tokenizer on; "
                "give the train split a positive weight."
            )
        tok = train_tokenizer(_iter_split_texts(project.docs_path, doc_split, 0), cfg.tokenizer, progress=progress)
        log.info("tokenizer: trained byte-level BPE, %d tokens", tok.get_vocab_size())
    project.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(project.tokenizer_path)
    tok.save(str(tmp))
    os.replace(tmp, project.tokenizer_path)


def check_project_config(project: Project, cfg: C.ProjectConfig, overwrite: bool) -> None:
    """Refuse a project directory that holds another configuration, unless told to start over."""
    if overwrite:
        project.wipe()
        return
    if not project.has_config():
        return
    recorded = project.read_config_dict()
    recorded.pop("_derived", None)
    differences = C.diff(recorded, C.to_dict(cfg))
    if differences:
        shown = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, old, new in differences[:6])
        more = f" (and {len(differences) - 6} more)" if len(differences) > 6 else ""
        raise RetroRayError(
            f"{project.root} holds a project with another configuration ({shown}{more}); "
            "use the same settings to resume, another --project-dir, or --overwrite to start over."
        )


class Prep(Stage):
    spec = STAGES["prep"]
    run_config = C.PrepRunConfig

    def check(self, run: StageRun) -> None:
        cfg = run.settings if isinstance(run.settings, C.ProjectConfig) else C.build(C.ProjectConfig, run.settings)
        check_project_config(run.project, cfg, run.overwrite)
        run.config = cfg

    def settle(self, run: StageRun, done: bool) -> C.ProjectConfig:
        return run.config  # prep's settings are the project's: check() compared them with config.json

    def temporaries(self, run: StageRun) -> list[Path]:
        p = run.project
        return [p.root, p.data_dir, p.prep_blocks_dir, p.tokenizer_dir]

    def work(self, run: StageRun) -> Report:
        project, cfg, run_cfg, progress = run.project, run.config, run.cfg, run.progress
        project.root.mkdir(parents=True, exist_ok=True)
        project.write_config(cfg)
        timings: dict[str, float] = {}

        # 1. ingest
        t0 = time.perf_counter()
        stats_path = project.ingest_stats_path
        if not project.docs_path.is_file():
            stats = ingest(cfg.corpus, project.docs_path, run_cfg.docs_per_block, progress=progress,
                           heldout_path=project.heldout_path if cfg.corpus.holdout_fraction > 0 else None)
            atomic_write_json(stats_path, stats.as_counts())
        counts = json.loads(stats_path.read_text())
        timings["ingest"] = time.perf_counter() - t0
        n_docs = counts["documents_kept"]

        # 2. split
        if not project.doc_split_path.is_file():
            _save_npy(project.doc_split_path, assign_splits(n_docs, cfg.split_fractions(), cfg.seed))
        doc_split = np.load(project.doc_split_path)

        # 3. tokenizer
        t0 = time.perf_counter()
        _prepare_tokenizer(project, cfg, doc_split, progress)
        tok = load_tokenizer(project.tokenizer_path)
        eod_token = resolve_eod_token(cfg.tokenizer)
        eod_id = tok.token_to_id(eod_token)
        vocab_size = tok.get_vocab_size()
        dtype = np.dtype(token_dtype(vocab_size))
        timings["tokenizer"] = time.perf_counter() - t0

        # 4. tokenize blocks (Ray tasks), skipping blocks already written
        t0 = time.perf_counter()
        n_blocks = pq.ParquetFile(project.docs_path).num_row_groups
        block_files = [project.prep_block(b) for b in range(n_blocks)]
        todo = [
            {"block_key": b, "block": b, "out": str(block_files[b]), "docs": str(project.docs_path),
             "doc_split": str(project.doc_split_path), "tokenizer": str(project.tokenizer_path),
             "eod_id": eod_id, "dtype": dtype.str}
            for b in range(n_blocks) if not block_files[b].is_file()
        ]
        if todo:
            project.prep_blocks_dir.mkdir(parents=True, exist_ok=True)
            connect(run.address, progress)
            counts["blocks_by_node"] = count_by_node(
                r["node_id"] for r in run_block_tasks(tokenize_block, todo, run_cfg.cpus_per_task, "tokenize"))
        timings["tokenize"] = time.perf_counter() - t0

        # 5. merge blocks into one token dataset per split
        t0 = time.perf_counter()
        split_docs, split_tokens = {}, {}
        for name in SPLITS:
            writer = IndexedDatasetWriter(project.token_prefix(name), dtype)
            ids = []
            try:
                for path in block_files:
                    with np.load(path) as z:
                        writer.add_documents(z[f"{name}_tokens"], z[f"{name}_lengths"])
                        ids.append(z[f"{name}_doc_ids"])
                doc_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
                _save_npy(project.doc_ids_path(name), doc_ids)
                writer.finalize()
            except BaseException:
                writer.abort()
                raise
            split_docs[name] = int(len(doc_ids))
            split_tokens[name] = IndexedDataset(project.token_prefix(name)).num_tokens
        timings["merge"] = time.perf_counter() - t0
        project.update_derived(
            vocab_size=vocab_size, eod_id=eod_id, eod_token=eod_token, token_dtype=dtype.name,
            docs_per_split=split_docs, tokens_per_split=split_tokens,
        )
        report = Report(
            stage=NAME,
            counts={**counts, **{f"{k}_docs": v for k, v in split_docs.items()},
                    **{f"{k}_tokens": v for k, v in split_tokens.items()}, "vocab_size": vocab_size},
            timings=timings,
            outputs=[str(project.token_prefix(n)) + ".bin/.idx" for n in SPLITS] + [str(project.tokenizer_path)],
        )
        return report

    def finish(self, run: StageRun, report: Report) -> None:
        super().finish(run, report)
        # The per-block files are only a resume aid; the merged datasets are the output.
        run.project.remove_scratch_dir(run.project.prep_blocks_dir)


STAGE = Prep()
run = STAGE.run
