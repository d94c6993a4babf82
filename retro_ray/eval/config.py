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
GOAL_READS = 0.5              # with an oracle neighbour <= 0.5 x with another sample's: the model reads
GOAL_RETRIEVAL_PAYS = 0.98    # with its saved neighbours <= 0.98 x with another sample's
GOAL_VS_IN_CONTEXT = 1.1      # RETRO within 10 % of In-Context RALM's perplexity


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
    precision: str = field(
        default="32",
        metadata=C.doc("32 | bf16 | auto: the models' weights and activations in the forward passes. auto = bf16 on "
                       "GPUs and on CPUs with AMX bf16 tiles, as trainer.precision=auto; bf16 perplexities differ from "
                       "fp32's in their last digits."),
    )
    num_threads: int | None = field(
        default=None, metadata=C.doc("torch CPU threads for the forward passes; empty = torch's default.")
    )
    heldout_neighbors_query: int | None = field(
        default=None,
        metadata=C.doc("Knowledge update: candidates searched per held-out chunk, of which chunks added by add-docs are "
                       "dropped for the 'before' figure; empty = the project's query.num_neighbors_query."),
    )
    plots: bool = field(default=True, metadata=C.doc("Write the PNG plots beside report.md."))
    controls: bool = field(
        default=True,
        metadata=C.doc("Score RETRO also with another sample's neighbours (relevance removed: what its new weights "
                       "give alone) and with an oracle neighbour (the chunk's own continuation: does it read?), on "
                       "valid and in the knowledge update."),
    )
    in_context: bool = field(
        default=True,
        metadata=C.doc("Score In-Context RALM (Ram et al. 2023) on the same tokens: the --baseline decoder, frozen, "
                       "with each chunk's retrieved neighbours' text prepended (retrieval every chunk_length tokens, "
                       "from the last complete chunk), and its inference cost beside RETRO's. Needs --baseline."),
    )
    in_context_neighbors: int | None = field(
        default=None,
        metadata=C.doc("Neighbours prepended per retrieval in In-Context RALM (the best nearest the text); empty = "
                       "RETRO's k. Those that do not fit the context window beside the text to score are left out, "
                       "the lowest-ranked first."),
    )
    in_context_window: int | None = field(
        default=None,
        metadata=C.doc("Most tokens one In-Context RALM forward holds (prefix tokens are dropped from the start past "
                       "it); empty = the baseline's own context: the positions an imported model was trained for, "
                       "seq_length for a model trained here."),
    )

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
        if self.precision not in ("32", "bf16", "auto"):
            raise RetroRayError(f"precision={self.precision!r} is not one of 32, bf16, auto.")
        if self.num_threads is not None and self.num_threads < 1:
            raise RetroRayError(f"num_threads={self.num_threads} must be at least 1 (or empty).")
        for name in ("in_context_neighbors", "in_context_window"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RetroRayError(f"{name}={value} must be at least 1 (or empty).")
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
