"""`retro-ray train --dry-run` (retro_ray.train.plan): the shipped sizes have the parameter counts of
Wang et al. 2023's RETROs, the model-state accounting differs from DeepSpeed's own estimators by
exactly the terms they add, and the command says whether a plan fits a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from retro_ray.train.config import load_train_config, resolve_model_config
from retro_ray.train.plan import (
    activation_bytes,
    deepspeed_model_states_bytes,
    model_states_bytes,
    plan,
)

PAPER_SIZES = {"148m": 148e6, "410m": 410e6, "1.5b": 1.5e9, "9.5b": 9.5e9}


def _plan(name: str, **overrides):
    cfg = load_train_config(name)
    model = resolve_model_config(cfg, 2048, 64, 50257)
    kw = dict(num_gpus=cfg.trainer.num_workers, zero_stage=cfg.trainer.zero_stage, precision=cfg.trainer.precision,
              micro_batch_size=cfg.model.micro_batch_size, global_batch_size=cfg.model.global_batch_size,
              activation_checkpointing=cfg.trainer.activation_checkpointing)
    kw.update(overrides)
    return model, plan(model, **kw)


@pytest.mark.parametrize("name", PAPER_SIZES)
def test_shipped_sizes_have_the_papers_parameter_counts(name):
    model, p = _plan(name)
    assert p.parameters == pytest.approx(PAPER_SIZES[name], rel=0.02)
    assert p.trainable == p.parameters and p.flops_per_token > 6 * p.parameters  # attention and retrieval on top
    assert p.total_bytes < 80 * 1024**3, f"{name}'s shipped settings do not fit an 80 GiB GPU"


@pytest.mark.parametrize("stage", [2, 3])
def test_model_states_differ_from_deepspeeds_estimate_by_what_it_adds(stage):
    _, p = _plan("1.5b", zero_stage=stage, num_gpus=16)
    ours = model_states_bytes(p.trainable, 0, 16, stage, "bf16")
    theirs = deepspeed_model_states_bytes(p.parameters, p.largest_layer, 16, stage)
    # DeepSpeed's estimators count 18 bytes per parameter over the GPUs where we count 14 (ZeRO-2: its
    # fp32 gradient partition) or 16 (ZeRO-3), and for ZeRO-3 the largest layer gathered in fp32; nothing else.
    extra = 4 * p.parameters / 16 if stage == 2 else 4 * p.largest_layer + 2 * p.parameters / 16
    assert theirs - ours == pytest.approx(extra, abs=2)
    assert p.deepspeed_model_states_bytes == theirs


def test_zero_stages_and_checkpointing_shrink_what_they_should():
    n, t = 8, 1_000_000
    assert model_states_bytes(t, 0, n, 0, "bf16") == 16 * t  # the ZeRO paper's 2 + 2 + 12
    assert model_states_bytes(t, 0, n, 1, "bf16") == 4 * t + 12 * t / n
    assert model_states_bytes(t, 0, n, 2, "bf16") == 2 * t + 14 * t / n
    assert model_states_bytes(t, 0, n, 3, "bf16") == 16 * t / n
    assert model_states_bytes(t, 0, n, 0, "32") == 16 * t  # fp32 weight 4, gradient 4, Adam 8
    assert model_states_bytes(t, 3 * t, n, 2, "bf16") == 2 * 4 * t + 14 * t / n  # a frozen part: its weights only
    model, _ = _plan("410m")
    plain, ckpt = (activation_bytes(model, 8, "bf16", c) for c in (False, True))
    assert ckpt < plain / 3  # the first CCA layer recomputes the whole encoder at once, so that part stays
    assert activation_bytes(model, 16, "bf16", False) == pytest.approx(2 * plain)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "retro_ray.cli", "train", *args], capture_output=True, text=True)


def test_dry_run_prints_the_plan_and_whether_it_fits():
    r = _cli("--config", "9.5b", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "parameters             9,469,616,128 (9,469,616,128 trainable)" in r.stdout
    assert "64, stage 3, bf16" in r.stdout and ": fits" in r.stdout
    r = _cli("--config", "9.5b", "--dry-run", "trainer.zero_stage=1", "trainer.activation_checkpointing=false",
             "model.micro_batch_size=8", "model.global_batch_size=1024")
    assert r.returncode == 0, r.stderr
    assert "does NOT fit; raise trainer.zero_stage or trainer.num_workers" in r.stdout
    r = _cli("--config", "demo")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "retro-ray: error: train needs --project-dir and --exp-dir (or --dry-run, which trains nothing).")


def test_the_fused_loss_holds_one_block_of_logits():
    """The output layer + loss is one block of BLOCK_ROWS["cuda"] rows however large the micro-batch
    (only the hidden states' gradient grows with it), where the unfused logits grew B x n x V."""
    from retro_ray.model.loss import BLOCK_ROWS
    from retro_ray.train.plan import loss_bytes

    model, _ = _plan("410m")
    V, d, n = model.vocab_size, model.hidden_size, model.seq_length
    assert BLOCK_ROWS["cuda"] <= 2 * n  # micro-batches 2 and 16 both fill a whole block
    small, large = loss_bytes(model, 2, "bf16"), loss_bytes(model, 16, "bf16")
    assert large - small == 14 * n * d * 2  # the hidden states' gradient, in bf16
    assert small == BLOCK_ROWS["cuda"] * V * (2 + 4) + V * d * 4 + 2 * n * d * 2
    assert large < 16 * n * V * (2 + 4 + 4) / 4  # the unfused path's logits, their fp32 copy and its gradient
    assert loss_bytes(model, 2, "bf16", output_trains=False) == small - V * d * 4  # a frozen output layer
    assert loss_bytes(model, 2, "32") == BLOCK_ROWS["cuda"] * V * (4 + 4) + V * d * 4 + 2 * n * d * 4
