"""The ``train`` stage: RETRO (or the GPT baseline) on a Ray cluster with Ray Train + DeepSpeed.

``run(train_cfg, dataset_factory, model_data, exp_dir)`` checks everything a user can get wrong
before a worker starts (config, data shapes, neighbour count, cluster size, the experiment
directory), then runs a ``ray.train.torch.TorchTrainer`` whose workers execute
:func:`retro_ray.train.loop.train_loop_per_worker`, and finally writes the run's outputs.

The experiment directory (``exp_dir``; Ray Train's ``storage_path``, so on a multi-node cluster it
must be storage every node reaches, e.g. NFS)::

    config.json          the TrainConfig, the resolved model config and the data info, written at start
    <name>/              Ray Train's run directory: checkpoint_<step>/ (DeepSpeed files + retro_ray.json
                         + metrics.jsonl), Ray's checkpoint-manager snapshot
    tensorboard/         TensorBoard event files (rank 0, live)
    metrics.jsonl        every logged record (train / val / event), written at the end
    loss_curve.png       train and validation loss against step
    train_report.json    the TrainReport; written last, it marks the run complete

Reruns: the same config in the same exp_dir continues the run -- Ray Train restores the latest
checkpoint (Train V2: same RunConfig(name, storage_path)) -- or, when train_report.json says the run
finished, returns that report without training (``skipped=True``). A different config is refused,
listing the keys that differ; with ``resume=True`` a changed config may continue from the latest
checkpoint (e.g. a larger trainer.max_steps) as long as the architecture and the data are the same.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.metrics import stage_metrics
from retro_ray.model.retro import RetroConfig
from retro_ray.plots import figure, save_figure
from retro_ray.project import Project, atomic_write_bytes, atomic_write_json
from retro_ray.train.config import TrainConfig, resolve_model_config
from retro_ray.train.loop import (
    CHECKPOINT_HISTORY,
    CHECKPOINT_META,
    check_resumable,
    read_history,
    wandb_module,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
REPORT_FILE = "train_report.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"
MODEL_DATA_KEYS = ("seq_length", "chunk_length", "vocab_size", "num_neighbors_available")


@dataclass
class TrainReport:
    """What a training run did and where its outputs are."""

    exp_dir: str
    run_dir: str
    final_step: int
    max_steps: int
    final_checkpoint: str | None
    metrics_path: str | None = None
    plot_path: str | None = None
    tensorboard_dir: str | None = None
    num_parameters: int = 0
    train_loss: float | None = None  # last logged (mean over workers)
    val_loss: float | None = None  # last validation
    val_ppl: float | None = None
    tokens_per_s: float | None = None  # median over the logged windows
    mfu: float | None = None
    deepspeed_init_s: float | None = None  # first start, rank 0
    restarts: int = 0  # times the workers resumed from a checkpoint
    wall_s: float = 0.0
    skipped: bool = False  # the run had already finished; nothing was done
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainReport:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def format(self) -> str:
        head = "train: already complete, nothing to do" if self.skipped else "train: done"
        rows = [head, f"  {'step':<22} {self.final_step} / {self.max_steps}"]
        for key in ("num_parameters", "train_loss", "val_loss", "val_ppl", "tokens_per_s", "mfu",
                    "deepspeed_init_s", "restarts", "wall_s"):
            v = getattr(self, key)
            if v is not None:
                rows.append(f"  {key:<22} {v:,.4g}" if isinstance(v, float) else f"  {key:<22} {v:,}")
        for p in (self.final_checkpoint, self.metrics_path, self.plot_path, self.tensorboard_dir):
            if p:
                rows.append(f"  -> {p}")
        return "\n".join(rows)


# --------------------------------------------------------------------------------------------------
# The dataset factory for a project (the real data)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectDatasetFactory:
    """``factory(split) -> RetroDataset(project, split, num_neighbors)``; picklable."""

    project_dir: str
    num_neighbors: int

    def __call__(self, split: str) -> Any:
        from retro_ray.train.dataset import RetroDataset  # written beside this module

        return RetroDataset(Project(self.project_dir), split, self.num_neighbors)


def project_model_data(project: Project, num_neighbors_available: int) -> dict[str, Any]:
    """``model_data`` for ``run`` from a project's config.json."""
    cfg = project.read_config()
    derived = project.derived()
    if "vocab_size" not in derived:
        raise RetroRayError(f"{project.config_path} has no vocab_size; run `retro-ray prep --project-dir {project.root}`.")
    data = {"seq_length": cfg.seq_length, "chunk_length": cfg.chunk_length, "vocab_size": int(derived["vocab_size"]),
            "num_neighbors_available": int(num_neighbors_available), "project_dir": str(project.root),
            "tokenizer_path": str(project.tokenizer_path)}
    if "eod_id" in derived:
        data["eod_id"] = int(derived["eod_id"])
    return data


