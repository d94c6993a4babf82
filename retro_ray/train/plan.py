"""``retro-ray train --dry-run``: what a training config needs, before any GPU is rented.

For a config, a number of GPUs and a ZeRO stage it gives the model's parameters (trainable and
frozen), its training FLOPs per token (``RetroModel.flops_per_token``, checked against torch's FLOP
counter in the tests) and an estimate of the memory one GPU holds. The model is built on the meta
device, so a 9.5B config costs nothing to plan.

Memory per GPU = model states + activations of one micro-batch + its output layer and loss:

  model states   the ZeRO paper's accounting (Rajbhandari et al. 2020, sec. 3.1): per trainable
                 parameter, 16-bit weight 2 + 16-bit gradient 2 + fp32 master weight, Adam m and v
                 (K = 12) bytes in bf16/fp16 training; fp32 training keeps weight 4, gradient 4 and
                 Adam 8. ZeRO-1 divides the optimizer states by the GPU count N, ZeRO-2 the
                 gradients too, ZeRO-3 the weights too. A frozen parameter (a RETRO-fit's decoder)
                 holds its weight only.
                 DeepSpeed's own estimators (stage 2 and 3) are shown beside it: they count 18 bytes
                 per parameter over the GPUs where this counts 14 (ZeRO-2: they add an fp32 gradient
                 partition) or 16 (ZeRO-3), and for ZeRO-3 the largest layer gathered in fp32 (4 bytes
                 per parameter of it).
  activations    Korthikanti et al. 2022 (sec. 4.1) with fused attention (no n x n scores kept): 34
                 bytes per token per unit of width per transformer block at 16 bits (17 per element,
                 so x2 in fp32); a CCA sublayer counts as a third of a block; the encoder's blocks
                 see 2K tokens per decoder token (K neighbours of 2m tokens per m-token chunk). With
                 activation checkpointing only each decoder block's input (2 bytes per element) is
                 kept, plus one block's full activations while it is recomputed.
  output + loss  the fused loss (model/loss.py, trainer.loss_kernel=retro_ray) holds one block of R =
                 min(B n, loss.BLOCK_ROWS["cuda"]) rows at a time: its logits (2 bytes in bf16/fp16, 4
                 in fp32) beside their float32 softmax (4) per row per vocabulary entry (at 16 bits the
                 16-bit gradient of the logits then takes the freed logits' place); plus the float32 sum
                 of the output weight's gradient (V x d x 4, when it trains) and the gradient of the
                 hidden states (B n x d at the weights' width). The unfused path held B x n x V 16-bit
                 logits, their fp32 copy and its gradient.

These are estimates for planning (allocator slack, communication buffers and the CUDA context come
on top); the measured peak of a real step is the number to trust once a GPU is at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from retro_ray.model.loss import BLOCK_ROWS
from retro_ray.model.retro import RetroConfig, RetroModel

GIB = 1024**3
BLOCK_ACTIVATION_BYTES = 34  # per token per unit of width, 16-bit activations, fused attention


@dataclass(frozen=True)
class Plan:
    parameters: int
    trainable: int
    largest_layer: int            # parameters of the largest decoder or encoder layer
    flops_per_token: float
    tokens_per_step: int
    num_gpus: int
    zero_stage: int
    precision: str
    micro_batch_size: int
    activation_checkpointing: bool
    model_states_bytes: float     # per GPU
    activation_bytes: float       # per GPU, one micro-batch
    loss_bytes: float             # per GPU, one micro-batch: the fused output layer + loss
    deepspeed_model_states_bytes: float | None  # DeepSpeed's estimator, stages 2 and 3

    @property
    def total_bytes(self) -> float:
        return self.model_states_bytes + self.activation_bytes + self.loss_bytes

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "total_bytes": self.total_bytes, "flops_per_step": self.flops_per_step}


def model_states_bytes(trainable: int, frozen: int, num_gpus: int, zero_stage: int, precision: str) -> float:
    """Bytes of weights, gradients and Adam states one GPU holds (see the module docstring)."""
    half = precision in ("bf16", "fp16")
    w, g, opt = (2, 2, 12) if half else (4, 4, 8)
    n = num_gpus
    weights = w * (trainable + frozen) / (n if zero_stage >= 3 else 1)
    grads = g * trainable / (n if zero_stage >= 2 else 1)
    states = opt * trainable / (n if zero_stage >= 1 else 1)
    return weights + grads + states


def deepspeed_model_states_bytes(total: int, largest_layer: int, num_gpus: int, zero_stage: int) -> float | None:
    """DeepSpeed's own estimate (no offload) for ZeRO-2 and ZeRO-3; None for the stages it has none for."""
    if zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return float(estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=num_gpus, cpu_offload=False)[1])
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return float(estimate_zero3_model_states_mem_needs(total, largest_layer, num_gpus_per_node=num_gpus,
                                                           cpu_offload=False, cpu_offload_params=False)[1])
    return None


