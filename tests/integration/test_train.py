"""Training on a real local Ray cluster (2 CPUs) with real Ray Train + DeepSpeed, on synthetic data.

Two workers with one CPU each, the tiny config. What is shown:
  * the loss goes down, checkpoints are written, metrics / TensorBoard / plot land in exp_dir;
  * export -> load_exported reproduces the trained weights' logits exactly;
  * a finished run is not redone; a changed config is refused unless resumed, and a resume with a
    larger max_steps continues from the last checkpoint (Train V2 restore by name + storage_path);
  * the GPT baseline (retro.enabled=false) runs through the same code, and when a worker process
    dies mid-run (os._exit) it is replaced and training resumes from the latest checkpoint (ZeRO-2,
    so every rank's optimizer partition is restored) to the same final step;
  * a worker count the cluster can never give, or more neighbours than the data has, is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from retro_ray.errors import RetroRayError
from retro_ray.model.retro import RetroConfig, RetroModel
from retro_ray.train import trainer
from retro_ray.train.config import load_train_config, lr_at
from retro_ray.train.export import export, load_exported, read_export
from retro_ray.train.synthetic import CrashOnceFactory, SyntheticDatasetFactory

FACTORY = SyntheticDatasetFactory(n_train=512, n_valid=32)
TWO_WORKERS = ["trainer.num_workers=2", "trainer.use_gpu=false", "trainer.precision=32"]  # 32: the same on every CPU


def history(exp_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (exp_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(records: list[dict]) -> list[float]:
    return [r["train_loss"] for r in records if r["kind"] == "train"]


def module_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    meta = json.loads((ckpt / "retro_ray.json").read_text())
    states = torch.load(ckpt / meta["tag"] / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return states["module"]


def sample_batch(model_data: dict) -> dict[str, torch.Tensor]:
    from retro_ray.train.loop import collate

    ds = FACTORY("valid")
    return collate([ds[0], ds[1]])


@pytest.fixture(scope="module")
def retro_run(train_ray_address, tmp_path_factory):
    """The main run: RETRO, 2 workers, 30 steps, checkpoint + validation every 10 steps."""
    exp_dir = tmp_path_factory.mktemp("retro_exp")
    cfg = load_train_config("tiny", TWO_WORKERS)
    t0 = time.perf_counter()
    report = trainer.run(cfg, FACTORY, FACTORY.model_data(), exp_dir)
    return cfg, exp_dir, report, time.perf_counter() - t0


def test_retro_trains_and_writes_outputs(retro_run):
    cfg, exp_dir, report, seconds = retro_run
    print(f"\n30-step RETRO run with 2 workers: {seconds:.1f} s; {report.format()}")
    assert report.final_step == 30 and not report.skipped and report.restarts == 0
    records = history(exp_dir)
    losses = train_losses(records)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 31))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > math.log(256) - 0.3  # starts near uniform over the vocabulary
    assert last < first - 0.8, f"loss did not go down enough: {first:.3f} -> {last:.3f}"
    vals = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [10, 20, 30]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] and vals[-1]["val_ppl"] == pytest.approx(math.exp(vals[-1]["val_loss"]))
    assert vals[-1]["val_tokens"] == 32 * 64  # the whole valid split, once, over both workers
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["grad_norm"] and r["grad_norm"] > 0 for r in train) and all(r["tokens_per_s"] > 0 for r in train)
    assert [r["lr"] for r in train] == [lr_at(cfg, s) for s in range(30)]  # the lr each update used
    assert lr_at(cfg, 30) == cfg.model.optim.sched.min_lr
    start = next(r for r in records if r["kind"] == "event")
    assert start["event"] == "start" and start["world_size"] == 2
    assert start["compiled"] is False  # trainer.compile=auto compiles on GPU workers only
    assert start["cpu_keeps_freed_memory"] is True  # trainer.cpu_keep_freed_memory's default, on glibc
    # the DeepSpeed engine starts in well under a second: no op was compiled
    assert start["deepspeed_init_s"] < 10 and start["disable_compiles_s"] < 10

    ckpt = Path(report.final_checkpoint)
    assert ckpt.name == "checkpoint_00000030" and (ckpt / "global_step30" / "mp_rank_00_model_states.pt").is_file()
    meta = json.loads((ckpt / "retro_ray.json").read_text())
    assert meta["model_config"]["retro"]["enabled"] is True and meta["model_config"]["vocab_size"] == 256
    assert meta["train_step"] == 30 and meta["consumed_samples"] == 240
    kept = sorted(p.name for p in (exp_dir / "retro_tiny").glob("checkpoint_*") if p.is_dir())
    assert kept == ["checkpoint_00000020", "checkpoint_00000030"]  # num_checkpoints_to_keep=2
    assert (exp_dir / "loss_curve.png").stat().st_size > 1000
    assert any((exp_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((exp_dir / "train_report.json").read_text())["final_step"] == 30


def test_export_gives_identical_logits(retro_run, tmp_path):
    _, exp_dir, report, _ = retro_run
    out = export(exp_dir, tmp_path / "model.pt")
    payload = read_export(out)
    assert payload["train_step"] == 30 and payload["data"]["vocab_size"] == 256
    assert all(v.dtype == torch.float32 for v in payload["state_dict"].values())
    model = load_exported(out, expected_vocab_size=256, expected_config={"num_layers": 4, "retro": {"enabled": True}})
    trained = RetroModel(RetroConfig.from_dict(payload["config"]))
    trained.load_state_dict(module_weights(Path(report.final_checkpoint)))
    trained.eval()
    batch = sample_batch(FACTORY.model_data())
    with torch.no_grad():
        a = model(batch["tokens"], batch["neighbor_tokens"], batch["neighbor_mask"]).logits
        b = trained(batch["tokens"], batch["neighbor_tokens"], batch["neighbor_mask"]).logits
    assert torch.equal(a, b)
    # a caller expecting another vocabulary or architecture is told which field differs
    with pytest.raises(RetroRayError, match="vocab_size: .* trained with a tokenizer of 256 tokens"):
        load_exported(out, expected_vocab_size=300)
    with pytest.raises(RetroRayError, match="hidden_size: the model in .* has hidden_size=64 but 128 was expected"):
        load_exported(out, expected_config={"hidden_size": 128})
    with pytest.raises(RetroRayError, match=r"retro\.retro_num_neighbors: .* has retro\.retro_num_neighbors=2"):
        load_exported(out, expected_config={"retro": {"retro_num_neighbors": 4}})
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(1)}, junk)
    with pytest.raises(RetroRayError, match="not a retro-ray export"):
        load_exported(junk)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(RetroRayError, match="not a retro-ray export"):
        load_exported(tmp_path / "text.pt")


@pytest.mark.slow  # 52-72 s of inductor compiling on a CPU, where auto never compiles: kept in test-all, out of CI's 20 min
def test_compiled_engine_trains_and_keeps_parameter_names(train_ray_address, tmp_path):
    """trainer.compile=true forces DeepSpeed's engine.compile on the CPU (auto would not): the model is
    compiled in place, so checkpoints keep the plain parameter names and export as usual. ~1 min of
    inductor compiling; one worker and no validation keep it to one compiled graph."""
    cfg = load_train_config("tiny", ["trainer.num_workers=1", "trainer.use_gpu=false", "trainer.compile=true",
                                     "trainer.max_steps=3", "trainer.checkpoint_interval=3",
                                     "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
                                     "model.optim.sched.warmup_steps=1", "trainer.cpu_keep_freed_memory=false"])
    report = trainer.run(cfg, FACTORY, FACTORY.model_data(), tmp_path)
    records = history(tmp_path)
    start = next(r for r in records if r["kind"] == "event")
    assert start["compiled"] is True and start["cpu_keeps_freed_memory"] is False
    losses = train_losses(records)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    weights = module_weights(Path(report.final_checkpoint))
    plain = RetroModel(RetroConfig.from_dict(json.loads(
        (Path(report.final_checkpoint) / "retro_ray.json").read_text())["model_config"]))
    assert set(weights) == set(plain.state_dict())  # no "_orig_mod." prefixes
    model = load_exported(export(tmp_path, tmp_path / "model.pt"))
    assert torch.equal(model.state_dict()["token_embedding.weight"], weights["token_embedding.weight"].float())


def test_rerun_is_skipped_and_changes_need_resume(retro_run):
    cfg, exp_dir, report, _ = retro_run
    t0 = time.perf_counter()
    again = trainer.run(cfg, FACTORY, FACTORY.model_data(), exp_dir)
    assert again.skipped and again.final_step == 30 and time.perf_counter() - t0 < 5
    assert len(train_losses(history(exp_dir))) == 30  # nothing was trained again
    # a run recorded by a version without the decoder-family settings is the same run, still finished
    path = exp_dir / "config.json"
    recorded = path.read_text()
    older = json.loads(recorded)
    for section in (older["model"], older["train"]["model"]):
        for key in ("family", "rope_theta", "tie_word_embeddings", "init_from"):
            section.pop(key, None)
    path.write_text(json.dumps(older))
    assert trainer.run(cfg, FACTORY, FACTORY.model_data(), exp_dir).skipped
    path.write_text(recorded)
    longer = load_train_config("tiny", TWO_WORKERS + ["trainer.max_steps=34"])
    with pytest.raises(RetroRayError, match=r"holds another run's config \(differing: train\.trainer\.max_steps: 30 -> 34"):
        trainer.run(longer, FACTORY, FACTORY.model_data(), exp_dir)
    wider = load_train_config("tiny", TWO_WORKERS + ["model.hidden_size=128"])
    with pytest.raises(RetroRayError, match=r"cannot resume .*\(model\.hidden_size: 64 -> 128\)"):
        trainer.run(wider, FACTORY, FACTORY.model_data(), exp_dir, resume=True)
    zero = load_train_config("tiny", TWO_WORKERS + ["trainer.zero_stage=2"])
    with pytest.raises(RetroRayError, match=r"resume it with trainer\.num_workers=2 and trainer\.zero_stage=0"):
        trainer.run(zero, FACTORY, FACTORY.model_data(), exp_dir, resume=True)
    bf16 = load_train_config("tiny", TWO_WORKERS + ["trainer.precision=bf16"])
    with pytest.raises(RetroRayError, match=r"written in precision 32 and this run trains in bf16; .* resume it with "
                                            r"trainer\.precision=32 \(or start a new run"):
        trainer.run(bf16, FACTORY, FACTORY.model_data(), exp_dir, resume=True)
    # resume with a larger max_steps: continues from checkpoint 30, carrying the history
    resumed = trainer.run(longer, FACTORY, FACTORY.model_data(), exp_dir, resume=True)
    assert resumed.final_step == 34 and not resumed.skipped
    records = history(exp_dir)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 35))
    # after the resume the lr follows the new schedule (decaying to min_lr at step 34, not 30)
    assert [r["lr"] for r in records if r["kind"] == "train"][30:] == [lr_at(longer, s) for s in range(30, 34)]
    events = [r for r in records if r["kind"] == "event"]
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("resume", 30)]


def test_gpt_baseline_worker_crash_resumes_from_latest_checkpoint(train_ray_address, tmp_path):
    """The GPT baseline (retro.enabled=false) through the same code, with ZeRO-2 and a crash: rank 1
    dies (os._exit) during step 12; Ray Train restarts the workers, they load checkpoint 8 (ZeRO-2:
    each rank's optimizer partition) and train on to step 16."""
    marker = tmp_path / "crashed"
    factory = CrashOnceFactory(FACTORY, str(marker), rank=1, after_items=11 * 4)  # 4 samples per step per rank
    cfg = load_train_config("tiny", TWO_WORKERS + [
        "model.retro.enabled=false", "trainer.max_steps=16", "trainer.checkpoint_interval=8",
        "trainer.val_check_interval=16", "trainer.zero_stage=2", "trainer.log_every_n_steps=2",
        "trainer.max_failures=1", "exp_manager.name=gpt_tiny"])
    exp_dir = tmp_path / "exp"
    report = trainer.run(cfg, factory, FACTORY.model_data(), exp_dir)
    assert marker.is_file(), "the injected crash did not happen"
    assert report.final_step == 16 and report.restarts == 1 and report.val_loss is not None
    records = history(exp_dir)
    events = [(r["event"], r["step"]) for r in records if r["kind"] == "event"]
    assert events == [("start", 0), ("resume", 8)]  # checkpoint 8 was the latest before step 12
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(2, 17, 2))  # no step twice
    assert train_losses(records)[-1] < train_losses(records)[0] - 0.5
    # the ZeRO-2 checkpoint holds both ranks' optimizer partitions; export gathers the fp32 weights
    ckpt = Path(report.final_checkpoint)
    assert len(list((ckpt / "global_step16").glob("*optim_states.pt"))) == 2
    out = export(exp_dir, tmp_path / "gpt.pt")
    exported = read_export(out)["state_dict"]
    module = module_weights(ckpt)
    assert exported.keys() == module.keys()
    assert all(torch.equal(exported[k], module[k].float()) for k in module)
    model = load_exported(out, expected_config={"retro": {"enabled": False}})
    assert model.encoder is None and not model.retro_layers


