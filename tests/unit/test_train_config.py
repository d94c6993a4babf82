"""TrainConfig: YAML + overrides, shipped configs, validation errors, data-given settings, LR schedule.

Also the pieces of the training loop that need neither Ray nor DeepSpeed (collate, sampler resume,
parameter groups, the scheduler object) and the synthetic dataset.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.model.retro import RetroConfig, RetroModel
from retro_ray.train import config as TC
from retro_ray.train import loop
from retro_ray.train.synthetic import SyntheticDatasetFactory, SyntheticRetroDataset


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("trainer:\n  max_steps: 50\n  num_workers: 2\nmodel:\n  num_layers: 6\n  micro_batch_size: 2\n"
                    "  global_batch_size: 8\n")
    cfg = TC.load_train_config(path, ["trainer.max_steps=70", "model.optim.lr=1e-3", "model.retro.retro_num_neighbors=3",
                                      "exp_manager.name=run7", "trainer.use_gpu=false",
                                      "model.optim.sched.warmup_steps=10"])
    assert cfg.trainer.max_steps == 70 and cfg.trainer.num_workers == 2
    assert cfg.model.num_layers == 6 and cfg.model.optim.lr == 1e-3
    assert cfg.model.retro.retro_num_neighbors == 3
    assert cfg.trainer.use_gpu is False and cfg.exp_manager.name == "run7"
    assert cfg.gradient_accumulation_steps == 2  # 8 / (2 x 2)
    assert cfg.sched_max_steps == 70  # sched.max_steps empty = trainer.max_steps
    # untouched defaults come from RetroConfig itself (one source of truth)
    assert cfg.model.hidden_size == RetroConfig().hidden_size
    assert cfg.model.init_method_std == RetroConfig().init_method_std
    assert cfg.model.retro == RetroConfig().retro.__class__(retro_num_neighbors=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trainer.max_steps = 3  # type: ignore[misc]
    # the round trip through a dict (config.json, the workers) is exact
    assert TC.TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_model_section_is_retro_config():
    assert issubclass(TC.ModelConfig, RetroConfig)
    retro_fields = {f.name for f in dataclasses.fields(RetroConfig)}
    model_fields = {f.name for f in dataclasses.fields(TC.ModelConfig)}
    assert retro_fields <= model_fields
    assert model_fields - retro_fields == {"init_from", "micro_batch_size", "global_batch_size", "optim", "data"}
    # every leaf has help text
    for key, _typ, text in C.field_help(TC.TrainConfig):
        assert text, f"{key} has no help"


def test_unknown_and_mistyped_keys():
    with pytest.raises(RetroRayError, match=r"unknown config key trainer\.max_step;.*max_steps"):
        TC.load_train_config(None, ["trainer.max_step=3"])
    with pytest.raises(RetroRayError, match=r"model\.optim\.lr='fast' is not a number"):
        TC.load_train_config(None, ["model.optim.lr=fast"])
    with pytest.raises(RetroRayError, match="neither a YAML file nor a shipped config"):
        TC.load_train_config("no_such_config")


@pytest.mark.parametrize("path", TC.shipped_train_configs(), ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    raw = C.load_yaml(path)
    cfg = TC.load_train_config(path)
    assert C.flatten(raw).keys() <= C.flatten(cfg.to_dict()).keys()  # no key the dataclasses ignore
    seq = 2048 if "125m" in path.name else 256
    model = TC.resolve_model_config(cfg, seq, 64, 8192)
    model.validate()
    if "125m" in path.name:
        assert (model.num_layers, model.hidden_size, model.num_attention_heads, model.seq_length) == (12, 768, 12, 2048)
        assert cfg.model.optim.lr == 6e-4 and cfg.model.optim.sched.min_lr == 6e-5


def test_shipped_names():
    names = {p.stem for p in TC.shipped_train_configs()}
    assert {"train_tiny", "train_demo", "train_125m"} <= names
    assert TC.load_train_config("tiny").model.hidden_size == 64


def test_global_batch_not_divisible():
    with pytest.raises(RetroRayError, match=r"model\.global_batch_size=10 is not divisible by model\.micro_batch_size=4 "
                                            r"x trainer\.num_workers=2 = 8; set model\.global_batch_size to a multiple of 8"):
        TC.load_train_config(None, ["model.global_batch_size=10", "model.micro_batch_size=4", "trainer.num_workers=2"])


def test_other_validation_errors():
    cases = {
        "trainer.precision=fp8": "trainer.precision='fp8' is not one of auto, bf16, fp16, 32",
        "trainer.zero_stage=4": "trainer.zero_stage=4 is not a ZeRO stage; use 0, 1, 2 or 3",
        "trainer.activation_checkpointing=sometimes": "trainer.activation_checkpointing='sometimes' is not a bool",
        "trainer.use_gpu=maybe": "trainer.use_gpu='maybe' must be true, false or auto",
        "trainer.compile=fast": "trainer.compile='fast' must be true, false or auto",
        "trainer.loss_kernel=triton": "trainer.loss_kernel='triton' is not one of retro_ray, liger, cce; retro_ray runs",
        "model.optim.sched.min_lr=1": "min_lr=1.0 must be between 0 and model.optim.lr",
        "model.optim.sched.warmup_steps=5000": "leave no steps for the cosine decay",
        "model.hidden_size=100": "hidden_size=100 is not divisible by num_attention_heads=12",
        "model.optim.name=sgd": "model.optim.name='sgd' is not supported",
    }
    for override, message in cases.items():
        with pytest.raises(RetroRayError, match=message.replace("(", r"\(").replace(".", r"\.")):
            TC.load_train_config(None, [override])


def test_train_configs_are_checked_on_construction():
    cases = [
        (lambda: TC.TrainerSettings(max_steps=0), r"trainer\.max_steps=0 must be at least 1\."),
        (lambda: TC.TrainerSettings(use_gpu="maybe"), r"trainer\.use_gpu='maybe' must be true, false or auto"),
        (lambda: TC.SchedConfig(name="linear"), r"model\.optim\.sched\.name='linear' is not one of"),
        (lambda: TC.OptimConfig(lr=0.0), r"model\.optim\.lr=0\.0 must be positive"),
        (lambda: TC.DataSettings(num_workers=-1), r"model\.data\.num_workers=-1 must be >= 0"),
        (lambda: TC.ModelConfig(hidden_size=100), r"hidden_size=100 is not divisible by num_attention_heads=12"),
        (lambda: TC.ModelConfig(micro_batch_size=0), r"model\.micro_batch_size=0 must be at least 1"),
        (lambda: TC.ExpManagerConfig(name=["x"]), r"name=\['x'\] is not a string\."),
        (lambda: TC.TrainConfig(model=TC.ModelConfig(global_batch_size=6)), r"model\.global_batch_size=6 is not divisible"),
        (lambda: dataclasses.replace(TC.TrainConfig(), trainer=TC.TrainerSettings(max_steps=50)),
         "leave no steps for the cosine decay"),
    ]
    for make, match in cases:
        with pytest.raises(RetroRayError, match=match):
            make()


def test_train_config_errors_name_the_nested_key():
    with pytest.raises(RetroRayError) as e:
        TC.TrainConfig.from_dict({"trainer": {"max_steps": "many"}})
    assert str(e.value) == "trainer.max_steps='many' is not an int."
    with pytest.raises(RetroRayError) as e:
        TC.TrainConfig.from_dict({"model": {"retro": {"retro_num_neighbours": 2}}})
    assert str(e.value).startswith("unknown config key model.retro.retro_num_neighbours; accepted keys under model.retro: "
                                   "enabled, retro_encoder_num_layers,")
    with pytest.raises(RetroRayError) as e:
        TC.TrainConfig.from_dict({"model": {"optim": 0.1}})
    assert str(e.value) == "model.optim is a section (name, lr, weight_decay, betas, eps, sched), not a value."
    with pytest.raises(RetroRayError, match=r"^model\.retro\.freeze_decoder='sure' is not a bool; use true or false\.$"):
        TC.load_train_config(None, ["model.retro.freeze_decoder=sure"])
    cfg = TC.load_train_config("tiny", ["model.retro.retro_layers=2,4", "trainer.use_gpu=true", "model.retro.freeze_decoder=false",
                                        "trainer.limit_val_batches=", "model.optim.betas=0.8,0.9"])
    assert cfg.model.retro.retro_layers == (2, 4) and cfg.trainer.use_gpu is True
    assert cfg.trainer.limit_val_batches is None and cfg.model.optim.betas == (0.8, 0.9)


def test_resolve_takes_data_settings_and_rejects_conflicts():
    cfg = TC.load_train_config("tiny")
    model = TC.resolve_model_config(cfg, 128, 32, 1000)
    assert (model.seq_length, model.chunk_length, model.vocab_size) == (128, 32, 1024)
    assert isinstance(model, RetroConfig) and type(model) is RetroConfig
    same = TC.load_train_config("tiny", ["model.seq_length=128", "model.chunk_length=32"])
    assert TC.resolve_model_config(same, 128, 32, 1000) == model  # repeating the data's value is fine
    bad = TC.load_train_config("tiny", ["model.seq_length=256"])
    with pytest.raises(RetroRayError, match=r"model\.seq_length=256 was given but the project's data has seq_length=128"):
        TC.resolve_model_config(bad, 128, 32, 1000)
    bad = TC.load_train_config("tiny", ["model.chunk_length=64"])
    with pytest.raises(RetroRayError, match=r"model\.chunk_length=64 was given but the project's data has chunk_length=32"):
        TC.resolve_model_config(bad, 128, 32, 1000)
    with pytest.raises(RetroRayError, match=r"seq_length=100 is not a multiple of its chunk_length=32"):
        TC.resolve_model_config(cfg, 100, 32, 1000)
    # a model seq_length that is no multiple of chunk_length is refused by validation already
    with pytest.raises(RetroRayError, match=r"seq_length=100 is not a multiple of chunk_length=64"):
        TC.load_train_config("tiny", ["model.seq_length=100", "model.chunk_length=64"])


def test_vocab_padding():
    assert TC.pad_vocab_size(8000) == 8000 and TC.pad_vocab_size(8001) == 8064
    assert TC.pad_vocab_size(50257) == 50304 and TC.pad_vocab_size(1) == 64
    cfg = TC.load_train_config("tiny")
    assert TC.resolve_model_config(cfg, 64, 16, 50257).vocab_size == 50304
    big = TC.load_train_config("tiny", ["model.vocab_size=60000"])
    assert TC.resolve_model_config(big, 64, 16, 50257).vocab_size == 60000
    small = TC.load_train_config("tiny", ["model.vocab_size=256"])
    with pytest.raises(RetroRayError, match=r"model\.vocab_size=256 is smaller than the tokenizer's vocabulary \(300 tokens\)"):
        TC.resolve_model_config(small, 64, 16, 300)


def test_lr_schedule_warmup_and_cosine():
    cfg = TC.load_train_config(None, ["trainer.max_steps=100", "model.optim.lr=1e-3",
                                      "model.optim.sched.warmup_steps=10", "model.optim.sched.min_lr=1e-4"])
    lrs = [TC.lr_at(cfg, s) for s in range(0, 120)]
    # linear warmup: lr * (s + 1) / warmup, reaching lr on the last warmup update
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[9] == 1e-3 and lrs[10] == 1e-3
    # cosine: halfway between lr and min_lr at the middle of the decay, monotone, exactly min_lr at max_steps
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert all(a >= b for a, b in zip(lrs[10:101], lrs[11:101]))
    assert lrs[100] == 1e-4 and lrs[119] == 1e-4  # exact, not just close
    assert lrs[99] > 1e-4
    # constant_steps hold min_lr at the end; sched.max_steps overrides trainer.max_steps
    held = TC.load_train_config(None, ["trainer.max_steps=100", "model.optim.sched.warmup_steps=10",
                                       "model.optim.sched.constant_steps=20"])
    assert TC.lr_at(held, 80) == held.model.optim.sched.min_lr and TC.lr_at(held, 79) > TC.lr_at(held, 80)
    short = TC.load_train_config(None, ["trainer.max_steps=100", "model.optim.sched.warmup_steps=10",
                                        "model.optim.sched.max_steps=50"])
    assert TC.lr_at(short, 50) == short.model.optim.sched.min_lr
    const = TC.load_train_config(None, ["model.optim.sched.name=constant", "model.optim.sched.warmup_steps=4"])
    assert [TC.lr_at(const, s) for s in (0, 3, 4, 999)] == [const.model.optim.lr * 0.25] + [const.model.optim.lr] * 3


def test_scheduler_object_follows_lr_at():
    cfg = TC.load_train_config(None, ["trainer.max_steps=30", "model.optim.sched.warmup_steps=5"])
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [], "weight_decay": 0.0}], lr=cfg.model.optim.lr)
    sched = loop.WarmupCosineLR(opt, TC.schedule_params(cfg))
    seen = []
    for _ in range(35):
        seen.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == seen[-1]
        opt.step()
        sched.step()
    assert seen == [TC.lr_at(cfg, s) for s in range(35)]
    assert seen[30] == cfg.model.optim.sched.min_lr
    # its state (inside DeepSpeed checkpoints) is the position; the shape comes from the config, so a
    # run resumed with a larger max_steps decays over the new length
    state = sched.state_dict()
    assert "params" not in state and state["last_epoch"] == 35
    other = TC.load_train_config(None, ["trainer.max_steps=999"])
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    restored = loop.WarmupCosineLR(opt2, TC.schedule_params(other))
    restored.load_state_dict(state)
    assert restored.last_epoch == 35 and restored.params == TC.schedule_params(other)
    opt2.step()
    restored.step()
    assert opt2.param_groups[0]["lr"] == TC.lr_at(other, 36)


def test_no_weight_decay_on_biases_norms_embedding():
    model = RetroModel(RetroConfig.tiny())
    decay, no_decay = loop.decay_split(model)
    assert "token_embedding.weight" in no_decay
    assert all(n.endswith(".bias") or ".ln" in n or n.startswith("ln_f") or n.startswith("encoder.ln_f")
               or n == "token_embedding.weight" for n in no_decay)
    assert all(n.endswith(".weight") and "ln" not in n.split(".")[-2] for n in decay)
    assert "layers.0.attn.qkv.weight" in decay and "layers.0.mlp.fc_in.bias" in no_decay
    groups = loop.param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_deepspeed_config():
    cfg = TC.load_train_config("tiny", ["trainer.num_workers=2", "model.global_batch_size=16", "trainer.zero_stage=2"])
    ds = loop.deepspeed_config(cfg, 2)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    assert "optimizer" not in ds and "scheduler" not in ds  # a config optimizer would compile FusedAdam
    fp32 = loop.deepspeed_config(TC.load_train_config("tiny"), 1)
    assert fp32["gradient_clipping"] == 0.0 and loop.loop_clips_gradients(TC.load_train_config("tiny"))
    bf16 = loop.deepspeed_config(TC.load_train_config("125m", ["trainer.num_workers=1"]), 1)
    assert bf16["bf16"]["enabled"] and not bf16["fp16"]["enabled"] and bf16["gradient_accumulation_steps"] == 64


def test_peak_flops_table():
    assert loop.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert loop.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert loop.gpu_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert loop.gpu_peak_flops("Some CPU") is None
    cpu = TC.load_train_config("tiny")
    assert loop.peak_flops_per_worker(cpu, on_gpu=False) is None
    assert loop.peak_flops_per_worker(TC.load_train_config("tiny", ["trainer.peak_flops=1e12"]), False) == 1e12


def test_collate_shifts_tokens_and_labels():
    ds = SyntheticRetroDataset(4, 64, 16, 2, 256, seed=1)
    batch = loop.collate([ds[0], ds[1]])
    assert batch["tokens"].shape == (2, 64) and batch["labels"].shape == (2, 64)
    assert torch.equal(batch["tokens"][0, 1:], batch["labels"][0, :-1])
    assert torch.equal(batch["tokens"][0], torch.from_numpy(ds[0]["text"][:-1]))
    assert batch["neighbor_tokens"].shape == (2, 4, 2, 32) and batch["neighbor_mask"].dtype == torch.bool
    assert set(loop.collate([ds[0]], with_neighbors=False)) == {"tokens", "labels"}


def test_resumable_sampler_skips_exactly():
    data = list(range(50))
    full = loop.ResumableDistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    full.set_position(epoch=4, start=0)
    order = list(full)
    part = loop.ResumableDistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    part.set_position(epoch=4, start=10)
    assert list(part) == order[10:] and len(part) == len(order) - 10
    other = loop.ResumableDistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    other.set_position(epoch=5, start=0)
    assert list(other) != order  # a new epoch reshuffles


def test_synthetic_items_and_determinism():
    ds = SyntheticRetroDataset(8, 64, 16, 3, 256, seed=5)
    a, b = ds[2], SyntheticRetroDataset(8, 64, 16, 3, 256, seed=5)[2]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["text"].dtype == np.int64 and a["text"].shape == (65,)
    assert a["neighbor_tokens"].shape == (4, 3, 32) and a["neighbor_mask"].shape == (4, 3)
    assert a["neighbor_mask"].dtype == bool and a["neighbor_mask"][:, 0].all()
    # neighbour 0 of chunk j is chunk j plus its continuation (the next chunk of the text)
    for j in range(3):
        np.testing.assert_array_equal(a["neighbor_tokens"][j, 0], a["text"][16 * j: 16 * j + 32])
    assert (a["text"] < 64).all()  # the phrase book uses the lower quarter of the vocabulary
    valid = SyntheticDatasetFactory(n_train=8, n_valid=4, num_neighbors=3)("valid")
    assert len(valid) == 4 and not np.array_equal(valid[0]["text"], SyntheticDatasetFactory(num_neighbors=3)("train")[0]["text"])
    assert SyntheticDatasetFactory().model_data()["num_neighbors_available"] == 2


def test_wandb_missing_is_a_clear_error():
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(RetroRayError, match="pip install wandb"):
            loop.wandb_module()
    else:
        pytest.skip("wandb is installed")


def test_lr_is_never_nan_or_negative():
    cfg = TC.load_train_config("125m", ["trainer.num_workers=1"])
    for s in (0, 1999, 2000, 100_000, 649_999, 650_000, 749_999):
        lr = TC.lr_at(cfg, s)
        assert 0 < lr <= 6e-4 and not math.isnan(lr)
    assert TC.lr_at(cfg, 650_000) == 6e-5


def test_zero_checkpoints_resume_only_with_the_same_workers():
    loop.check_resumable({"zero_stage": 0, "world_size": 2}, 0, 4)  # plain data parallel: any worker count
    loop.check_resumable({"zero_stage": 2, "world_size": 2}, 2, 2)
    with pytest.raises(RetroRayError, match=r"written by 2 workers with ZeRO stage 1; .* trainer\.num_workers=2 and "
                                            r"trainer\.zero_stage=1 \(now 4 and 1\)"):
        loop.check_resumable({"zero_stage": 1, "world_size": 2}, 1, 4)
    with pytest.raises(RetroRayError, match="ZeRO stage 0"):
        loop.check_resumable({"zero_stage": 0, "world_size": 2}, 2, 2)


def test_compile_auto_means_gpu_workers_only():
    from retro_ray.train.loop import compiles

    assert [compiles("auto", True), compiles("auto", False)] == [True, False]
    assert [compiles(True, False), compiles(False, True)] == [True, False]
    assert TC.load_train_config("demo", []).trainer.compile == "auto"
    assert TC.load_train_config("demo", ["trainer.compile=true"]).trainer.compile is True


def test_a_retrofit_checks_its_retro_layers_against_the_bases_depth():
    """retro_layers of a RETRO-fit refer to its base's layers: 24, 27, 30 of a 30-layer base are accepted
    (not refused against the default 12 layers), and checked once the base's shape is taken."""
    cfg = TC.load_train_config("retrofit", ["model.init_from=/any/base.pt", "model.retro.retro_layers=[24,27,30]"])
    deep = dataclasses.replace(RetroConfig.tiny(), num_layers=30, retro=RetroConfig().retro.__class__(enabled=False))
    assert TC.decoder_from_base(cfg, deep, "base.pt").model.num_layers == 30
    with pytest.raises(RetroRayError, match=r"retro_layers contains 24, outside 1\.\.num_layers=4"):
        TC.decoder_from_base(cfg, RetroConfig.tiny(), "base.pt")
    with pytest.raises(RetroRayError, match=r"retro_layers contains 24, outside 1\.\.num_layers=6"):
        TC.load_train_config("demo", ["model.retro.retro_layers=[24]"])  # no base: checked at once (6 layers)