def activation_bytes(config: RetroConfig, micro_batch_size: int, precision: str, checkpointing: bool) -> float:
    """Activations one micro-batch keeps for backward (see the module docstring)."""
    per_element = 1.0 if precision in ("bf16", "fp16") else 2.0  # 34 bytes is 17 elements of 2 bytes
    tokens = micro_batch_size * config.seq_length
    d, L = config.hidden_size, config.num_layers
    block = BLOCK_ACTIVATION_BYTES * per_element * tokens * d
    retro = config.retro
    cca_layers = len(config.decoder_retro_layers) if retro.enabled else 0
    encoder = 0.0
    if retro.enabled:
        neighbour_tokens = tokens * retro.retro_num_neighbors * 2  # K neighbours of 2m tokens per m-token chunk
        encoder = (BLOCK_ACTIVATION_BYTES * per_element * neighbour_tokens * config.encoder_hidden_size
                   * retro.retro_encoder_num_layers)
    full = block * (L + cca_layers / 3) + encoder
    if not checkpointing:
        return full
    kept_inputs = 2 * per_element * tokens * d * L
    return kept_inputs + block * (1 + (1 / 3 if cca_layers else 0)) + encoder


def loss_bytes(config: RetroConfig, micro_batch_size: int, precision: str, output_trains: bool = True) -> float:
    """The fused output layer + loss's working set (see the module docstring)."""
    width = 2 if precision in ("bf16", "fp16") else 4
    rows = micro_batch_size * config.seq_length
    block = min(rows, BLOCK_ROWS["cuda"])
    per_entry = width + 4  # logits beside the float32 softmax; then the 16-bit gradient beside the softmax
    weight_sum = config.vocab_size * config.hidden_size * 4 if output_trains else 0
    return block * config.vocab_size * per_entry + weight_sum + rows * config.hidden_size * width


def plan(config: RetroConfig, *, num_gpus: int, zero_stage: int, precision: str, micro_batch_size: int,
         global_batch_size: int, activation_checkpointing: bool, freeze_decoder: bool = False) -> Plan:
    with torch.device("meta"):
        model = RetroModel(config)
    if freeze_decoder:
        from retro_ray.model.retrofit import freeze_decoder as freeze

        freeze(model)
    total = model.num_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = [*model.layers, *(model.encoder.layers if model.encoder is not None else [])]
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    return Plan(
        parameters=total, trainable=trainable, largest_layer=largest, flops_per_token=model.flops_per_token(),
        tokens_per_step=global_batch_size * config.seq_length, num_gpus=num_gpus, zero_stage=zero_stage,
        precision=precision, micro_batch_size=micro_batch_size, activation_checkpointing=activation_checkpointing,
        model_states_bytes=model_states_bytes(trainable, total - trainable, num_gpus, zero_stage, precision),
        activation_bytes=activation_bytes(config, micro_batch_size, precision, activation_checkpointing),
        loss_bytes=loss_bytes(config, micro_batch_size, precision, output_trains=model._output_weight().requires_grad),
        deepspeed_model_states_bytes=deepspeed_model_states_bytes(total, largest, num_gpus, zero_stage),
    )


def format_plan(p: Plan, config: RetroConfig, gpu_memory_gib: float) -> str:
    def gib(x: float) -> str:
        return f"{x / GIB:,.2f} GiB"

    retro = config.retro
    arch = (f"{config.num_layers} layers x {config.hidden_size}, {config.num_attention_heads} heads, FFN "
            f"{config.ffn_hidden_size}, vocabulary {config.vocab_size}, sequence {config.seq_length}")
    if retro.enabled:
        arch += (f"; CCA in layers {', '.join(map(str, config.decoder_retro_layers))}, encoder "
                 f"{retro.retro_encoder_num_layers} x {config.encoder_hidden_size}, {retro.retro_num_neighbors} neighbours")
    fits = p.total_bytes <= gpu_memory_gib * GIB
    lines = [
        "train --dry-run: nothing is started",
        f"  model                  {arch}",
        f"  parameters             {p.parameters:,} ({p.trainable:,} trainable)",
        f"  FLOPs per token        {p.flops_per_token:,.4g} (training: forward + backward)",
        f"  FLOPs per step         {p.flops_per_step:,.4g} ({p.tokens_per_step:,} tokens)",
        f"  GPUs, ZeRO, precision  {p.num_gpus}, stage {p.zero_stage}, {p.precision}; micro-batch "
        f"{p.micro_batch_size}, activation checkpointing {'on' if p.activation_checkpointing else 'off'}",
        "  memory per GPU (estimate)",
        f"    model states         {gib(p.model_states_bytes)}"
        + (f"  (DeepSpeed's estimator: {gib(p.deepspeed_model_states_bytes)})"
           if p.deepspeed_model_states_bytes is not None else ""),
        f"    activations          {gib(p.activation_bytes)}",
        f"    output layer + loss  {gib(p.loss_bytes)}  (fused, {min(p.micro_batch_size * config.seq_length, BLOCK_ROWS['cuda']):,} "
        "rows at a time)",
        f"    total                {gib(p.total_bytes)} of {gpu_memory_gib:g} GiB: "
        + ("fits" if fits else "does NOT fit; raise trainer.zero_stage or trainer.num_workers, turn on "
                               "trainer.activation_checkpointing, or lower model.micro_batch_size"),
    ]
    return "\n".join(lines)
