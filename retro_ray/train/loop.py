"""The per-worker training loop: runs inside each Ray Train worker, drives one DeepSpeed engine.

Ray Train (TorchTrainer) has already started ``torch.distributed`` (gloo on CPU, nccl on GPU) when
:func:`train_loop_per_worker` runs; DeepSpeed is initialised on top of that process group.

One step = ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size`` on every worker,
then one optimizer update (DeepSpeed reduces the gradients and steps at the accumulation boundary).

Cadence (all counted in optimizer steps; none of it per step, because a Ray report costs ~1.5 s):
    log_every_n_steps     train loss (mean over workers), lr, grad norm, tokens/s, MFU -> history,
                          TensorBoard, W&B (rank 0), one printed line
    val_check_interval    loss / perplexity on the valid split, summed over all workers (all_reduce)
    checkpoint_interval   DeepSpeed save_checkpoint into a temporary directory per worker, reported
                          with ``ray.train.report(metrics, checkpoint=...)``; Ray merges the
                          workers' directories into one run checkpoint. After the last step too.

Each checkpoint also holds ``retro_ray.json`` (the model config, step, consumed samples, DeepSpeed
tag, data info) and ``metrics.jsonl`` (the history so far), so a resumed run carries its history
and export needs nothing else.

Resume: ``ray.train.get_checkpoint()`` is set when Ray Train restarts workers after a failure, or
when a run is started again with the same RunConfig(name, storage_path). It is the latest checkpoint
the Train controller has registered: a worker that dies within one controller poll (2 s) of a report
can take that report with it, and the restart then begins from the checkpoint before (or step 0). The engine's state (weights,
optimizer, LR schedule, step) is loaded and the data order continues where it stopped: the sampler
is positioned at the consumed sample count (same epoch seed, batches already seen are skipped
without being loaded).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from retro_ray.errors import RetroRayError
from retro_ray.model.loss import loss_kernel
from retro_ray.model.retro import IGNORE_INDEX, RetroConfig, RetroModel
from retro_ray.train import cpu_tuning
from retro_ray.train.config import TrainConfig, schedule_lr, schedule_params

log = logging.getLogger(__name__)

CHECKPOINT_META = "retro_ray.json"
CHECKPOINT_HISTORY = "metrics.jsonl"
CHECKPOINT_FORMAT = "retro-ray-checkpoint"

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s per GPU, matched against
# torch.cuda.get_device_name() in order (more specific names first).
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


# --------------------------------------------------------------------------------------------------
# Pieces that need no Ray (unit-testable)
# --------------------------------------------------------------------------------------------------


def decay_split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Parameter names (named_parameters order) with and without weight decay.

    No weight decay on biases and LayerNorm gains/biases (1-D: decay would pull the norms' scales to
    0 and buys nothing against overfitting) nor on the token embedding (tied with the output layer;
    decay would shrink the rows of rare tokens toward 0) -- the GPT-2 / Megatron / NeMo convention.
    Decay applies to the matrix weights of the linear layers.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.startswith("token_embedding.") else decay).append(name)
    return decay, no_decay


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: [decayed, not decayed] (see :func:`decay_split`)."""
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup + cosine decay to min_lr (see ``config.lr_at``), the same lr in every group.

    Returns absolute values (not factors of the base lr), so min_lr is reached exactly. DeepSpeed
    steps it once per optimizer step and saves its state (the step count) in its checkpoints.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: dict[str, Any], last_epoch: int = -1):
        self.params = dict(params)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        lr = schedule_lr(max(self.last_epoch, 0), **self.params)
        return [lr for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The position only: on resume the schedule's shape comes from the config (so a resumed
        run with a larger max_steps decays over the new length), the step count from the checkpoint."""
        state = super().state_dict()
        state.pop("params", None)
        return state


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict. No "optimizer" / "scheduler" sections: both are passed in as torch
    objects (a config optimizer "AdamW" would build DeepSpeed's FusedAdam, compiled on first use)."""
    t, m = cfg.trainer, cfg.model
    ds: dict[str, Any] = {
        "train_batch_size": m.global_batch_size,
        "train_micro_batch_size_per_gpu": m.micro_batch_size,
        "gradient_accumulation_steps": m.global_batch_size // (m.micro_batch_size * world_size),
        # fp32 without ZeRO: DeepSpeed clips but throws the norm away, so the loop clips itself
        # (torch clip_grad_norm_ after the boundary all-reduce: the same operation) and logs the norm.
        "gradient_clipping": 0.0 if loop_clips_gradients(cfg) else t.gradient_clip_val,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if t.zero_stage > 0:
        # Plain all-reduce of the gradient buckets: works on every backend (gloo included) and, for
        # models of this size, costs nothing against reduce-scatter.
        ds["zero_optimization"].update(reduce_scatter=False, overlap_comm=False, contiguous_gradients=True)
    return ds


def loop_clips_gradients(cfg: TrainConfig) -> bool:
    return cfg.trainer.precision == "32" and cfg.trainer.zero_stage == 0


def collate(items: list[dict[str, np.ndarray]], with_neighbors: bool = True) -> dict[str, torch.Tensor]:
    """Stack dataset items; tokens = text[:-1], labels = text[1:] (next-token targets)."""
    text = torch.from_numpy(np.stack([it["text"] for it in items]).astype(np.int64, copy=False))
    batch = {"tokens": text[:, :-1].contiguous(), "labels": text[:, 1:].contiguous()}
    if with_neighbors:
        batch["neighbor_tokens"] = torch.from_numpy(
            np.stack([it["neighbor_tokens"] for it in items]).astype(np.int64, copy=False))
        batch["neighbor_mask"] = torch.from_numpy(np.stack([it["neighbor_mask"] for it in items]).astype(bool))
    return batch


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch (resume without loading the skipped
    batches): ``set_position(epoch, start)`` skips this rank's first ``start`` indices of that epoch."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def gpu_peak_flops(device_name: str) -> float | None:
    for key, flops in GPU_PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


def peak_flops_per_worker(cfg: TrainConfig, on_gpu: bool) -> float | None:
    """trainer.peak_flops if set; else the GPU table for bf16/fp16; else None (CPU, fp32: MFU null)."""
    if cfg.trainer.peak_flops:
        return cfg.trainer.peak_flops
    if on_gpu and cfg.trainer.precision in ("bf16", "fp16"):
        return gpu_peak_flops(torch.cuda.get_device_name())
    return None


def build_engine(cfg: TrainConfig, model_cfg: RetroConfig, world_size: int, on_gpu: bool):
    """RetroModel + torch AdamW + WarmupCosineLR wrapped by ``deepspeed.initialize``; returns
    (engine, timings in seconds: import_deepspeed_s, disable_compiles_s, model_optimizer_s (the first
    torch optimizer imports torch._dynamo, ~2 s), deepspeed_init_s)."""
    timings = {}
    t0 = time.perf_counter()
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    timings["import_deepspeed_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not on_gpu:
        cpu_tuning.disable_deepspeed_cpu_compiles()
    timings["disable_compiles_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every rank (DeepSpeed also broadcasts)
    model = RetroModel(model_cfg)
    model.activation_checkpointing = cfg.trainer.activation_checkpointing
    model.loss_fn = loss_kernel(cfg.trainer.loss_kernel)  # imports liger / cce here: a missing package fails at once
    if cfg.model.init_from:  # RETRO-fitting: the decoder from the base, CCA outputs at zero, maybe frozen
        from retro_ray.model.retrofit import retrofit
        from retro_ray.train.export import read_base

        timings.update(retrofit(model, read_base(cfg.model.init_from)[1], freeze=model_cfg.retro.freeze_decoder,
                                source=cfg.model.init_from))
    if on_gpu:  # where DeepSpeed will put it; the optimizer is built on the moved parameters
        model = model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    else:  # CPU workers: dropout masks drawn with numpy, much faster than torch's bernoulli_ there
        cpu_tuning.tune_model(model)
    o = cfg.model.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
        # torch's fused kernel (no DeepSpeed build): one pass over each tensor per step. On CUDA, and on
        # CPU too, where torch's default (a loop of ~8 tensor ops per parameter) took 120 ms a step
        # at the cpu50k shape on one thread, fused 40 ms (same updates to within a float32 ulp).
        fused=True,
    )
    timings["model_optimizer_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=partial(WarmupCosineLR, params=schedule_params(cfg)),
        config=deepspeed_config(cfg, world_size),
        dist_init_required=False,  # Ray Train already initialised torch.distributed
    )
    timings["deepspeed_init_s"] = time.perf_counter() - t0
    if compiles(cfg.trainer.compile, on_gpu):
        # In place (nn.Module.compile): parameter names, checkpoints and exports stay as they are.
        # The compile itself happens in the first steps (and once more for validation's eval mode).
        engine.compile()
    return engine, {k: round(v, 3) for k, v in timings.items()}


def compiles(setting: bool | str, on_gpu: bool) -> bool:
    """trainer.compile: auto compiles on GPU workers only (on CPUs, inductor's code was slower here)."""
    return on_gpu if setting == "auto" else bool(setting)


def say(line: str) -> None:
    """One line to the worker's stdout (Ray forwards it to the driver). Not print(): Ray Train V2
    patches print into its logger, which shows every line twice."""
    sys.stdout.write(f"[retro-ray] {line}\n")
    sys.stdout.flush()


def checkpoint_meta(cfg: TrainConfig, model_cfg: RetroConfig, step: int, world_size: int,
                    model_data: dict[str, Any]) -> dict[str, Any]:
    """What ``retro_ray.json`` holds: enough to resume, export and load the checkpoint."""
    return {"format": CHECKPOINT_FORMAT, "version": 1, "train_step": step,
            "consumed_samples": step * cfg.model.global_batch_size, "tag": f"global_step{step}",
            "zero_stage": cfg.trainer.zero_stage, "precision": cfg.trainer.precision, "world_size": world_size,
            "model_config": model_cfg.to_dict(), "model_data": dict(model_data), "train_config": cfg.to_dict()}


def write_checkpoint(engine: Any, directory: Path, meta: dict[str, Any], history: list[dict] | None) -> None:
    """DeepSpeed's save_checkpoint (every rank: ZeRO ranks write their optimizer partitions) plus,
    where ``history`` is given (rank 0), retro_ray.json and metrics.jsonl."""
    engine.save_checkpoint(str(directory), tag=meta["tag"], client_state={"retro_ray": {"train_step": meta["train_step"]}})
    if history is not None:
        write_history(directory / CHECKPOINT_HISTORY, history)
        (directory / CHECKPOINT_META).write_text(json.dumps(meta, indent=2) + "\n")


def check_resumable(meta: dict[str, Any], zero_stage: int, world_size: int, precision: str | None = None) -> None:
    """A ZeRO checkpoint is partitioned by rank: it loads only into the same number of workers. And
    DeepSpeed keeps a bf16 / fp16 run's optimizer state (fp32 master weights) in another layout than
    a 32 run's: a checkpoint loads only into the precision it was written in."""
    old_stage, old_world = int(meta.get("zero_stage", 0)), int(meta.get("world_size", world_size))
    if (old_stage > 0 or zero_stage > 0) and (old_world != world_size or old_stage != zero_stage):
        raise RetroRayError(
            f"the checkpoint was written by {old_world} workers with ZeRO stage {old_stage}; its optimizer "
            f"state is partitioned per worker, so resume it with trainer.num_workers={old_world} and "
            f"trainer.zero_stage={old_stage} (now {world_size} and {zero_stage})."
        )
    old_precision = meta.get("precision")
    if precision is not None and old_precision is not None and old_precision != precision:
        raise RetroRayError(
            f"the checkpoint was written in precision {old_precision} and this run trains in {precision}; its "
            f"optimizer state fits only its own precision, so resume it with trainer.precision={old_precision} "
            "(or start a new run in another exp_dir)."
        )


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in history))