def test_zero3_resumes_after_a_crash_and_exports_what_zero2_trains(train_ray_address, tmp_path):
    """ZeRO-3 (the weights themselves sharded over the 2 workers) with activation checkpointing: rank 1
    dies during step 12, the run resumes from checkpoint 8 (each rank's shard of weights and optimizer
    state) and ends at step 16. Its export (the fp32 weights gathered from the shards) gives the logits
    of an uninterrupted ZeRO-3 run without checkpointing, exactly: a resume and checkpointing change
    when tensors are computed, not the math. Against ZeRO-2 the logits agree to fp32 rounding only:
    since the fused output layer + loss (model/loss.py), ZeRO-3's gradient reduction rounds the last
    bits differently (measured: max |diff| 3e-7 after 4 steps; ZeRO-1, ZeRO-2 and ZeRO-2 with
    checkpointing give identical bits)."""
    settings = TWO_WORKERS + ["trainer.max_steps=16", "trainer.checkpoint_interval=8", "trainer.val_check_interval=16",
                              "trainer.log_every_n_steps=2", "trainer.max_failures=1"]
    marker = tmp_path / "crashed"
    factory = CrashOnceFactory(FACTORY, str(marker), rank=1, after_items=11 * 4)
    z3 = trainer.run(load_train_config("tiny", settings + ["trainer.zero_stage=3", "trainer.activation_checkpointing=true"]),
                     factory, FACTORY.model_data(), tmp_path / "z3")
    assert marker.is_file(), "the injected crash did not happen"
    assert z3.final_step == 16 and z3.restarts == 1
    records = history(tmp_path / "z3")
    assert [(r["event"], r["step"]) for r in records if r["kind"] == "event"] == [("start", 0), ("resume", 8)]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(2, 17, 2))
    assert train_losses(records)[-1] < train_losses(records)[0] - 0.5
    ckpt = Path(z3.final_checkpoint)
    assert len(list((ckpt / "global_step16").glob("*optim_states.pt"))) == 2
    clean = trainer.run(load_train_config("tiny", settings + ["trainer.zero_stage=3"]), FACTORY,
                        FACTORY.model_data(), tmp_path / "z3-clean")
    z2 = trainer.run(load_train_config("tiny", settings + ["trainer.zero_stage=2"]), FACTORY, FACTORY.model_data(),
                     tmp_path / "z2")
    batch = sample_batch(FACTORY.model_data())
    logits = {}
    for name in ("z3", "z3-clean", "z2"):
        model = load_exported(export(tmp_path / name, tmp_path / f"{name}.pt"))
        with torch.no_grad():
            logits[name] = model(batch["tokens"], batch["neighbor_tokens"], batch["neighbor_mask"]).logits
    assert clean.final_step == z2.final_step == 16 and clean.restarts == z2.restarts == 0
    assert torch.equal(logits["z3"], logits["z3-clean"])
    torch.testing.assert_close(logits["z3"], logits["z2"], rtol=0, atol=2e-6)


