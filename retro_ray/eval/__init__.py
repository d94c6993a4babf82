"""``retro-ray eval``: does retrieval help? Perplexity and bits-per-byte of RETRO, RETRO with retrieval
off and the GPT baseline on the same valid tokens; perplexity against the neighbour count k; the
leakage-filtered bits-per-byte curve of Borgeaud et al. (2022, section 2.6); and the knowledge
update (held-out documents before / after ``add-docs``). See :func:`run_eval`."""

from retro_ray.eval.config import EvalConfig, load_eval_config
from retro_ray.eval.report import format_results
from retro_ray.eval.runner import run_eval

__all__ = ["EvalConfig", "format_results", "load_eval_config", "run_eval"]