# --------------------------------------------------------------------------------------------------
# Loggers (rank 0)
# --------------------------------------------------------------------------------------------------


class _Loggers:
    def __init__(self, spec: dict[str, Any], cfg: TrainConfig, rank: int, start_step: int):
        self.tb = None
        self.wandb = None
        if rank != 0:
            return
        exp_dir = Path(spec["exp_dir"])
        if cfg.exp_manager.create_tensorboard_logger:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events of steps after the checkpoint we start from (written before a
            # failure, now redone) are dropped from the curves.
            self.tb = SummaryWriter(str(exp_dir / "tensorboard"), purge_step=start_step + 1)
        if cfg.exp_manager.create_wandb_logger:
            self.wandb = start_wandb(cfg, exp_dir, spec)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        scalars = {k: v for k, v in record.items()
                   if k not in ("step", "kind", "time") and isinstance(v, (int, float)) and v is not None}
        prefix = "val" if record.get("kind") == "val" else "train"
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k.removeprefix(prefix + '_')}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k.removeprefix(prefix + '_')}": v for k, v in scalars.items()}, step=step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_module() -> Any:
    try:
        import wandb
    except ImportError:
        raise RetroRayError(
            "exp_manager.create_wandb_logger=true but wandb is not installed; `pip install wandb` "
            "(offline mode needs no account), or set exp_manager.create_wandb_logger=false."
        ) from None
    return wandb