def test_precision_auto_is_decided_at_the_start_and_written_in_checkpoints(train_ray_address, tmp_path):
    """trainer.precision=auto: the workers train in bf16 on a CPU with AMX and in 32 on another (this
    machine's CPU decides which one this test sees); config.json keeps the setting as given, every
    checkpoint the precision it chose, and the export takes the fp32 weights either way."""
    from retro_ray.runtime import cpu_has_amx

    chosen = "bf16" if cpu_has_amx() else "32"
    cfg = load_train_config("tiny", ["trainer.num_workers=1", "trainer.use_gpu=false", "trainer.precision=auto",
                                     "trainer.max_steps=4", "trainer.checkpoint_interval=4",
                                     "trainer.val_check_interval=4"])
    report = trainer.run(cfg, FACTORY, FACTORY.model_data(), tmp_path)
    assert report.final_step == 4 and math.isfinite(report.val_loss)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["trainer"]["precision"] == "auto"
    meta = json.loads((Path(report.final_checkpoint) / "retro_ray.json").read_text())
    assert meta["precision"] == chosen
    exported = read_export(export(tmp_path, tmp_path / "model.pt"))
    assert exported["weights_source"] == ("fp32 master weights (ZeRO 0, bf16)" if chosen == "bf16"
                                          else "module weights (fp32, ZeRO 0)")
    assert all(v.dtype == torch.float32 for v in exported["state_dict"].values())


