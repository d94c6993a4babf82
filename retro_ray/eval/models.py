"""Loading the models to compare: an experiment directory (or one of its checkpoints), a model.pt, or
(a baseline) a local Hugging Face directory or GGUF file.

An experiment directory is consolidated in memory (the same fp32 weights ``retro-ray export`` would
write), so evaluating a run needs no export step. The run's logged history comes along for the
loss-curve plot when it can be found. A Hugging Face directory is imported in memory, as
``retro-ray import-hf`` would write it, after its tokenizer is checked against the project's; so is a GGUF file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retro_ray.errors import RetroRayError
from retro_ray.project import Project

# Decoder settings that must agree for RETRO and the GPT baseline to be a like-for-like comparison.
DECODER_KEYS = ("vocab_size", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "chunk_length")


@dataclass
class LoadedModel:
    model: Any                      # RetroModel, eval mode
    source: str                     # what was loaded (model.pt or checkpoint directory)
    train_step: int
    data: dict[str, Any]            # what the run recorded about its data
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl records, when found
    weights_source: str = ""
    init_from: str = ""             # a RETRO-fit's base (model.init_from), "" otherwise

    @property
    def config(self):
        return self.model.config

    @property
    def context_window(self) -> int:
        """The most tokens one forward should hold: the positions an imported model was trained for, else
        the seq_length it was trained at (and never more than a learned position table has)."""
        c = self.model.config
        window = int(self.data.get("context_length") or c.seq_length)
        return min(window, c.max_position_embeddings) if c.family == "gpt2" else window

    @property
    def is_retro(self) -> bool:
        return bool(self.model.config.retro.enabled)

    def info(self) -> dict[str, Any]:
        c = self.model.config
        return {"source": self.source, "retro": self.is_retro, "train_step": self.train_step,
                "num_parameters": self.model.num_parameters(), "weights_source": self.weights_source,
                "init_from": self.init_from, "freeze_decoder": bool(self.is_retro and c.retro.freeze_decoder),
                "retro_num_neighbors": c.retro.retro_num_neighbors if self.is_retro else 0,
                "seq_length": c.seq_length, **{k: getattr(c, k) for k in DECODER_KEYS},
                "trained_on": self.data.get("project_dir"), "history_records": len(self.history)}


def _history(*candidates: Path) -> list[dict[str, Any]]:
    for p in candidates:
        if p.is_file():
            return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return []


def load_model(path: str | Path, project: Project, role: str) -> LoadedModel:
    """A model from ``path`` (experiment dir, run dir, checkpoint dir, model.pt, a local Hugging Face
    directory or a GGUF file), checked against the project's tokenizer and chunk length. ``role`` names the argument in
    error messages."""
    from retro_ray.model.hf import is_pretrained
    from retro_ray.model.retro import RetroConfig, RetroModel
    from retro_ray.train.export import (
        base_of,
        check_base_tokenizer,
        consolidate,
        find_checkpoint,
        load_exported,
        read_base,
        read_export,
    )
    from retro_ray.train.loop import CHECKPOINT_FORMAT, CHECKPOINT_HISTORY, CHECKPOINT_META
    from retro_ray.train.trainer import METRICS_FILE

    p = Path(path).expanduser()
    if not p.exists():
        raise RetroRayError(f"{role} {p} does not exist; give an experiment directory (exp_manager.exp_dir), a "
                            "model.pt, a local Hugging Face model directory or a .gguf file.")
    vocab = int(project.derived().get("vocab_size", 0)) or None
    if p.is_dir() and (p / "model.pt").is_file() and not (p / "train_report.json").is_file():
        p = p / "model.pt"
    if is_pretrained(p):
        pcfg = project.read_config()
        config, state_dict, data = read_base(p, seq_length=pcfg.seq_length, chunk_length=pcfg.chunk_length)
        if vocab is not None:
            check_base_tokenizer(p, data, vocab, project.tokenizer_path)
        model = RetroModel(config)
        model.load_state_dict(state_dict, strict=True)
        loaded = LoadedModel(model.eval(), str(p), 0, data, [], f"{data['source']}:{p.resolve()}")
    elif p.is_file():
        payload = read_export(p)
        model = load_exported(p, expected_vocab_size=vocab)
        ckpt = Path(payload.get("checkpoint") or "/nonexistent")
        loaded = LoadedModel(model, str(p), int(payload.get("train_step", 0)), dict(payload.get("data", {})),
                             _history(p.parent / METRICS_FILE, ckpt / CHECKPOINT_HISTORY),
                             str(payload.get("weights_source", "")), str(payload.get("init_from") or ""))
    else:
        ckpt = find_checkpoint(p)
        meta = json.loads((ckpt / CHECKPOINT_META).read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise RetroRayError(f"{ckpt} is not a retro-ray checkpoint ({CHECKPOINT_META} has no format tag).")
        data = dict(meta.get("model_data", {}))
        config = RetroConfig.from_dict(meta["model_config"])
        trained_vocab = data.get("vocab_size")
        if vocab is not None and trained_vocab is not None and int(trained_vocab) != vocab:
            raise RetroRayError(f"vocab_size: {role} {p} was trained with a tokenizer of {trained_vocab} tokens but the "
                                f"project {project.root} has {vocab}; evaluate it on the project it was trained on.")
        state_dict, source = consolidate(ckpt, meta)
        model = RetroModel(config)
        model.load_state_dict(state_dict, strict=True)
        model.eval()
        exp_dir = p if (p / METRICS_FILE).is_file() else ckpt.parent.parent
        loaded = LoadedModel(model, str(ckpt), int(meta["train_step"]), data,
                             _history(exp_dir / METRICS_FILE, ckpt / CHECKPOINT_HISTORY), source, base_of(meta))
    cfg = project.read_config()
    if loaded.config.chunk_length != cfg.chunk_length:
        raise RetroRayError(f"chunk_length: {role} {loaded.source} has chunk_length={loaded.config.chunk_length} but the "
                            f"project {project.root} has {cfg.chunk_length}; evaluate it on the project it was trained on.")
    if vocab is not None and vocab > loaded.config.vocab_size:
        raise RetroRayError(f"vocab_size: the project's tokenizer has {vocab} tokens but {role} {loaded.source} has "
                            f"{loaded.config.vocab_size} embedding rows; evaluate it on the project it was trained on.")
    return loaded


def same_decoder(retro: LoadedModel, gpt: LoadedModel) -> bool:
    """Whether RETRO's decoder (every parameter outside the encoder and the CCA layers) equals the GPT's
    bit for bit: a RETRO-fit of that GPT with its decoder frozen. Then every difference between the two
    models comes from the new weights: adaptation or retrieval, which the neighbour controls tell apart."""
    from retro_ray.model.retrofit import is_retrieval_parameter

    ours = {k: v for k, v in retro.model.state_dict().items() if not is_retrieval_parameter(k)}
    theirs = gpt.model.state_dict()
    return set(ours) == set(theirs) and all(
        ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]) for k in ours)


def comparability(retro: LoadedModel, gpt: LoadedModel, twin: bool = False) -> list[str]:
    """Why the GPT baseline is not a like-for-like comparison with RETRO (empty = it is). ``twin``
    (``same_decoder``): a RETRO-fit compared with its own frozen base is like for like whatever the
    step counts."""
    out = []
    for key in DECODER_KEYS:
        a, b = getattr(retro.config, key), getattr(gpt.config, key)
        if a != b:
            out.append(f"decoder {key}: RETRO {a}, GPT {b}")
    if retro.train_step != gpt.train_step and not twin:
        out.append(f"training steps: RETRO {retro.train_step}, GPT {gpt.train_step}")
    ra, ga = retro.data.get("project_dir"), gpt.data.get("project_dir")
    if ra and ga and Path(ra).resolve() != Path(ga).resolve():
        out.append(f"training data: RETRO {ra}, GPT {ga}")
    return out
