"""One-file model export from a training checkpoint, and loading it back.

``model.pt`` is a plain ``torch.save`` of a dict (loadable with ``torch.load(weights_only=True)``,
so loading it runs no pickled code)::

    format          "retro-ray-export"
    version         1
    config          RetroConfig.to_dict()
    state_dict      {parameter name: float32 tensor} -- RetroModel.load_state_dict() takes it as is
    train_step      optimizer steps the weights were trained for
    data            what the run recorded about its data: seq_length, chunk_length, vocab_size (the
                    tokenizer's), num_neighbors_available, and when known tokenizer_path, eod_id
    weights_source  where the fp32 weights came from (see below)
    init_from       a RETRO-fit's base (model.init_from: a model.pt or a Hugging Face directory); ""
                    (or absent, in exports written before it was recorded) for a run from scratch

The fp32 weights, from a DeepSpeed checkpoint:
    ZeRO 1 / 2   the fp32 master weights, gathered from every rank's optimizer partition with
                 DeepSpeed's ``zero_to_fp32`` utility;
    ZeRO 0, fp32 the module weights in the model-states file (they are the fp32 weights);
    ZeRO 0, bf16 / fp16  the optimizer's fp32 master copies, stored (per parameter group, in our
                 fixed group order) in the model-states file; the bf16 module weights, upcast, only
                 if those are missing.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from retro_ray.errors import RetroRayError
from retro_ray.model.retro import RetroConfig, RetroModel
from retro_ray.project import atomic_write_bytes
from retro_ray.train.loop import CHECKPOINT_FORMAT, CHECKPOINT_META, decay_split

EXPORT_FORMAT = "retro-ray-export"
EXPORT_VERSION = 1
MODEL_STATES = "mp_rank_00_model_states.pt"


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, an experiment directory, or a Ray Train run directory."""
    p = Path(path).expanduser().resolve()
    if (p / CHECKPOINT_META).is_file():
        return p
    report = p / "train_report.json"
    if report.is_file():
        final = json.loads(report.read_text()).get("final_checkpoint")
        if final and (Path(final) / CHECKPOINT_META).is_file():
            return Path(final)
    candidates = [c for c in p.glob("checkpoint_*") if (c / CHECKPOINT_META).is_file()]
    candidates += [c for c in p.glob("*/checkpoint_*") if (c / CHECKPOINT_META).is_file()]
    if candidates:
        return max(candidates, key=lambda c: json.loads((c / CHECKPOINT_META).read_text())["train_step"])
    raise RetroRayError(
        f"no retro-ray training checkpoint in {p}; give an experiment directory (exp_manager.exp_dir) or "
        f"one of its checkpoint_<step> directories."
    )


def _load_torch(path: Path) -> Any:
    # DeepSpeed's model-states file pickles more than tensors (its config, versions); it is a file
    # our own training run wrote, so it is loaded in full.
    return torch.load(path, map_location="cpu", weights_only=False)