def test_more_workers_than_the_cluster_has(train_ray_address, tmp_path):
    cfg = load_train_config("tiny", ["trainer.num_workers=8", "trainer.use_gpu=false", "model.global_batch_size=32"])
    with pytest.raises(RetroRayError, match=r"need 8 CPUs but the Ray cluster has 2 CPUs and 0 GPUs; set "
                                            r"trainer\.num_workers to at most 2"):
        trainer.run(cfg, FACTORY, FACTORY.model_data(), tmp_path)
    assert not (tmp_path / "config.json").exists()  # refused before anything was written
    gpu = load_train_config("tiny", ["trainer.use_gpu=true"])
    with pytest.raises(RetroRayError, match="trainer.use_gpu=true but the Ray cluster has no GPU"):
        trainer.run(gpu, FACTORY, FACTORY.model_data(), tmp_path)
    fp16 = load_train_config("tiny", ["trainer.use_gpu=false", "trainer.precision=fp16"])
    with pytest.raises(RetroRayError, match="trainer.precision=fp16 needs a GPU"):
        trainer.run(fp16, FACTORY, FACTORY.model_data(), tmp_path)
    liger = load_train_config("tiny", ["trainer.use_gpu=false", "trainer.loss_kernel=liger"])
    with pytest.raises(RetroRayError, match=r"trainer\.loss_kernel=liger is a Triton kernel for CUDA GPUs and this run "
                                            r"trains on CPUs; use trainer\.loss_kernel=retro_ray"):
        trainer.run(liger, FACTORY, FACTORY.model_data(), tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_checks_before_ray(tmp_path):
    """Errors found from the config and the data alone (no Ray needed)."""
    cfg = load_train_config("tiny", ["model.retro.retro_num_neighbors=3"])
    with pytest.raises(RetroRayError, match=r"retro_num_neighbors=3 but the data holds only 2 neighbours per chunk"):
        trainer.run(cfg, FACTORY, FACTORY.model_data(), tmp_path)
    cfg = load_train_config("tiny", ["model.seq_length=128"])
    with pytest.raises(RetroRayError, match=r"model\.seq_length=128 was given but the project's data has seq_length=64"):
        trainer.run(cfg, FACTORY, FACTORY.model_data(), tmp_path)
    tiny_data = SyntheticDatasetFactory(n_train=3, n_valid=2)
    with pytest.raises(RetroRayError, match="the train split has 3 samples, fewer than one micro-batch"):
        trainer.run(load_train_config("tiny"), tiny_data, tiny_data.model_data(), tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"seq_length": 5}')
    with pytest.raises(RetroRayError, match="not a retro-ray training config"):
        trainer.run(load_train_config("tiny"), FACTORY, FACTORY.model_data(), tmp_path / "other")


@pytest.fixture(scope="module")
def in_process_rank():
    """One gloo rank in this process for DeepSpeed, made once: DeepSpeed keeps the first process
    group it sees, so a second init_process_group in the same process would leave it a stale one."""
    import torch.distributed as dist

    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29571", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("encoder", [[], ["model.retro.retro_encoder_hidden_size=32"]],
                         ids=["encoder width d", "encoder width d/2"])