# --------------------------------------------------------------------------------------------------
# Checks a user can fail
# --------------------------------------------------------------------------------------------------


def retrofit_base(train_cfg: TrainConfig, model_data: dict[str, Any]) -> TrainConfig:
    """Check ``model.init_from`` (a model.pt, a local HF directory or a GGUF file, trained with the project's tokenizer)
    and take its decoder's shape."""
    from retro_ray.train.config import decoder_from_base
    from retro_ray.train.export import check_base_tokenizer, read_base

    path = Path(train_cfg.model.init_from).expanduser()
    base, _, data = read_base(path, weights=False)
    check_base_tokenizer(path, data, model_data["vocab_size"], model_data.get("tokenizer_path"))
    log.info("RETRO-fitting %s: its decoder (%d layers x %d, vocabulary %d), %s", path, base.num_layers,
             base.hidden_size, base.vocab_size,
             "frozen" if train_cfg.model.retro.freeze_decoder else "trained with the rest")
    # Absolute: Ray Train's workers run in directories of their own.
    train_cfg = dataclasses.replace(train_cfg, model=dataclasses.replace(train_cfg.model, init_from=str(path.resolve())))
    return decoder_from_base(train_cfg, base, str(path))


def check_model_data(model_data: dict[str, Any]) -> None:
    missing = [k for k in MODEL_DATA_KEYS if k not in model_data]
    if missing:
        raise ValueError(f"model_data lacks {missing}; it needs {list(MODEL_DATA_KEYS)}")


def check_neighbors(model_cfg: RetroConfig, model_data: dict[str, Any]) -> None:
    if not model_cfg.retro.enabled:
        return
    want, have = model_cfg.retro.retro_num_neighbors, int(model_data["num_neighbors_available"])
    if want > have:
        raise RetroRayError(
            f"model.retro.retro_num_neighbors={want} but the data holds only {have} neighbours per chunk; "
            f"set model.retro.retro_num_neighbors to at most {have}, or rerun the query stage saving more neighbours."
        )