def consolidate(ckpt: Path, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """(fp32 state dict, weights_source) from one DeepSpeed checkpoint directory.

    A RETRO-fit's frozen decoder has no fp32 master copy in bf16/fp16 training (nothing updates it):
    its tensors are taken from the base it was fitted from, whose values they are by definition,
    rather than from the rounded half-precision copies the engine computed with."""
    sd, source = _consolidate(ckpt, meta)
    frozen_from = base_of(meta)
    if frozen_from and meta["model_config"].get("retro", {}).get("freeze_decoder") and meta.get("precision") != "32":
        from retro_ray.model.retrofit import is_retrieval_parameter

        try:
            base = read_base(frozen_from)[1]
        except RetroRayError as e:
            return sd, f"{source}; the frozen decoder from half-precision copies ({e})"
        sd.update({k: base[k].float().clone() for k in sd if not is_retrieval_parameter(k)})
        source = f"{source}; the frozen decoder from {frozen_from} (fp32)"
    return sd, source


def _consolidate(ckpt: Path, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    tag, stage = meta["tag"], int(meta["zero_stage"])
    if stage >= 1:
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
        return {k: v.float().contiguous() for k, v in sd.items()}, f"zero_to_fp32 (ZeRO {stage} fp32 master weights)"
    states = _load_torch(ckpt / tag / MODEL_STATES)
    module = states["module"]
    if meta.get("precision") == "32":
        return {k: v.float() for k, v in module.items()}, "module weights (fp32, ZeRO 0)"
    masters = _fp32_masters(states.get("optimizer"), meta["model_config"], module)
    if masters is not None:
        return masters, f"fp32 master weights (ZeRO 0, {meta.get('precision')})"
    return {k: v.float() for k, v in module.items()}, f"module weights upcast from {meta.get('precision')}"


def _fp32_masters(opt_state: Any, model_config: dict, module: dict[str, torch.Tensor]) -> dict | None:
    """DeepSpeed's FP16 optimizer (used for bf16/fp16 without ZeRO) saves ``fp32_groups``: one list
    of fp32 tensors per parameter group, in the group order :func:`loop.param_groups` builds."""
    groups = opt_state.get("fp32_groups") if isinstance(opt_state, dict) else None
    if not groups:
        return None
    config = RetroConfig.from_dict(model_config)
    with torch.device("meta"):
        model = RetroModel(config)
    if config.retro.enabled and config.retro.freeze_decoder:  # a RETRO-fit's optimizer holds only what trains
        from retro_ray.model.retrofit import freeze_decoder

        freeze_decoder(model)
    names = [g for g in decay_split(model) if g]  # empty groups dropped
    trainable = {n for g in names for n in g}
    if [len(g) for g in names] != [len(g) for g in groups]:
        return None
    out = {}
    for group_names, tensors in zip(names, groups):
        for name, t in zip(group_names, tensors):
            if name not in module or tuple(module[name].shape) != tuple(t.shape):
                return None
            out[name] = t.detach().float().clone()
    if set(out) != trainable:
        return None
    # frozen tensors (a RETRO-fit's decoder) exist only as the module's copies; consolidate() replaces them
    return {**{k: v.float() for k, v in module.items() if k not in out}, **out}


def export(exp_dir_or_checkpoint: str | Path, out_path: str | Path) -> Path:
    """Write ``model.pt`` (see the module docstring) from the run's final / latest checkpoint, or from
    the checkpoint directory given. ``out_path`` may be a directory (then ``<dir>/model.pt``)."""
    ckpt = find_checkpoint(exp_dir_or_checkpoint)
    meta = json.loads((ckpt / CHECKPOINT_META).read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise RetroRayError(f"{ckpt} is not a retro-ray checkpoint ({CHECKPOINT_META} has no format tag).")
    config = RetroConfig.from_dict(meta["model_config"])
    state_dict, source = consolidate(ckpt, meta)
    # Check it loads into the model before writing anything.
    with torch.device("meta"):
        expected = RetroModel(config).state_dict()
    missing, extra = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise RuntimeError(f"checkpoint {ckpt} does not match its model config: missing {missing}, unexpected {extra}")
    return write_export(out_path, config, state_dict, data=meta.get("model_data", {}), weights_source=source,
                        train_step=int(meta["train_step"]), checkpoint=str(ckpt), init_from=base_of(meta))


def base_of(meta: dict[str, Any]) -> str:
    """The base a run was RETRO-fitted from (``model.init_from``), "" for a run from scratch."""
    return str((meta.get("train_config") or {}).get("model", {}).get("init_from") or "")


def _export_path(out_path: str | Path) -> Path:
    out = Path(out_path).expanduser()
    return out / "model.pt" if out.is_dir() or str(out_path).endswith("/") else out


def write_export(out_path: str | Path, config: RetroConfig, state_dict: dict[str, torch.Tensor], *, data: dict,
                 weights_source: str, train_step: int = 0, checkpoint: str = "", init_from: str = "") -> Path:
    """Write the model.pt format atomically (a directory ``out_path`` gets ``model.pt`` inside)."""
    payload = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "config": config.to_dict(), "state_dict": state_dict,
               "train_step": int(train_step), "data": dict(data), "weights_source": weights_source,
               "checkpoint": checkpoint, "init_from": init_from}
    out = _export_path(out_path)
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(out, buf.getvalue())
    return out


def import_hf(model_path: str | Path, out_path: str | Path, *, tokenizer_dir: str | Path | None = None,
              **overrides: Any) -> Path:
    """``retro-ray import-hf``: a local HF GPT-2 / Llama / Qwen2 directory, or a GGUF file of those
    architectures, as a model.pt (a GPT: retro off) whose logits equal transformers' own; its tokenizer
    facts are recorded as a run's would be, so that RETRO-fitting can check a project against them.

    A GGUF file's tokenizer lives in its metadata: it is written as a Hugging Face tokenizer directory
    (``tokenizer_dir``, default ``<out without .pt>-tokenizer`` beside the model.pt), which the model.pt
    records and ``prep tokenizer.path=`` takes. A directory's own tokenizer.json is recorded in place."""
    from retro_ray.model.gguf import write_tokenizer_dir
    from retro_ray.model.hf import load_pretrained

    ck = load_pretrained(model_path, **overrides)
    if tokenizer_dir and ck.hf_tokenizer is None:
        raise RetroRayError(f"--tokenizer-dir is for a GGUF file, whose tokenizer lives in its metadata; {model_path} "
                            "is a directory and its own tokenizer.json is recorded in place")
    model = RetroModel(ck.config)
    model.load_state_dict(ck.state_dict, strict=True)  # a mapping bug fails here, before anything is written
    out = _export_path(out_path)
    if ck.hf_tokenizer is not None:
        tok_dir = Path(tokenizer_dir).expanduser() if tokenizer_dir else out.with_name(out.stem + "-tokenizer")
        ck.tokenizer_path = (write_tokenizer_dir(ck.hf_tokenizer, tok_dir) / "tokenizer.json").resolve()
    return write_export(out, ck.config, model.state_dict(), data=_hf_data(ck), weights_source=_weights_source(ck))


def _weights_source(ck) -> str:
    from retro_ray.model.gguf import is_gguf_file

    return f"{'gguf' if is_gguf_file(ck.path) else 'huggingface'}:{ck.path}"


def _hf_data(ck) -> dict[str, Any]:
    """What a run records about its data, for an imported checkpoint: its tokenizer and end-of-text id."""
    data: dict[str, Any] = {"seq_length": ck.config.seq_length, "chunk_length": ck.config.chunk_length,
                            "source": _weights_source(ck).split(":")[0], "context_length": ck.context_length}
    tok = ck.load_tokenizer()
    if tok is not None:
        data["vocab_size"] = tok.get_vocab_size()
        if ck.tokenizer_path is not None:
            data["tokenizer_path"] = str(ck.tokenizer_path)
        eos = tok.token_to_id(ck.eos_token) if ck.eos_token else None
        if eos is not None:
            data["eod_id"] = int(eos)
        if ck.chat_template:
            data["chat_template"] = ck.chat_template
    return data


def read_base(path: str | Path, *, weights: bool = True, **overrides: Any) -> tuple[RetroConfig, dict[str, torch.Tensor], dict]:
    """A decoder to RETRO-fit: (config, state dict, data) of a model.pt, or of a local Hugging Face
    directory or GGUF file imported in memory. ``weights=False``: the config and data only (cheap for a
    directory). ``overrides``: seq_length / chunk_length for a directory or GGUF file (a model.pt has its own)."""
    from retro_ray.model.gguf import is_gguf_file
    from retro_ray.model.hf import load_pretrained

    p = Path(path).expanduser()
    if p.is_dir() or is_gguf_file(p):  # a directory that is not a checkpoint is refused naming what it lacks
        ck = load_pretrained(p, weights=weights, **overrides)
        return ck.config, ck.state_dict, _hf_data(ck)
    payload = read_export(p)
    return RetroConfig.from_dict(payload["config"]), payload["state_dict"], payload.get("data") or {}


def base_tokenizer(path: str | Path, data: dict[str, Any]):
    """The tokenizers.Tokenizer a base model (``data``: what ``read_base`` returns) was trained with, or None."""
    from retro_ray.model.gguf import is_gguf_file, read_gguf_tokenizer
    from retro_ray.tokenizer import load_tokenizer

    theirs = data.get("tokenizer_path")
    if theirs and Path(theirs).is_file():
        return load_tokenizer(Path(theirs))
    if is_gguf_file(path) and Path(path).expanduser().is_file():
        return read_gguf_tokenizer(path)
    return None


def check_base_tokenizer(path: str | Path, data: dict[str, Any], vocab_size: int, tokenizer_path: str | Path | None) -> None:
    """Refuse a base model (``data``: what ``read_base`` returns for ``path``) that was trained with another
    tokenizer than the project's (``vocab_size`` tokens, ``tokenizer_path``), naming the first difference."""
    from retro_ray.model.gguf import is_gguf_file
    from retro_ray.tokenizer import load_tokenizer, vocabulary_difference

    if data.get("vocab_size") is not None and int(data["vocab_size"]) != int(vocab_size):
        hint = data.get("tokenizer_path") or ("the tokenizer directory `retro-ray import-hf` writes for it"
                                              if is_gguf_file(path) else str(path))
        raise RetroRayError(
            f"{path} was trained with a tokenizer of {data['vocab_size']} tokens but this project's has "
            f"{vocab_size}; prepare the project with that model's tokenizer (tokenizer.path={hint})."
        )
    theirs = data.get("tokenizer_path")
    if tokenizer_path and Path(tokenizer_path).is_file() and not (theirs and Path(theirs).resolve() == Path(tokenizer_path).resolve()):
        base = base_tokenizer(path, data)
        diff = vocabulary_difference(load_tokenizer(Path(tokenizer_path)), base, ("the project's", "the base's")) if base else None
        if diff:
            raise RetroRayError(f"this project's tokenizer is not the one {path} was trained with: {diff}; prepare "
                                f"the project with tokenizer.path={theirs or 'the tokenizer directory import-hf writes'}.")


def read_export(path: str | Path) -> dict[str, Any]:
    """The export dict, checked to be one (RetroRayError otherwise)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RetroRayError(f"{p} does not exist; give the model.pt written by `export`.")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- garbage input fails in many ways (KeyError from a stray
        # pickle opcode, UnpicklingError for non-tensor objects, RuntimeError for a bad zip, ...)
        raise RetroRayError(
            f"{p} is not a retro-ray export (torch.load with weights_only=True failed: {str(e).splitlines()[0][:200]}); "
            "export a training run with `retro_ray.train.export.export(exp_dir, out_path)`."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise RetroRayError(
            f"{p} is a torch file but not a retro-ray export (no format={EXPORT_FORMAT!r} tag); export a "
            "training run with `retro_ray.train.export.export(exp_dir, out_path)`."
        )
    if payload.get("version") != EXPORT_VERSION:
        raise RetroRayError(f"{p} is a retro-ray export of version {payload.get('version')}; this code reads "
                            f"version {EXPORT_VERSION}: export the run again with this version.")
    return payload


def load_exported(
    path: str | Path,
    *,
    expected_vocab_size: int | None = None,
    expected_config: RetroConfig | dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> RetroModel:
    """The exported RetroModel (fp32, eval mode).

    ``expected_vocab_size``: the vocabulary of the tokenizer the caller will use; it must be the one
    the model was trained with (or, when unrecorded, fit into the model's embedding).
    ``expected_config``: a RetroConfig (or a dict of some of its fields, nested ``retro`` allowed)
    that must match the model's; the first differing field is named.
    """
    payload = read_export(path)
    config = RetroConfig.from_dict(payload["config"])
    if expected_config is not None:
        want = expected_config.to_dict() if isinstance(expected_config, RetroConfig) else dict(expected_config)
        _compare(want, config.to_dict(), path)
    if expected_vocab_size is not None:
        trained = payload.get("data", {}).get("vocab_size")
        if trained is not None and int(trained) != int(expected_vocab_size):
            raise RetroRayError(
                f"vocab_size: {path} was trained with a tokenizer of {trained} tokens, but the expected "
                f"vocabulary has {expected_vocab_size}; use the tokenizer of the training project."
            )
        if expected_vocab_size > config.vocab_size:
            raise RetroRayError(
                f"vocab_size: the expected vocabulary has {expected_vocab_size} tokens but the model in {path} "
                f"has only {config.vocab_size} embedding rows; use the tokenizer the model was trained with."
            )
    model = RetroModel(config)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:
        raise RetroRayError(f"{path}: the weights do not fit the recorded config ({str(e).splitlines()[0]}); "
                            "export the run again.") from None
    return model.to(device).eval()


def _compare(want: dict[str, Any], have: dict[str, Any], path: Any, prefix: str = "") -> None:
    for key, value in want.items():
        if key not in have:
            raise RetroRayError(f"{prefix}{key} is not a model config field (expected config for {path}).")
        if isinstance(value, dict) and isinstance(have[key], dict):
            _compare(value, have[key], path, f"{prefix}{key}.")
            continue
        a = list(value) if isinstance(value, tuple) else value
        if a != have[key]:
            raise RetroRayError(
                f"{prefix}{key}: the model in {path} has {prefix}{key}={have[key]!r} but {a!r} was expected; "
                "load the model that matches, or change the expected setting."
            )