def test_export_of_bf16_zero0_uses_fp32_masters(in_process_rank, tmp_path, encoder):
    """bf16 without ZeRO: export takes DeepSpeed's fp32 master copies, not the bf16 module weights.
    (One in-process rank on gloo; no Ray.) Also run with a narrow encoder, whose extra input
    projection must go through DeepSpeed's parameter groups and the export like every other weight."""
    from retro_ray.train import loop
    from retro_ray.train.config import resolve_model_config

    cfg = load_train_config("tiny", ["trainer.precision=bf16", "model.global_batch_size=4", *encoder])
    model_cfg = resolve_model_config(cfg, 64, 16, 256)
    engine, _ = loop.build_engine(cfg, model_cfg, 1, on_gpu=False)
    batch = loop.collate([FACTORY("train")[i] for i in range(4)])
    for _ in range(3):
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
    meta = loop.checkpoint_meta(cfg, model_cfg, 3, 1, FACTORY.model_data())
    loop.write_checkpoint(engine, tmp_path, meta, history=[])
    masters = {n: p for n, p in zip(
        [n for group in loop.decay_split(engine.module) for n in group],
        [t for group in engine.optimizer.fp32_groups for t in group])}
    exported = read_export(export(tmp_path, tmp_path / "bf16.pt"))
    assert exported["weights_source"].startswith("fp32 master weights")
    for name, tensor in exported["state_dict"].items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, masters[name].float())
    # the bf16 module weights are the masters rounded: close, but not what was exported
    module = module_weights(tmp_path)
    assert any(not torch.equal(exported["state_dict"][k], module[k].float()) for k in module)
    assert ("encoder.input_proj.weight" in exported["state_dict"]) == bool(encoder)
    load_exported(tmp_path / "bf16.pt")  # the exported config rebuilds the same architecture


