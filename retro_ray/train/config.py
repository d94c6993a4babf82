"""The training configuration: ``trainer`` / ``model`` / ``exp_manager``, named as in NeMo.

The tree (every leaf has help text, printed by ``--help`` through :func:`retro_ray.config.field_help`)::

    trainer.*       how to run: workers, GPU, precision, steps, validation / checkpoint / log cadence,
                    gradient clipping, ZeRO stage, failure retries
    model.*         the architecture (RetroConfig's own fields, same names and defaults: num_layers,
                    hidden_size, ..., retro.retro_num_neighbors, ...) plus micro_batch_size,
                    global_batch_size, optim.* (AdamW + optim.sched.*) and data.*
    exp_manager.*   where and under which name the run is written; TensorBoard and W&B loggers

One source of truth for the architecture: :class:`ModelConfig` *is* a :class:`RetroConfig` (a
subclass), so its defaults, help texts and validation are RetroConfig's. Only the three settings
that the data fixes -- ``seq_length``, ``chunk_length``, ``vocab_size`` -- default to empty here:
for a real run they come from the project's config.json (:func:`resolve_model_config`), and a value
the user gives must agree with the data.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from pathlib import Path
from typing import Any

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.model.loss import LOSS_KERNELS
from retro_ray.model.retro import RetroConfig

VOCAB_MULTIPLE = 64
PRECISIONS = ("auto", "bf16", "fp16", "32")
SCHEDULERS = ("CosineAnnealing", "constant")
OPTIMIZERS = ("adamw",)
# Keys of ``model`` that only change how the model is trained, not which weights it has; everything
# else under ``model`` is the architecture and must match a checkpoint to resume from it.
MODEL_TRAINING_KEYS = ("micro_batch_size", "global_batch_size", "optim", "data")


# --------------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------------


@C.config_class
class TrainerSettings:
    num_workers: int = field(
        default=1, metadata=C.doc("Ray Train workers (data-parallel ranks); one GPU each when use_gpu.")
    )
    use_gpu: bool | str = field(
        default="auto",
        metadata=C.doc("true | false | auto. auto = use GPUs when the Ray cluster has any."),
    )
    # Measurements behind both defaults: benchmarks/README.md, section "train" (and its "Keeping
    # freed memory on CPU workers"); the current figures are in README.md, "Performance".
    compile: bool | str = field(
        default="auto",
        metadata=C.doc(
            "true | false | auto. torch.compile the model inside the DeepSpeed engine (engine.compile; "
            "weights and checkpoints unchanged). auto = on GPU workers only: there it raises MFU, while "
            "on CPUs inductor's code ran slower than eager, after a long compile."
        ),
    )
    cpu_keep_freed_memory: bool = field(
        default=True,
        metadata=C.doc(
            "CPU workers on Linux (glibc): keep freed memory in the process for the next step instead of "
            "returning large tensors to the system after each use (mallopt mmap/trim thresholds). Saves "
            "the page faults of mapping them afresh every step; the worker keeps its peak footprint. The "
            "larger the model's tensors, the more it saves. No effect on GPU workers."
        ),
    )
    cpus_per_worker: float = field(
        default=1.0,
        metadata=C.doc("Ray CPUs reserved by each worker (fractions allowed, e.g. 0.5 to fit 2 workers on 1 CPU)."),
    )
    max_steps: int = field(default=1000, metadata=C.doc("Optimizer steps to train for (each is global_batch_size samples)."))
    precision: str = field(
        default="bf16",
        metadata=C.doc(
            "auto | bf16 | fp16 | 32. bf16: bf16 weights and activations, fp32 master weights and optimizer "
            "state (DeepSpeed); fp16 the same with loss scaling, GPU only; 32: fp32 throughout. auto = bf16 on "
            "GPU workers and on CPUs with AMX (bf16 matrix tiles), else 32; decided where training starts, "
            "logged, and written in every checkpoint. A run resumes only in the precision it was started in."
        ),
    )
    loss_kernel: str = field(
        default="retro_ray",
        metadata=C.doc(
            "retro_ray | liger | cce. The fused output layer + cross-entropy of training steps (the logits are "
            "never stored whole): retro_ray, this project's (every device); liger (liger-kernel) or cce "
            "(cut-cross-entropy), Triton kernels for CUDA workers, each an optional package (pip install "
            "liger-kernel / cut-cross-entropy), asked for the same numerics (float32 gradient sums, no "
            "gradient entries dropped). Evaluation always uses retro_ray's."
        ),
    )
    val_check_interval: int = field(
        default=100, metadata=C.doc("Validate every this many steps (and after the last step).")
    )
    limit_val_batches: int | None = field(
        default=None,
        metadata=C.doc("Validation micro-batches per worker; empty = the whole valid split, 0 = no validation."),
    )
    checkpoint_interval: int = field(
        default=500,
        metadata=C.doc(
            "Save a DeepSpeed checkpoint (and report to Ray Train) every this many steps, and after the "
            "last step. Each one pauses training to write and report it, so keep this well above 1."
        ),
    )
    log_every_n_steps: int = field(
        default=10, metadata=C.doc("Log train loss, lr, grad norm, tokens/s, MFU every this many steps.")
    )
    seed: int = field(default=1234, metadata=C.doc("Seed for weight init, dropout and the data order."))
    gradient_clip_val: float = field(
        default=1.0, metadata=C.doc("Clip the global gradient norm to this value; 0 = no clipping.")
    )
    zero_stage: int = field(
        default=0,
        metadata=C.doc("DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (shard optimizer state), 2 (+ gradients), "
                       "3 (+ the weights themselves, gathered layer by layer as they are used)."),
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata=C.doc(
            "Keep only each decoder layer's input during the forward pass and recompute the layer in "
            "backward: activation memory falls from every layer's intermediates to one layer's, for about "
            "one more forward pass of compute. Results are the same bit for bit (dropout included)."
        ),
    )
    peak_flops: float | None = field(
        default=None,
        metadata=C.doc(
            "Peak FLOP/s of one worker's device, for MFU. Empty = a built-in table of GPUs (bf16/fp16 "
            "dense: H100 SXM 989e12, A100 312e12, ...); on CPU, or in fp32, MFU is null unless set."
        ),
    )
    max_failures: int = field(
        default=1,
        metadata=C.doc("Worker failures to recover from (restart from the latest checkpoint); -1 = unlimited."),
    )
    num_checkpoints_to_keep: int = field(
        default=2, metadata=C.doc("Checkpoints kept in the run directory (older ones are deleted).")
    )
    check_cluster_resources: bool = field(
        default=True,
        metadata=C.doc(
            "Refuse to start when the Ray cluster has fewer CPUs/GPUs than the workers need; set false on "
            "an autoscaling cluster that will grow to fit."
        ),
    )

    def __post_init__(self) -> None:
        for name in ("num_workers", "max_steps", "val_check_interval", "checkpoint_interval", "log_every_n_steps",
                     "num_checkpoints_to_keep"):
            if getattr(self, name) < 1:
                raise RetroRayError(f"trainer.{name}={getattr(self, name)} must be at least 1.")
        if isinstance(self.use_gpu, str) and self.use_gpu != "auto":
            raise RetroRayError(f"trainer.use_gpu={self.use_gpu!r} must be true, false or auto.")
        if isinstance(self.compile, str) and self.compile != "auto":
            raise RetroRayError(f"trainer.compile={self.compile!r} must be true, false or auto.")
        if not self.cpus_per_worker > 0:
            raise RetroRayError(f"trainer.cpus_per_worker={self.cpus_per_worker} must be positive (e.g. 1 or 0.5).")
        if self.precision not in PRECISIONS:
            raise RetroRayError(
                f"trainer.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}; auto picks bf16 or 32 for the hardware."
            )
        if self.loss_kernel not in LOSS_KERNELS:
            raise RetroRayError(
                f"trainer.loss_kernel={self.loss_kernel!r} is not one of {', '.join(LOSS_KERNELS)}; retro_ray runs "
                "everywhere, liger and cce on CUDA GPUs."
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise RetroRayError(f"trainer.zero_stage={self.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3.")
        if self.limit_val_batches is not None and self.limit_val_batches < 0:
            raise RetroRayError(f"trainer.limit_val_batches={self.limit_val_batches} must be >= 0, or empty for all.")
        if self.gradient_clip_val < 0:
            raise RetroRayError(f"trainer.gradient_clip_val={self.gradient_clip_val} must be >= 0 (0 = no clipping).")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise RetroRayError(f"trainer.peak_flops={self.peak_flops} must be positive, or empty.")
        if self.max_failures < -1:
            raise RetroRayError(f"trainer.max_failures={self.max_failures} must be -1 (unlimited) or >= 0.")


# --------------------------------------------------------------------------------------------------
# model (architecture = RetroConfig) + optimisation
# --------------------------------------------------------------------------------------------------


@C.config_class
class SchedConfig:
    name: str = field(
        default="CosineAnnealing",
        metadata=C.doc(
            "CosineAnnealing (linear warmup from 0, cosine decay to min_lr at max_steps - constant_steps, "
            "then min_lr) or constant (linear warmup, then lr)."
        ),
    )
    warmup_steps: int = field(default=100, metadata=C.doc("Steps of linear warmup from 0 to optim.lr."))
    min_lr: float = field(default=6e-5, metadata=C.doc("Learning rate at the end of the cosine decay."))
    constant_steps: int = field(
        default=0, metadata=C.doc("Steps at min_lr after the decay, at the end of the schedule.")
    )
    max_steps: int | None = field(
        default=None, metadata=C.doc("Length of the schedule in steps; empty = trainer.max_steps.")
    )

    def __post_init__(self) -> None:
        if self.name not in SCHEDULERS:
            raise RetroRayError(f"model.optim.sched.name={self.name!r} is not one of {', '.join(SCHEDULERS)}.")
        if self.warmup_steps < 0 or self.constant_steps < 0:
            raise RetroRayError("model.optim.sched.warmup_steps and constant_steps must be >= 0.")
        if self.max_steps is not None and self.max_steps < 1:
            raise RetroRayError(f"model.optim.sched.max_steps={self.max_steps} must be >= 1, or empty for trainer.max_steps.")


@C.config_class
class OptimConfig:
    name: str = field(
        default="adamw",
        metadata=C.doc(
            "adamw (torch.optim.AdamW, decoupled weight decay; no decay on biases, LayerNorm and the "
            "embedding). NeMo's distributed_fused_adam has no counterpart here."
        ),
    )
    lr: float = field(default=6e-4, metadata=C.doc("Peak learning rate."))
    weight_decay: float = field(default=0.1, metadata=C.doc("AdamW weight decay on matrix weights."))
    betas: tuple[float, ...] = field(default=(0.9, 0.95), metadata=C.doc("AdamW (beta1, beta2)."))
    eps: float = field(default=1e-8, metadata=C.doc("AdamW epsilon."))
    sched: SchedConfig = field(default_factory=SchedConfig, metadata=C.doc("Learning-rate schedule."))

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise RetroRayError(f"model.optim.name={self.name!r} is not supported; use adamw.")
        if not self.lr > 0:
            raise RetroRayError(f"model.optim.lr={self.lr} must be positive.")
        if self.weight_decay < 0:
            raise RetroRayError(f"model.optim.weight_decay={self.weight_decay} must be >= 0.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise RetroRayError(f"model.optim.betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95].")
        if not self.eps > 0:
            raise RetroRayError(f"model.optim.eps={self.eps} must be positive, e.g. 1e-8.")
        if self.sched.min_lr < 0 or self.sched.min_lr > self.lr:
            raise RetroRayError(f"model.optim.sched.min_lr={self.sched.min_lr} must be between 0 and model.optim.lr={self.lr}.")


@C.config_class
class DataSettings:
    num_workers: int = field(
        default=0,
        metadata=C.doc("DataLoader worker processes per training worker; 0 = load in the training process."),
    )
    shuffle: bool = field(
        default=True, metadata=C.doc("Shuffle the train split (seeded by trainer.seed and the epoch).")
    )

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise RetroRayError(f"model.data.num_workers={self.num_workers} must be >= 0.")


@C.config_class
class ModelConfig(RetroConfig):
    """RetroConfig's architecture fields, plus batch sizes, optimiser and data loading.

    seq_length, chunk_length and vocab_size come from the project (empty = take the data's); see
    :func:`resolve_model_config`.
    """

    vocab_size: int | None = field(
        default=None,
        metadata=C.doc(
            "Embedding rows. Empty = the tokenizer's vocabulary padded up to a multiple of 64; a value "
            "given must be at least the tokenizer's."
        ),
    )
    seq_length: int | None = field(
        default=None,
        metadata=C.doc("Empty = the project's seq_length (config.json); a value given must equal it."),
    )
    chunk_length: int | None = field(
        default=None,
        metadata=C.doc("Empty = the project's chunk_length (config.json); a value given must equal it."),
    )
    init_from: str | None = field(
        default=None,
        metadata=C.doc(
            "A pretrained decoder to RETRO-fit: a model.pt written by `retro-ray export` or `import-hf` (a GPT "
            "baseline, or a RETRO whose decoder is taken), a local Hugging Face GPT-2 / Llama / Qwen2 "
            "directory, or a GGUF file of those architectures. The decoder's shape comes from it (a shape setting that "
            "disagrees is refused, naming both values) and so do its weights; the encoder and CCA are new, "
            "with CCA outputs at zero so that step 0 equals the base exactly. With "
            "model.retro.freeze_decoder=true only the encoder and CCA train (Borgeaud et al. 2022, sec. 4.2)."
        ),
    )
    micro_batch_size: int = field(default=4, metadata=C.doc("Samples per worker per forward/backward pass."))
    global_batch_size: int = field(
        default=8,
        metadata=C.doc(
            "Samples per optimizer step over all workers; gradient accumulation steps = "
            "global_batch_size / (micro_batch_size * trainer.num_workers), which must be a whole number."
        ),
    )
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=C.doc("Optimizer settings."))
    data: DataSettings = field(default_factory=DataSettings, metadata=C.doc("Data loading settings."))

    def architecture_dict(self) -> dict[str, Any]:
        """The RetroConfig part (data-given fields possibly empty), as a plain dict."""
        names = [f.name for f in dataclasses.fields(RetroConfig)]
        d = C.to_dict(self)
        return {k: d[k] for k in names}

    def preview(self) -> RetroConfig:
        """The architecture with stand-ins where the data will decide (for validation only)."""
        chunk = self.chunk_length or 64
        longest = self.max_position_embeddings if self.family == "gpt2" else 2048  # (gpt2: its position table)
        seq = self.seq_length or chunk * max(1, min(2048, longest) // chunk)
        arch = self.architecture_dict()
        arch.update(seq_length=seq, chunk_length=chunk, vocab_size=self.vocab_size or VOCAB_MULTIPLE)
        return RetroConfig.from_dict(arch)

    def __post_init__(self) -> None:
        """Check the architecture (RetroConfig's checks, on :meth:`preview`); the data-given fields are
        checked by :func:`resolve_model_config`. A RETRO-fit's are checked once its decoder's shape is taken
        from model.init_from (:func:`decoder_from_base` validates): until then the decoder settings are
        defaults, and e.g. retro_layers=[24,27,30] would be refused against the default 12 layers."""
        for name in ("micro_batch_size", "global_batch_size"):
            if getattr(self, name) < 1:
                raise RetroRayError(f"model.{name}={getattr(self, name)} must be at least 1.")
        if not self.init_from:
            self.preview()

    def validate(self) -> None:
        """RetroConfig's checks, on :meth:`preview` (the inherited ones would refuse the data-given
        fields left empty); construction already ran them."""
        self.preview()


# --------------------------------------------------------------------------------------------------
# exp_manager
# --------------------------------------------------------------------------------------------------


@C.config_class
class ExpManagerConfig:
    exp_dir: str | None = field(
        default=None,
        metadata=C.doc("Directory of the run (checkpoints, metrics, TensorBoard, plots); also Ray Train's storage_path."),
    )
    name: str = field(default="retro", metadata=C.doc("Run name: the Ray Train run directory under exp_dir."))
    create_tensorboard_logger: bool = field(
        default=True, metadata=C.doc("Write TensorBoard event files to <exp_dir>/tensorboard (rank 0).")
    )
    create_wandb_logger: bool = field(
        default=False,
        metadata=C.doc(
            "Log to Weights & Biases from rank 0 (needs `pip install wandb`). Without WANDB_MODE and "
            "WANDB_API_KEY it runs offline (WANDB_MODE=offline; `wandb sync` later)."
        ),
    )
    wandb_project: str = field(default="retro-ray", metadata=C.doc("W&B project name."))


# --------------------------------------------------------------------------------------------------
# the whole tree
# --------------------------------------------------------------------------------------------------


@C.config_class
class TrainConfig:
    trainer: TrainerSettings = field(default_factory=TrainerSettings, metadata=C.doc("How to run."))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=C.doc("Architecture and optimisation."))
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig, metadata=C.doc("Outputs and loggers."))

    # ---- derived values --------------------------------------------------------------------------

    @property
    def gradient_accumulation_steps(self) -> int:
        m, t = self.model, self.trainer
        return m.global_batch_size // (m.micro_batch_size * t.num_workers)

    @property
    def sched_max_steps(self) -> int:
        s = self.model.optim.sched.max_steps
        return self.trainer.max_steps if s is None else s

    def to_dict(self) -> dict[str, Any]:
        return C.to_dict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> TrainConfig:
        return C.build(cls, d or {})

    # ---- checks across sections (each section checks its own fields) -------------------------------

    def __post_init__(self) -> None:
        t, m, s = self.trainer, self.model, self.model.optim.sched
        per_step = m.micro_batch_size * t.num_workers
        if m.global_batch_size % per_step:
            lo = max(per_step, m.global_batch_size // per_step * per_step)
            raise RetroRayError(
                f"model.global_batch_size={m.global_batch_size} is not divisible by model.micro_batch_size="
                f"{m.micro_batch_size} x trainer.num_workers={t.num_workers} = {per_step}; set "
                f"model.global_batch_size to a multiple of {per_step} (e.g. {lo} or {lo + per_step}), or change "
                "the micro batch size or the worker count."
            )
        if s.name == "CosineAnnealing" and s.warmup_steps + s.constant_steps >= self.sched_max_steps:
            raise RetroRayError(
                f"model.optim.sched: warmup_steps={s.warmup_steps} + constant_steps={s.constant_steps} leave no "
                f"steps for the cosine decay within max_steps={self.sched_max_steps}; lower them or raise "
                "trainer.max_steps."
            )


def _architecture(cfg: TrainConfig, seq_length: int, chunk_length: int, vocab_size: int) -> RetroConfig:
    arch = cfg.model.architecture_dict()
    arch.update(seq_length=seq_length, chunk_length=chunk_length, vocab_size=vocab_size)
    return RetroConfig.from_dict(arch)


# --------------------------------------------------------------------------------------------------
# loading, data-given settings, the LR schedule
# --------------------------------------------------------------------------------------------------


def shipped_train_configs() -> list[Path]:
    return sorted(C.shipped_config_dir().glob("train_*.yaml"))


def load_train_config(config: str | Path | dict | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """A TrainConfig (validated, as every config) from a YAML file (a path, or a shipped name: tiny, demo, 125m), a dict
    or nothing (the defaults), with ``key.sub=value`` overrides (a list of strings or a nested dict)."""
    if config is None:
        base: dict = {}
    elif isinstance(config, dict):
        base = config
    else:
        path = Path(config)
        shipped = C.shipped_config_dir() / f"train_{config}.yaml"
        if not path.exists() and shipped.exists():
            path = shipped
        if not path.exists():
            names = ", ".join(p.stem.removeprefix("train_") for p in shipped_train_configs())
            raise RetroRayError(f"training config {config!s} is neither a YAML file nor a shipped config ({names}).")
        base = C.load_yaml(path)
    if isinstance(overrides, list):
        overrides = C.parse_overrides(overrides)
    return TrainConfig.from_dict(C.merge(base, overrides or {}))


def pad_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round up to a multiple of 64: the embedding and the output projection are [V, d] matmuls, and
    GPU tensor cores (bf16/fp16) run at full speed only when every GEMM dimension is a multiple of 8
    (64 also matches the kernels' tile sizes); the extra rows are never a target, so they learn nothing
    and cost < 64 * d parameters."""
    if vocab_size < 1:
        raise RetroRayError(f"vocab_size={vocab_size} must be positive; is the project's tokenizer trained?")
    return -(-vocab_size // multiple) * multiple


# RetroConfig fields that are not the decoder's shape: a RETRO-fit takes every other one from its base.
NOT_DECODER_SHAPE = ("retro", "seq_length", "chunk_length", "init_method_std", "hidden_dropout", "attention_dropout",
                     "ffn_dropout")


def decoder_from_base(train_cfg: TrainConfig, base: RetroConfig, source: str) -> TrainConfig:
    """``train_cfg`` with the decoder's shape (vocab_size included) of ``base``, the model RETRO-fitting
    starts from. A shape setting given away from its default that disagrees is an error naming both."""
    m = train_cfg.model
    defaults = ModelConfig()
    take = {}
    for f in dataclasses.fields(RetroConfig):
        if f.name in NOT_DECODER_SHAPE:
            continue
        given, want = getattr(m, f.name), getattr(base, f.name)
        if given != getattr(defaults, f.name) and given != want:
            raise RetroRayError(
                f"model.{f.name}={given} was given but the decoder in {source} has {f.name}={want}; drop "
                f"model.{f.name} (RETRO-fitting takes the decoder's shape from model.init_from)."
            )
        take[f.name] = want
    model = dataclasses.replace(m, **take)
    model.validate()  # the architecture with the base's shape (construction left it to here)
    return dataclasses.replace(train_cfg, model=model)


def resolve_model_config(train_cfg: TrainConfig, seq_length: int, chunk_length: int, vocab_size: int) -> RetroConfig:
    """The model's RetroConfig, with seq_length / chunk_length / vocab_size from the data.

    ``seq_length`` and ``chunk_length`` are the project's (config.json); a different value given by
    the user is an error naming both. ``vocab_size`` is the tokenizer's; the model gets it padded up
    to a multiple of 64 (see :func:`pad_vocab_size`), or the user's value when that is at least the
    tokenizer's. (A RETRO-fit's vocab_size is its base's: see :func:`decoder_from_base`.)
    """
    m = train_cfg.model
    for key, given, data in (("seq_length", m.seq_length, seq_length), ("chunk_length", m.chunk_length, chunk_length)):
        if given is not None and given != data:
            raise RetroRayError(
                f"model.{key}={given} was given but the project's data has {key}={data} (config.json, set by "
                f"prep); drop model.{key} (it is taken from the data) or prepare the data again with {key}={given}."
            )
    if seq_length % chunk_length:
        raise RetroRayError(
            f"the data's seq_length={seq_length} is not a multiple of its chunk_length={chunk_length}; "
            "prepare the data again with seq_length a multiple of chunk_length."
        )
    if m.vocab_size is None:
        vocab = pad_vocab_size(vocab_size)
    elif m.vocab_size < vocab_size:
        raise RetroRayError(
            f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size} tokens); "
            f"drop model.vocab_size (it becomes {pad_vocab_size(vocab_size)}) or give at least {vocab_size}."
        )
    else:
        vocab = m.vocab_size
    return _architecture(train_cfg, seq_length, chunk_length, vocab)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of the update made after ``step`` completed optimizer steps (0 = the first update).

    Warmup: lr * (step + 1) / warmup_steps for step < warmup_steps, so the first update already moves
    and the last warmup update uses lr. CosineAnnealing (NeMo's): from lr at step == warmup_steps down
    to exactly min_lr at step == max_steps - constant_steps, then min_lr. constant: lr after warmup.
    """
    return schedule_lr(step, **schedule_params(cfg))


def schedule_params(cfg: TrainConfig) -> dict[str, Any]:
    """The numbers the schedule depends on (plain values: they travel inside checkpoints)."""
    o, s = cfg.model.optim, cfg.model.optim.sched
    return {"name": s.name, "lr": o.lr, "min_lr": s.min_lr, "warmup_steps": s.warmup_steps,
            "decay_end": cfg.sched_max_steps - s.constant_steps}


def schedule_lr(step: int, *, name: str, lr: float, min_lr: float, warmup_steps: int, decay_end: int) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if name == "constant":
        return lr
    if step >= decay_end:
        return min_lr  # exactly min_lr, not lr * (min_lr / lr) with its rounding
    progress = (step - warmup_steps) / (decay_end - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