def check_data(dataset_factory: Callable[[str], Any], model_cfg: RetroConfig, train_cfg: TrainConfig) -> None:
    """Open the train split in the driver and check its size and one item's shapes."""
    ds = dataset_factory("train")
    per_step = train_cfg.model.micro_batch_size * train_cfg.trainer.num_workers
    if len(ds) < per_step:
        raise RetroRayError(
            f"the train split has {len(ds)} samples, fewer than one micro-batch on every worker "
            f"(model.micro_batch_size x trainer.num_workers = {per_step}); lower them or use more data."
        )
    item = ds[0]
    n, m = model_cfg.seq_length, model_cfg.chunk_length
    if tuple(item["text"].shape) != (n + 1,):
        raise RetroRayError(
            f"a train sample has {item['text'].shape[0]} tokens but seq_length={n} needs {n + 1}; the dataset "
            "does not match the model's seq_length."
        )
    if model_cfg.retro.enabled:
        shape = tuple(item["neighbor_tokens"].shape)
        k = model_cfg.retro.retro_num_neighbors
        if shape != (n // m, k, 2 * m):
            raise RetroRayError(
                f"a train sample's neighbor_tokens are {list(shape)} but the model needs "
                f"[{n // m}, {k}, {2 * m}] (chunks, model.retro.retro_num_neighbors, 2 x chunk_length); build "
                "the dataset with the model's neighbour count."
            )


def resolve_use_gpu(use_gpu: bool | str, resources: dict[str, float]) -> bool:
    gpus = resources.get("GPU", 0)
    if use_gpu == "auto":
        return gpus >= 1
    if use_gpu and gpus < 1:
        raise RetroRayError(
            "trainer.use_gpu=true but the Ray cluster has no GPU; set trainer.use_gpu=false (or auto), or "
            "connect to a cluster with GPUs (--address)."
        )
    return bool(use_gpu)


def check_cluster(train_cfg: TrainConfig, use_gpu: bool, resources: dict[str, float]) -> None:
    """Refuse a worker count the cluster can never schedule (Ray would wait forever)."""
    t = train_cfg.trainer
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    has = f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs"
    if not t.check_cluster_resources:
        return
    need = t.num_workers * t.cpus_per_worker
    if need > cpus + 1e-9:
        fit = int(cpus // t.cpus_per_worker)
        raise RetroRayError(
            f"trainer.num_workers={t.num_workers} workers x trainer.cpus_per_worker={t.cpus_per_worker:g} need "
            f"{need:g} CPUs but {has}; set trainer.num_workers to at most {fit} (or lower "
            "trainer.cpus_per_worker), connect to a bigger cluster (--address), or set "
            "trainer.check_cluster_resources=false if an autoscaler will add nodes."
        )
    if use_gpu and t.num_workers > gpus:
        raise RetroRayError(
            f"trainer.num_workers={t.num_workers} workers need one GPU each but {has}; set "
            f"trainer.num_workers to at most {int(gpus)}, or set trainer.use_gpu=false."
        )


def check_precision(train_cfg: TrainConfig, use_gpu: bool) -> None:
    if train_cfg.trainer.precision == "fp16" and not use_gpu:
        raise RetroRayError(
            "trainer.precision=fp16 needs a GPU (DeepSpeed's fp16 loss scaling is GPU-only); use "
            "trainer.precision=auto, 32 or bf16 on CPU."
        )


def check_loss_kernel(train_cfg: TrainConfig, use_gpu: bool) -> None:
    kernel = train_cfg.trainer.loss_kernel
    if kernel != "retro_ray" and not use_gpu:
        raise RetroRayError(
            f"trainer.loss_kernel={kernel} is a Triton kernel for CUDA GPUs and this run trains on CPUs; use "
            "trainer.loss_kernel=retro_ray (or trainer.use_gpu=true on a cluster with GPUs)."
        )


def resolve_precision(precision: str, use_gpu: bool) -> tuple[str, str]:
    """The precision the workers train in, and why: trainer.precision, with auto decided here (on the
    machine that starts training): bf16 on GPUs and on CPUs with AMX, whose bf16 matrix units trained
    the demo's models 1.6-1.7x as fast as fp32 on this project's CPU (benchmarks/README.md); 32 on
    other CPUs: bf16 without native support ran several times slower than fp32 in the embedder's
    measurements, and with AVX512-BF16 but no AMX (this CPU with oneDNN held to AVX512-BF16 kernels)
    the demo's trainings ran at 0.83-0.90x of fp32."""
    from retro_ray.runtime import cpu_has_amx, cpu_has_native_bf16

    if precision != "auto":
        if precision == "bf16" and not use_gpu and not cpu_has_amx():
            log.warning("trainer.precision=bf16 on a CPU without AMX (%s): expect it slower than "
                        "trainer.precision=32", cpu_has_native_bf16()[1])
        return precision, f"trainer.precision={precision}"
    if use_gpu:
        return "bf16", "auto: GPU workers"
    if cpu_has_amx():
        return "bf16", "auto: this CPU has AMX bf16 tiles"
    return "32", f"auto: this CPU has no AMX ({cpu_has_native_bf16()[1]})"


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in C.diff(old, new)]


def _with_new_defaults(old: dict[str, Any]) -> dict[str, Any]:
    """A recorded run's config with settings added since it was written at their defaults, so that a run
    made by an older version continues (and is found finished) when it is rerun unchanged."""
    from retro_ray.model.retro import RetroConfig

    try:
        filled = {**old, "train": TrainConfig.from_dict(old["train"]).to_dict(),
                  "model": RetroConfig.from_dict(old["model"]).to_dict()}
    except (RetroRayError, TypeError, ValueError):
        return old  # not buildable any more: the comparison names what differs
    return json.loads(json.dumps(filled))


def check_exp_dir(exp_dir: Path, record: dict[str, Any], resume: bool) -> TrainReport | None:
    """Compare with the config a previous run left in exp_dir; return its report if it finished."""
    path = exp_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise RetroRayError(f"{path} is not valid JSON; delete it (and the run beside it) or use another exp_dir.") from None
    if "train" not in old or "model" not in old:
        raise RetroRayError(
            f"{exp_dir} holds a {CONFIG_FILE} that is not a retro-ray training config; use another exp_manager.exp_dir."
        )
    old = _with_new_defaults(old)
    report_path = exp_dir / REPORT_FILE
    if old == record:
        if report_path.is_file():
            report = TrainReport.from_dict(json.loads(report_path.read_text()))
            if report.final_step >= record["train"]["trainer"]["max_steps"]:
                report.skipped = True
                return report
        return None  # unfinished: Ray Train continues from the latest checkpoint
    diffs = _differences(old, record)
    if not resume:
        raise RetroRayError(
            f"{exp_dir} holds another run's config (differing: {'; '.join(diffs)}); use another "
            "exp_manager.exp_dir or exp_manager.name, rerun with the same config to continue it, or pass "
            "--resume to continue that run's latest checkpoint with the new settings."
        )
    fixed = _differences({"model": old["model"], "model_data": old.get("model_data")},
                         {"model": record["model"], "model_data": record.get("model_data")})
    if fixed:
        raise RetroRayError(
            f"cannot resume the run in {exp_dir}: the model architecture or the data changed "
            f"({'; '.join(fixed)}), so its checkpoint does not fit; start a new run in another exp_dir."
        )
    t_old, t_new = old["train"]["trainer"], record["train"]["trainer"]
    check_resumable({"zero_stage": t_old.get("zero_stage", 0), "world_size": t_old.get("num_workers", 1)},
                    t_new["zero_stage"], t_new["num_workers"])
    log.warning("resuming %s with changed settings: %s", exp_dir, "; ".join(diffs))
    return None


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------


def run(
    train_cfg: TrainConfig,
    dataset_factory: Callable[[str], Any],
    model_data: dict[str, Any],
    exp_dir: str | Path | None = None,
    *,
    resume: bool = False,
    address: str | None = None,
) -> TrainReport:
    """Train with Ray Train + DeepSpeed and write the outputs to exp_dir (see the module docstring).

    ``dataset_factory(split)`` returns a map-style dataset for "train" / "valid" (picklable; it is
    called inside every worker). ``model_data``: seq_length, chunk_length, vocab_size (the
    tokenizer's), num_neighbors_available, plus any extra info (tokenizer path, eod id) to record
    with the checkpoints. ``exp_dir`` defaults to exp_manager.exp_dir.
    """
    t_start = time.perf_counter()
    check_model_data(model_data)
    exp_dir = exp_dir if exp_dir is not None else train_cfg.exp_manager.exp_dir
    if not exp_dir:
        raise RetroRayError("no experiment directory: set exp_manager.exp_dir=/path/to/exp_dir.")
    exp_dir = Path(exp_dir).expanduser().resolve()
    if train_cfg.model.init_from:
        train_cfg = retrofit_base(train_cfg, model_data)
    elif train_cfg.model.retro.freeze_decoder:
        raise RetroRayError(
            "model.retro.freeze_decoder=true without model.init_from would freeze a randomly initialised decoder; "
            "give model.init_from=<model.pt of a trained GPT> or drop freeze_decoder."
        )
    model_cfg = resolve_model_config(train_cfg, int(model_data["seq_length"]), int(model_data["chunk_length"]),
                                     int(model_data["vocab_size"]))
    check_neighbors(model_cfg, model_data)
    record = {"train": train_cfg.to_dict(), "model": model_cfg.to_dict(), "model_data": dict(model_data)}
    record = json.loads(json.dumps(record))  # the form it has once written (tuples -> lists)
    done = check_exp_dir(exp_dir, record, resume)
    if done is not None:
        log.info("training in %s already finished at step %d", exp_dir, done.final_step)
        return done
    if train_cfg.exp_manager.create_wandb_logger:
        wandb_module()  # fail here, not in a worker
    check_data(dataset_factory, model_cfg, train_cfg)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from retro_ray.runtime import connect, find_user_error
    from retro_ray.train.loop import train_loop_per_worker

    connect(address, progress=False)
    resources = ray.cluster_resources()
    t = train_cfg.trainer
    use_gpu = resolve_use_gpu(t.use_gpu, resources)
    check_cluster(train_cfg, use_gpu, resources)
    check_precision(train_cfg, use_gpu)
    check_loss_kernel(train_cfg, use_gpu)
    precision, why = resolve_precision(t.precision, use_gpu)
    log.info("training in precision %s (%s)", precision, why)

    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / REPORT_FILE).unlink(missing_ok=True)  # training (again): not complete until finish()
    atomic_write_json(exp_dir / CONFIG_FILE, record)
    # config.json keeps the setting as given (auto); the workers, and so every checkpoint, get the precision it chose
    worker_train = {**record["train"], "trainer": {**record["train"]["trainer"], "precision": precision}}
    spec = {"train": worker_train, "model": record["model"], "model_data": record["model_data"],
            "dataset_factory": dataset_factory, "exp_dir": str(exp_dir), "use_gpu": use_gpu}
    name = train_cfg.exp_manager.name
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(exp_dir),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_checkpoints_to_keep),
        ),
    )
    t_fit = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is not None:
            raise RetroRayError(str(user_error)) from e
        raise
    fit_s = time.perf_counter() - t_fit
    stage_metrics("train").seconds(fit_s, step="run")

    run_dir = exp_dir / name
    ckpt = Path(result.checkpoint.path) if result.checkpoint is not None else latest_checkpoint(run_dir)
    if ckpt is None:
        raise RuntimeError(f"training finished but no checkpoint was found in {run_dir}")
    return finish(exp_dir, run_dir, ckpt, record, t.max_steps, wall_s=time.perf_counter() - t_start,
                  timings={"fit_s": round(fit_s, 3)})


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint directory with the highest step under a Ray Train run directory."""
    found = sorted(p for p in run_dir.glob("checkpoint_*") if (p / CHECKPOINT_META).is_file())
    return found[-1] if found else None


def finish(exp_dir: Path, run_dir: Path, ckpt: Path, record: dict[str, Any], max_steps: int, *, wall_s: float,
           timings: dict[str, float]) -> TrainReport:
    """Write metrics.jsonl, the loss plot and train_report.json from the final checkpoint."""
    meta = json.loads((ckpt / CHECKPOINT_META).read_text())
    history = read_history(ckpt / CHECKPOINT_HISTORY)
    atomic_write_bytes(exp_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history).encode())
    plot = plot_loss_curve(history, exp_dir / PLOT_FILE, title=f"{record['train']['exp_manager']['name']}")
    train_recs = [r for r in history if r.get("kind") == "train"]
    val_recs = [r for r in history if r.get("kind") == "val"]
    events = [r for r in history if r.get("kind") == "event"]
    tps = [r["tokens_per_s"] for r in train_recs[1:] or train_recs if r.get("tokens_per_s")]
    mfu = [r["mfu"] for r in train_recs[1:] or train_recs if r.get("mfu")]
    import torch

    from retro_ray.model.retro import RetroModel

    with torch.device("meta"):  # count parameters without allocating or initialising them
        n_params = RetroModel(RetroConfig.from_dict(meta["model_config"])).num_parameters()
    report = TrainReport(
        exp_dir=str(exp_dir), run_dir=str(run_dir), final_step=int(meta["train_step"]), max_steps=max_steps,
        final_checkpoint=str(ckpt), metrics_path=str(exp_dir / METRICS_FILE), plot_path=str(plot) if plot else None,
        tensorboard_dir=str(exp_dir / TENSORBOARD_DIR) if (exp_dir / TENSORBOARD_DIR).is_dir() else None,
        num_parameters=n_params,
        train_loss=train_recs[-1]["train_loss"] if train_recs else None,
        val_loss=val_recs[-1]["val_loss"] if val_recs else None,
        val_ppl=val_recs[-1]["val_ppl"] if val_recs else None,
        tokens_per_s=statistics.median(tps) if tps else None,
        mfu=statistics.median(mfu) if mfu else None,
        deepspeed_init_s=events[0].get("deepspeed_init_s") if events else None,
        restarts=sum(1 for r in events if r.get("event") == "resume"),
        wall_s=round(wall_s, 3),
        timings={**timings, **{k: v for k, v in (events[0] if events else {}).items() if k.endswith("_s")}},
    )
    atomic_write_json(exp_dir / REPORT_FILE, report.to_dict())  # last: marks the run complete
    return report


def plot_loss_curve(history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Train and validation loss against step (matplotlib, Agg backend), written atomically."""
    train = [(r["step"], r["train_loss"]) for r in history if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in history if r.get("kind") == "val"]
    if not train and not val:
        return None
    fig, ax = figure()
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=1.5, ms=4)
    return save_figure(fig, ax, path, xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