@pytest.mark.slow
def test_synthetic_data_rewards_retrieval():
    """The synthetic data is built so that retrieval helps: after 400 steps, RETRO's train loss is
    clearly below the same decoder's without retrieval (plain PyTorch, one process, no Ray)."""
    import dataclasses

    from retro_ray.train.config import lr_at, resolve_model_config
    from retro_ray.train.loop import collate, param_groups

    steps = 400
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: no intra-op barriers to stall on a busy machine
    cfg = load_train_config("tiny", [f"trainer.max_steps={steps}"])
    ds = SyntheticDatasetFactory(n_train=2048)("train")
    final = {}
    for enabled in (True, False):
        torch.manual_seed(1234)
        model_cfg = resolve_model_config(cfg, 64, 16, 256)
        model = RetroModel(dataclasses.replace(model_cfg, retro=dataclasses.replace(model_cfg.retro, enabled=enabled)))
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=cfg.model.optim.lr, betas=(0.9, 0.95))
        losses = []
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            out = model(**collate([ds[(step * 8 + i) % len(ds)] for i in range(8)], with_neighbors=enabled))
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(out.loss.item())
        final[enabled] = sum(losses[-40:]) / 40
    torch.set_num_threads(threads)
    print(f"\nmean train loss, steps {steps - 40}-{steps}: RETRO {final[True]:.3f}, GPT {final[False]:.3f}")
    assert final[True] < final[False] - 0.05