def start_wandb(cfg: TrainConfig, exp_dir: Path, spec: dict[str, Any]) -> Any:
    wandb = wandb_module()
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"  # no account configured: log locally, `wandb sync` later
    import hashlib

    run_id = hashlib.sha1(f"{exp_dir.resolve()}/{cfg.exp_manager.name}".encode()).hexdigest()[:16]
    return wandb.init(project=cfg.exp_manager.wandb_project, name=cfg.exp_manager.name, id=run_id,
                      resume="allow", dir=str(exp_dir), config={"train": spec["train"], "model": spec["model"]})


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def train_loop_per_worker(spec: dict[str, Any]) -> None:
    """Ray Train entry point. ``spec``: train (TrainConfig dict), model (RetroConfig dict),
    model_data (dict), dataset_factory (callable split -> Dataset), exp_dir, use_gpu."""
    import ray.train

    t_start = time.perf_counter()
    cfg = TrainConfig.from_dict(spec["train"])
    model_cfg = RetroConfig.from_dict(spec["model"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = bool(spec["use_gpu"])
    # Before the model exists, so that every large tensor of training comes from the tuned heap.
    keeps_freed_memory = not on_gpu and cfg.trainer.cpu_keep_freed_memory and cpu_tuning.keep_freed_memory()
    # Must be set before DeepSpeed first looks for an accelerator (deepspeed is imported below).
    os.environ["DS_ACCELERATOR"] = "cuda" if on_gpu else "cpu"
    engine, init_timings = build_engine(cfg, model_cfg, world, on_gpu)
    # DeepSpeed places the model on cuda:LOCAL_RANK (Ray Train shares CUDA_VISIBLE_DEVICES among a
    # node's workers, so that is this worker's own GPU); the batches go where the model is.
    device = engine.device if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)

    # ---- resume ----------------------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    start_step, consumed = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta = json.loads((Path(d) / CHECKPOINT_META).read_text())
            # from_dict fills settings added since the checkpoint was written with their defaults
            if RetroConfig.from_dict(meta["model_config"]).to_dict() != model_cfg.to_dict():
                raise RetroRayError(
                    "the checkpoint to resume from was trained with a different model config; start a "
                    "new run (another exp_manager.name or exp_dir) to train this one."
                )
            check_resumable(meta, cfg.trainer.zero_stage, world, cfg.trainer.precision)
            engine.load_checkpoint(d, tag=meta["tag"], load_optimizer_states=True, load_lr_scheduler_states=True)
            history = read_history(Path(d) / CHECKPOINT_HISTORY)
        start_step, consumed = int(meta["train_step"]), int(meta["consumed_samples"])
        if engine.global_steps != start_step:
            raise RuntimeError(f"checkpoint step {start_step} != engine step {engine.global_steps}")
        # The optimizer state brought back the lr of the checkpointed schedule; the next update
        # follows the configured one (they differ when a run is resumed with new settings).
        for group in engine.optimizer.param_groups:
            group["lr"] = schedule_lr(start_step, **schedule_params(cfg))
    from retro_ray.runtime import current_node

    worker_nodes: list = [None] * world  # the Ray node of each rank, in rank order
    torch.distributed.all_gather_object(worker_nodes, current_node())
    init_record = {"kind": "event", "event": "resume" if checkpoint is not None else "start", "step": start_step,
                   "world_size": world, "worker_nodes": worker_nodes, "compiled": engine.is_compiled,
                   "cpu_keeps_freed_memory": keeps_freed_memory, **init_timings,
                   "worker_setup_s": round(time.perf_counter() - t_start, 3), "time": time.time()}
    history.append(init_record)
    torch.manual_seed(cfg.trainer.seed + 7919 * rank + start_step)  # dropout streams differ per rank

    # ---- data ------------------------------------------------------------------------------------
    m, t = cfg.model, cfg.trainer
    gas = m.global_batch_size // (m.micro_batch_size * world)
    with_neighbors = model_cfg.retro.enabled
    coll = partial(collate, with_neighbors=with_neighbors)
    train_ds = spec["dataset_factory"]("train")
    sampler = ResumableDistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=m.data.shuffle,
                                          seed=t.seed, drop_last=True)
    per_epoch = sampler.num_samples // m.micro_batch_size  # micro-batches per worker per epoch
    if per_epoch == 0:
        raise RetroRayError(
            f"the train split has {len(train_ds)} samples, fewer than one micro-batch per worker "
            f"({m.micro_batch_size} x {world} workers); lower model.micro_batch_size or use more data."
        )
    loader_kw = {"batch_size": m.micro_batch_size, "collate_fn": coll, "num_workers": m.data.num_workers,
                 "pin_memory": on_gpu, "persistent_workers": m.data.num_workers > 0}
    train_loader = DataLoader(train_ds, sampler=sampler, drop_last=True, **loader_kw)
    val_loader = None
    if t.limit_val_batches != 0:
        val_ds = spec["dataset_factory"]("valid")
        if len(val_ds):
            # Every sample once (no padding): rank r takes r, r + world, ...; sums are all-reduced.
            val_loader = DataLoader(val_ds, sampler=list(range(rank, len(val_ds), world)), **loader_kw)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        epoch, offset = divmod(consumed // (m.micro_batch_size * world), per_epoch)
        while True:
            sampler.set_position(epoch, offset * m.micro_batch_size)
            yield from train_loader
            epoch, offset = epoch + 1, 0

    def to_device(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device, non_blocking=True) for k, v in b.items()}

    # ---- accounting ------------------------------------------------------------------------------
    loggers = _Loggers(spec, cfg, rank, start_step)
    tokens_per_step = m.global_batch_size * model_cfg.seq_length
    flops_per_token = engine.module.flops_per_token()
    peak = peak_flops_per_worker(cfg, on_gpu)
    comm_device = device if on_gpu else torch.device("cpu")

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    def validate(step: int) -> dict[str, Any]:
        totals = torch.zeros(2, dtype=torch.float64, device=comm_device)
        if val_loader is not None:
            engine.eval()
            with torch.no_grad():
                for i, b in enumerate(val_loader):
                    if t.limit_val_batches is not None and i >= t.limit_val_batches:
                        break
                    b = to_device(b)
                    out = engine(**b)
                    n = (b["labels"] != IGNORE_INDEX).sum()
                    totals += torch.stack([out.loss.double() * n, n.double()])
            engine.train()
        torch.distributed.all_reduce(totals)
        loss = (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")
        return {"kind": "val", "step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
                "val_tokens": int(totals[1].item()), "time": time.time()}

    def save_and_report(step: int, metrics: dict[str, Any]) -> None:
        import ray.train

        tmp = Path(tempfile.mkdtemp(prefix=f"retro-ray-ckpt-{rank}-"))
        try:
            meta = checkpoint_meta(cfg, model_cfg, step, world, spec.get("model_data", {}))
            write_checkpoint(engine, tmp, meta, history if rank == 0 else None)
            if rank == 0:
                loggers.flush()
            has_files = any(p.is_file() for p in tmp.rglob("*"))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(tmp)) if has_files else None,
                checkpoint_dir_name=f"checkpoint_{step:08d}",
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- train -----------------------------------------------------------------------------------
    from retro_ray.metrics import stage_metrics

    train_metrics = stage_metrics("train")  # Ray metrics (Prometheus / Grafana), recorded by rank 0
    engine.train()
    data = batches()
    step = start_step
    loss_acc, loss_steps = torch.zeros((), dtype=torch.float64, device=comm_device), 0
    window_t0, window_steps = time.perf_counter(), 0
    last: dict[str, Any] = {}
    own_clip = loop_clips_gradients(cfg)
    clip = t.gradient_clip_val if t.gradient_clip_val > 0 else float("inf")  # inf: measure, do not clip
    grad_norm: Any = None
    lr_used = float("nan")
    while step < t.max_steps:
        for _ in range(gas):
            b = to_device(next(data))
            out = engine(**b)
            engine.backward(out.loss)
            if engine.is_gradient_accumulation_boundary():
                lr_used = engine.get_lr()[0]  # the lr of this update (the scheduler steps after it)
                if own_clip:
                    grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip)
            engine.step()  # DeepSpeed reduces gradients and updates only at the accumulation boundary
            loss_acc += out.loss.detach().double() / gas
        step += 1
        loss_steps += 1
        window_steps += 1

        do_log = step % t.log_every_n_steps == 0 or step == t.max_steps
        do_val = val_loader is not None and (step % t.val_check_interval == 0 or step == t.max_steps)
        do_ckpt = step % t.checkpoint_interval == 0 or step == t.max_steps
        if do_log:
            sync()
            elapsed = time.perf_counter() - window_t0
            mean = loss_acc / loss_steps
            torch.distributed.all_reduce(mean)
            tps = window_steps * tokens_per_step / elapsed if elapsed > 0 else None
            gn = grad_norm if own_clip else engine.get_global_grad_norm()
            rec = {"kind": "train", "step": step, "train_loss": mean.item() / world,
                   "lr": lr_used, "grad_norm": None if gn is None else float(gn),
                   "tokens_per_s": tps, "step_time_s": elapsed / window_steps,
                   "mfu": (flops_per_token * tps / (peak * world)) if (peak and tps) else None,
                   "time": time.time()}
            if rank == 0:
                history.append(rec)
                loggers.log(rec)
                train_metrics.train_loss(rec["train_loss"])
                train_metrics.seconds(rec["step_time_s"], step="step")  # mean over the logging window
                if tps:
                    train_metrics.train_tokens_per_second(tps)
                if rec["mfu"]:
                    train_metrics.train_mfu(rec["mfu"])
                say(f"step {step}/{t.max_steps} loss {rec['train_loss']:.4f} lr {rec['lr']:.3g} "
                    f"grad_norm {rec['grad_norm'] or 0:.3f} tokens/s {tps or 0:,.0f}"
                    + (f" mfu {rec['mfu']:.3f}" if rec["mfu"] else ""))
            last.update(train_loss=rec["train_loss"], lr=rec["lr"], tokens_per_s=tps)
            loss_acc.zero_()
            loss_steps = 0
        if do_val:
            t_val = time.perf_counter()
            rec = validate(step)
            if rank == 0:
                history.append(rec)
                loggers.log(rec)
                train_metrics.train_loss(rec["val_loss"], split="valid")
                train_metrics.seconds(time.perf_counter() - t_val, step="validate")
                say(f"step {step} val_loss {rec['val_loss']:.4f} val_ppl {rec['val_ppl']:.2f}")
            last.update(val_loss=rec["val_loss"], val_ppl=rec["val_ppl"])
        if do_ckpt:
            t_ckpt = time.perf_counter()
            save_and_report(step, {"step": step, **last})
            if rank == 0:
                train_metrics.seconds(time.perf_counter() - t_ckpt, step="checkpoint")
        if do_val or do_ckpt or do_log:
            sync()
            window_t0, window_steps = time.perf_counter(), 0
    loggers.close()
