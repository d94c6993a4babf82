"""Settings of ``retro-ray eval``: a config class (:func:`retro_ray.config.config_class`), YAML + ``key=value``
overrides like every stage."""

from __future__ import annotations

from dataclasses import field
from pathlib import Path

from retro_ray import config as C
from retro_ray.errors import RetroRayError

# The goals of the evaluation (the acceptance figures); the report says met / not met.
GOAL_RETRO_VS_GPT = 0.9       # RETRO perplexity <= 0.9 x the GPT baseline's
GOAL_OFF_VS_GPT = 0.05        # RETRO with retrieval off within 5 % of the baseline
GOAL_KNOWLEDGE_UPDATE = 0.6   # held-out perplexity after add-docs <= 0.6 x before


@C.config_class
class EvalConfig:
    max_samples: int | None = field(
        default=128,
        metadata=C.doc("Validation samples scored (the first ones of the valid split, seq_length tokens each); "
                       "empty = all. The default keeps the evaluation of a small model on CPUs short."),
    )
    batch_size: int = field(default=8, metadata=C.doc("Samples per forward pass."))
    ks: tuple[int, ...] = field(
        default=(1, 2, 4),
        metadata=C.doc("Neighbour counts k for the perplexity-vs-k curve (RETRO fed the first k saved neighbours of "
                       "every chunk); a k above what the query stage saved is reported as unavailable."),
    )
    alphas: tuple[float, ...] = field(
        default=(0.0, 0.125, 0.25, 0.5, 1.0),
        metadata=C.doc("Leakage thresholds (fractions of chunk_length) of the filtered bits-per-byte curve "
                       "(Borgeaud et al. 2022, section 2.6); 1 = every chunk."),
    )
    device: str = field(default="auto", metadata=C.doc("auto | cpu | cuda. auto = cuda when a GPU is visible."))
    num_threads: int | None = field(
        default=None, metadata=C.doc("torch CPU threads for the forward passes; empty = torch's default.")
    )
    heldout_neighbors_query: int | None = field(
        default=None,
        metadata=C.doc("Knowledge update: candidates searched per held-out chunk, of which chunks added by add-docs are "
                       "dropped for the 'before' figure; empty = the project's query.num_neighbors_query."),
    )
    plots: bool = field(default=True, metadata=C.doc("Write the PNG plots beside report.md."))

    def __post_init__(self) -> None:
        if self.max_samples is not None and self.max_samples < 1:
            raise RetroRayError(f"max_samples={self.max_samples} must be at least 1 (or empty for all).")
        if self.batch_size < 1:
            raise RetroRayError(f"batch_size={self.batch_size} must be at least 1.")
        if not self.ks or any(k < 1 for k in self.ks):
            raise RetroRayError(f"ks={list(self.ks)} must be a non-empty list of neighbour counts >= 1, e.g. 1,2,4.")
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise RetroRayError(f"alphas={list(self.alphas)} must be fractions in [0, 1], e.g. 0,0.125,0.25,0.5,1.")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise RetroRayError(f"device={self.device!r} is not one of auto, cpu, cuda (or cuda:<n>).")
        if self.num_threads is not None and self.num_threads < 1:
            raise RetroRayError(f"num_threads={self.num_threads} must be at least 1 (or empty).")
        if self.heldout_neighbors_query is not None and self.heldout_neighbors_query < 1:
            raise RetroRayError(f"heldout_neighbors_query={self.heldout_neighbors_query} must be at least 1 (or empty).")


def load_eval_config(config: str | Path | dict | None = None, overrides: list[str] | dict | None = None) -> EvalConfig:
    """A validated EvalConfig from a YAML file (path), a dict or nothing, plus ``key=value`` overrides."""
    if config is None:
        base: dict = {}
    elif isinstance(config, dict):
        base = config
    else:
        base = C.load_yaml(config)
    if isinstance(overrides, list):
        overrides = C.parse_overrides(overrides)
    return C.build(EvalConfig, C.merge(base, overrides or {}))