def _gpt_export(path: Path, model_data: dict, seed: int = 7) -> Path:
    """A GPT of the tiny config's decoder in the export format, random weights (a RETRO-fitting base)."""
    import io

    from retro_ray.train.config import resolve_model_config
    from retro_ray.train.export import EXPORT_FORMAT, EXPORT_VERSION

    cfg = resolve_model_config(load_train_config("tiny", ["model.retro.enabled=false"]), model_data["seq_length"],
                               model_data["chunk_length"], model_data["vocab_size"])
    torch.manual_seed(seed)
    payload = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "config": cfg.to_dict(),
               "state_dict": RetroModel(cfg).state_dict(), "train_step": 0, "data": dict(model_data),
               "weights_source": "random init (test)", "checkpoint": ""}
    buf = io.BytesIO()
    torch.save(payload, buf)
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("zero", [2, 3])
def test_retrofitting_a_gpt_trains_only_encoder_and_cca(train_ray_address, tmp_path, monkeypatch, zero):
    """model.init_from + freeze_decoder under ZeRO-2 and ZeRO-3 with 2 workers: the decoder leaves training bit for bit
    the base's, the retrieval part learns, and the export equals the base exactly where it should. The
    base is named by a relative path, as a user types it (the workers run in other directories)."""
    from retro_ray.model.retrofit import is_retrieval_parameter

    data = FACTORY.model_data()
    base = _gpt_export(tmp_path / "gpt.pt", data)
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config("retrofit", TWO_WORKERS + [
        "model.init_from=gpt.pt", "trainer.max_steps=12", "trainer.checkpoint_interval=12",
        "trainer.val_check_interval=12", "trainer.log_every_n_steps=2", f"trainer.zero_stage={zero}",
        "model.retro.retro_layers=[2,4]", "model.optim.lr=3e-3", "model.optim.sched.warmup_steps=2",
        "model.hidden_dropout=0", "model.attention_dropout=0", "model.ffn_dropout=0"])
    report = trainer.run(cfg, FACTORY, data, tmp_path / "exp")
    assert report.final_step == 12
    start = next(r for r in history(tmp_path / "exp") if r["kind"] == "event")
    assert start["decoder_tensors_copied"] == start["decoder_tensors_frozen"] > 0 and start["cca_outputs_zeroed"] == 4
    out = export(tmp_path / "exp", tmp_path / "fit.pt")
    fit, base_sd = read_export(out), read_export(base)["state_dict"]
    assert fit["config"]["num_layers"] == 4 and fit["config"]["retro"]["freeze_decoder"] is True
    for k, v in fit["state_dict"].items():
        if not is_retrieval_parameter(k):
            assert torch.equal(v, base_sd[k]), k
    assert all(fit["state_dict"][k].abs().max() > 0 for k in fit["state_dict"] if ".cca.attn.out_proj.weight" in k)
    losses = train_losses(history(tmp_path / "exp"))
    assert losses[-1] < losses[0]  # retrieval of the synthetic data's copies pays at once
    # resumed for 4 more steps (ZeRO partitions of the trainable part only): still the base's decoder
    longer = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, max_steps=16))
    assert trainer.run(longer, FACTORY, data, tmp_path / "exp", resume=True).final_step == 16
    resumed = read_export(export(tmp_path / "exp", tmp_path / "fit16.pt"))["state_dict"]
    assert all(torch.equal(v, base_sd[k]) for k, v in resumed.items() if not is_retrieval_parameter(k))
    assert any(not torch.equal(v, fit["state_dict"][k]) for k, v in resumed.items() if is_retrieval_parameter(k))


def test_retrofitting_bad_input(train_ray_address, tmp_path):
    data = FACTORY.model_data()
    base = _gpt_export(tmp_path / "gpt.pt", data)
    wide = load_train_config("retrofit", TWO_WORKERS + [f"model.init_from={base}", "model.num_layers=6"])
    with pytest.raises(RetroRayError, match=r"model.num_layers=6 was given but the decoder in .*gpt.pt has "
                                            r"num_layers=4; drop model.num_layers"):
        trainer.run(wide, FACTORY, data, tmp_path / "a")
    alone = load_train_config("tiny", TWO_WORKERS + ["model.retro.freeze_decoder=true"])
    with pytest.raises(RetroRayError, match="freeze_decoder=true without model.init_from would freeze a randomly"):
        trainer.run(alone, FACTORY, data, tmp_path / "b")
    folder = load_train_config("retrofit", TWO_WORKERS + [f"model.init_from={tmp_path}"])
    with pytest.raises(RetroRayError, match=r"has no config.json \(found: .*\); give the directory save_pretrained wrote"):
        trainer.run(folder, FACTORY, data, tmp_path / "c")
    other = load_train_config("retrofit", TWO_WORKERS + [f"model.init_from={base}"])
    with pytest.raises(RetroRayError, match=r"was trained with a tokenizer of \d+ tokens but this project's has 999"):
        trainer.run(other, FACTORY, {**data, "vocab_size": 999}, tmp_path / "d")
    # a base trained with another tokenizer of the same size: the first differing token is named
    from retro_ray.config import TokenizerConfig
    from retro_ray.tokenizer import train_tokenizer

    paths = []
    for name, text in (("ours", "the quick brown fox jumps over the lazy dog "), ("theirs", "zebras quietly vex jumpy wolves ")):
        tok = train_tokenizer(iter([text * 50]), TokenizerConfig(vocab_size=300, min_frequency=1), progress=False)
        paths.append(tmp_path / f"{name}.json")
        tok.save(str(paths[-1]))
    payload = read_export(base)
    payload["data"] = {**payload["data"], "tokenizer_path": str(paths[1]), "vocab_size": None}
    torch.save(payload, tmp_path / "other-tokenizer.pt")
    mismatch = load_train_config("retrofit", TWO_WORKERS + [f"model.init_from={tmp_path / 'other-tokenizer.pt'}"])
    with pytest.raises(RetroRayError, match=r"this project's tokenizer is not the one .*other-tokenizer.pt was trained "
                                            r"with: token id \d+ is '.*' in the project's and '.*' in the base's; "
                                            r"prepare the project with tokenizer.path=.*theirs.json"):
        trainer.run(mismatch, FACTORY, {**data, "tokenizer_path": str(paths[0])}, tmp_path / "e")
    assert not any((tmp_path / d).exists() for d in "abcde")  # refused before anything was written


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_retrofitting_a_hugging_face_llama_directory(train_ray_address, tmp_path, precision):
    """model.init_from=<a local LlamaForCausalLM directory> (GQA, untied): imported in memory on every
    worker, trained with ZeRO-0 in fp32 and in bf16 (DeepSpeed's bf16 keeps fp32 masters only of what
    trains), its decoder leaves training as transformers saved it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from retro_ray.model.hf import load_hf_directory
    from retro_ray.model.retrofit import is_retrieval_parameter

    data = FACTORY.model_data()
    torch.manual_seed(3)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=data["vocab_size"], hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=False))
    hf.save_pretrained(str(tmp_path / "llama"))
    cfg = load_train_config("retrofit", TWO_WORKERS + [
        f"model.init_from={tmp_path / 'llama'}", "trainer.max_steps=6", "trainer.checkpoint_interval=6",
        "trainer.val_check_interval=6", "trainer.log_every_n_steps=2", "model.retro.retro_layers=[2,4]",
        "model.optim.sched.warmup_steps=1", f"trainer.precision={precision}"])
    report = trainer.run(cfg, FACTORY, data, tmp_path / "exp")
    assert report.final_step == 6
    fit = read_export(export(tmp_path / "exp", tmp_path / "fit.pt"))
    assert fit["config"]["family"] == "llama" and fit["config"]["num_key_value_heads"] == 2
    base = load_hf_directory(tmp_path / "llama", chunk_length=data["chunk_length"]).state_dict
    for k, v in fit["state_dict"].items():
        if not is_retrieval_parameter(k):
            assert torch.equal(v, base[k]), k
