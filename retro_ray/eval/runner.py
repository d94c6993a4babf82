"""``run_eval``: does retrieval help? RETRO vs RETRO with retrieval off vs the GPT baseline.

Everything is scored on the same tokens: the first ``max_samples`` samples of the project's valid
split, with the neighbours the ``query`` stage saved for them (same-document neighbours excluded).
Passes over each batch:
    retro        RETRO with its trained number of neighbours k (capped at what was saved)
    retro_off    RETRO with retrieval blanked: no neighbour is given, so every chunked
                 cross-attention adds exactly zero (the same as masking every neighbour out)
    gpt          the GPT baseline
    k=<k>        RETRO fed the first k saved neighbours, for each requested k
Outputs (``out_dir``, default ``<project>/eval``): report.md, PNG plots, results.json (written last).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.eval.config import (
    GOAL_KNOWLEDGE_UPDATE,
    GOAL_OFF_VS_GPT,
    GOAL_READS,
    GOAL_RETRIEVAL_PAYS,
    GOAL_RETRO_VS_GPT,
    GOAL_VS_IN_CONTEXT,
    EvalConfig,
)
from retro_ray.eval.models import LoadedModel, comparability, load_model, same_decoder
from retro_ray.eval.scoring import bits_per_byte, longest_common_run, perplexity, token_byte_lengths, token_nll
from retro_ray.project import Project, atomic_write_json

RESULTS_FILE = "results.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RetroRayError(f"device={name} was asked for but torch sees no GPU; use device=cpu or auto.")
    return torch.device(name)


def eval_precision(setting: str, device: torch.device) -> str:
    """"32" or "bf16": the setting, with auto = bf16 on a GPU or a CPU with AMX bf16 tiles (as trainer.precision=auto)."""
    from retro_ray.runtime import cpu_has_amx

    if setting != "auto":
        return setting
    return "bf16" if device.type == "cuda" or cpu_has_amx() else "32"


def default_out_dir(project: Project) -> Path:
    return project.eval_dir


def alpha_key(alpha: float) -> str:
    return f"{alpha:g}"


def score_valid(project: Project, retro: LoadedModel, gpt: LoadedModel | None, cfg: EvalConfig, device: torch.device,
                byte_len: np.ndarray, progress: bool = True) -> dict[str, Any]:
    """Every pass over the same valid samples, reduced as it goes to what the figures need: per pass the
    NLL of each sample and of each chunk 1..C-1; per chunk its bytes and leakage (memory O(samples x C))."""
    from tqdm import tqdm

    from retro_ray.eval.controls import in_context_nll, oracle_neighbors, other_sample_order
    from retro_ray.train.dataset import RetroDataset
    from retro_ray.train.loop import collate

    pcfg = project.read_config()
    m, n = pcfg.chunk_length, pcfg.seq_length
    C_ = n // m
    eod = int(project.derived()["eod_id"])
    available = RetroDataset(project, "valid", 0).num_neighbors_available
    k_model = retro.config.retro.retro_num_neighbors
    k_head = min(k_model, available)
    if k_head < 1:
        raise RetroRayError(f"the query stage saved no neighbours for {project.root}; rerun `retro-ray query` with "
                            "query.num_neighbors_save >= 1.")
    ks_ok = sorted({k for k in cfg.ks if k <= available})
    k_ctx = min(cfg.in_context_neighbors or k_head, available)
    ds = RetroDataset(project, "valid", max([k_head, k_ctx, *ks_ok]))
    N = len(ds) if cfg.max_samples is None else min(len(ds), cfg.max_samples)
    if N == 0:
        raise RetroRayError(f"the valid split of {project.root} has no samples; give the project a valid split "
                            "(split=98,2,0) and rerun the pipeline.")
    other = other_sample_order(N) if cfg.controls else None
    in_context = gpt is not None and cfg.in_context
    window = cfg.in_context_window or (gpt.context_window if gpt is not None else 0)

    passes = (["retro", "retro_off"] + (["gpt"] if gpt is not None else [])
              + (["retro_other"] if other is not None else []) + (["retro_oracle"] if cfg.controls else [])
              + (["in_context"] if in_context else []) + [f"k={k}" for k in ks_ok if k != k_head])
    lo, hi = m - 1, max(C_, 1) * m - 1  # label positions u*m-1 .. (u+1)*m-2 predict chunk u (1..C-1)
    sample_nll = {p: np.zeros(N) for p in passes}
    chunk_nll = {p: np.zeros((N, max(C_ - 1, 0))) for p in passes}
    sample_bytes = np.zeros(N, dtype=np.int64)
    chunk_bytes = np.zeros((N, max(C_ - 1, 0)), dtype=np.int64)
    leakage = np.zeros((N, max(C_ - 1, 0)), dtype=np.int64)
    nbr_count = np.zeros((N, C_), dtype=np.int64)
    seconds = dict.fromkeys(passes, 0.0)
    in_context_tokens = 0

    def keep(name: str, nll: np.ndarray, s: int, e: int) -> None:  # nll [B, n]
        sample_nll[name][s:e] = nll.sum(axis=1)
        if C_ > 1:
            chunk_nll[name][s:e] = nll[:, lo:hi].reshape(e - s, C_ - 1, m).sum(-1)

    def run(name: str, model, b: dict, nbrs: tuple[np.ndarray, np.ndarray] | int | None, s: int, e: int) -> None:
        """nbrs: the first k saved neighbours (an int), given ones (tokens, mask), or None (blank)."""
        t0 = time.perf_counter()
        nt = nm = None
        if isinstance(nbrs, int):
            nt, nm = b["neighbor_tokens"][:, :, :nbrs], b["neighbor_mask"][:, :, :nbrs]
        elif nbrs is not None:
            nt, nm = (torch.from_numpy(x).to(device) for x in nbrs)
        with torch.inference_mode():
            nll = token_nll(model, b["tokens"], b["labels"], nt, nm).double().cpu().numpy()  # [B, n]
        keep(name, nll, s, e)
        seconds[name] += time.perf_counter() - t0

    bar = tqdm(total=N, desc="eval valid", unit=" samples", disable=True if not progress else None, leave=False)
    for s in range(0, N, cfg.batch_size):
        e = min(N, s + cfg.batch_size)
        items = [ds[i] for i in range(s, e)]
        b = {key: v.to(device) for key, v in collate(items).items()}
        text = np.stack([it["text"] for it in items])                              # [B, n+1]
        saved = (np.stack([it["neighbor_tokens"][:, :k_head] for it in items]),    # [B, C, K, r]
                 np.stack([it["neighbor_mask"][:, :k_head] for it in items]))      # [B, C, K]
        run("retro", retro.model, b, k_head, s, e)
        run("retro_off", retro.model, b, None, s, e)
        if gpt is not None:
            run("gpt", gpt.model, b, None, s, e)
        if other is not None:
            theirs = [ds[int(other[i])] for i in range(s, e)]
            run("retro_other", retro.model, b, (np.stack([it["neighbor_tokens"][:, :k_head] for it in theirs]),
                                                np.stack([it["neighbor_mask"][:, :k_head] for it in theirs])), s, e)
        if cfg.controls:
            run("retro_oracle", retro.model, b, oracle_neighbors(text, *saved, m, eod), s, e)
        if in_context:
            t0 = time.perf_counter()
            nll, used = in_context_nll(gpt.model, text, np.ones((e - s, n), dtype=bool),
                                       np.stack([it["neighbor_tokens"][:, :k_ctx] for it in items]),
                                       np.stack([it["neighbor_mask"][:, :k_ctx] for it in items]), m, eod, window, device)
            keep("in_context", nll, s, e)
            in_context_tokens += used
            seconds["in_context"] += time.perf_counter() - t0
        for k in ks_ok:
            if k != k_head:
                run(f"k={k}", retro.model, b, k, s, e)
        tok_bytes = byte_len[text[:, 1:]]                                           # [B, n], of the labels
        sample_bytes[s:e] = tok_bytes.sum(axis=1)
        nbr_tok, nbr_ok = saved
        nbr_count[s:e] = nbr_ok.sum(axis=-1)
        if C_ > 1:
            chunk_bytes[s:e] = tok_bytes[:, lo:hi].reshape(e - s, C_ - 1, m).sum(-1)
            # chunk u (1..C-1) = text[u*m:(u+1)*m], against the neighbours of chunk u-1
            chunks = text[:, m:C_ * m].reshape(-1, m)
            leakage[s:e] = longest_common_run(chunks, nbr_tok[:, :-1].reshape(-1, k_head, nbr_tok.shape[-1]),
                                              nbr_ok[:, :-1].reshape(-1, k_head), eod).reshape(e - s, C_ - 1)
        bar.update(e - s)
    bar.close()
    return {"sample_nll": sample_nll, "chunk_nll": chunk_nll, "sample_bytes": sample_bytes, "chunk_bytes": chunk_bytes,
            "leakage": leakage, "nbr_count": nbr_count, "k_head": k_head, "k_model": k_model, "available": available,
            "ks_ok": ks_ok, "samples": N, "valid_samples": len(ds), "tokens": N * n, "seconds": seconds,
            "in_context": {"neighbors": k_ctx, "window": window, "tokens_processed": in_context_tokens}
            if in_context else None}


def summarise_valid(sc: dict[str, Any], cfg: EvalConfig, m: int) -> dict[str, Any]:
    total_bytes = int(sc["sample_bytes"].sum())
    ppl = {p: perplexity(float(v.sum()), sc["tokens"]) for p, v in sc["sample_nll"].items()}
    bpb = {p: bits_per_byte(float(v.sum()), total_bytes) for p, v in sc["sample_nll"].items()}

    def by_name(k: int) -> str:
        return "retro" if k == sc["k_head"] else f"k={k}"

    ppl_by_k = {str(k): (ppl[by_name(k)] if k in sc["ks_ok"] else None) for k in cfg.ks}
    bpb_by_k = {str(k): (bpb[by_name(k)] if k in sc["ks_ok"] else None) for k in cfg.ks}
    models = [p for p in ("retro", "retro_off", "gpt", "retro_other", "retro_oracle", "in_context") if p in sc["chunk_nll"]]
    leak = sc["leakage"]
    by_alpha: dict[str, Any] = {}
    if leak.size:
        for a in sorted(cfg.alphas):
            sel = leak <= a * m + 1e-9
            row = {"alpha": a, "max_leakage_tokens": a * m, "chunks": int(sel.sum())}
            for p in models:
                row[p] = bits_per_byte(float(sc["chunk_nll"][p][sel].sum()), int(sc["chunk_bytes"][sel].sum()))
            by_alpha[alpha_key(a)] = row
    return {
        "ppl": ppl, "bpb": bpb, "ppl_by_k": ppl_by_k, "bpb_by_k": bpb_by_k, "bpb_by_alpha": by_alpha,
        "tokens": sc["tokens"], "bytes": total_bytes,
        "leakage": {"chunks": int(leak.size), "mean_tokens": float(leak.mean()) if leak.size else None,
                    "max_tokens": int(leak.max()) if leak.size else None,
                    "verbatim_fraction": float((leak >= m).mean()) if leak.size else None},
        "mean_neighbors_per_chunk": float(sc["nbr_count"].mean()),
    }


def retrieval_figures(ppl: dict[str, float], bpb: dict[str, float], sc: dict[str, Any], retro: LoadedModel,
                      gpt: LoadedModel | None) -> dict[str, Any]:
    """The neighbour controls side by side, the gain over the base split into adaptation and retrieval, and
    what RETRO and In-Context RALM cost per scored token.

    The base is the GPT baseline when given (for a frozen RETRO-fit, its base), else RETRO with
    retrieval blanked. In nats per token: gain = ln(base) - ln(saved) = adaptation + retrieval, with
    adaptation = ln(base) - ln(other-sample) (the new weights with irrelevant neighbours) and retrieval
    = ln(other-sample) - ln(saved) (what the relevant neighbours add)."""
    base_name = "gpt" if "gpt" in ppl else "retro_off"
    names = {"saved": "retro", "blank": "retro_off", "other_sample": "retro_other", "oracle": "retro_oracle",
             "base": base_name, "in_context": "in_context"}
    table = {label: ppl.get(p) for label, p in names.items()}
    saved, other, base, oracle, ctx = (table[x] for x in ("saved", "other_sample", "base", "oracle", "in_context"))

    def ln(x: float | None) -> float | None:
        return math.log(x) if x and math.isfinite(x) else None

    def diff(a: float | None, b: float | None) -> float | None:
        return None if ln(a) is None or ln(b) is None else ln(a) - ln(b)

    def over(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    c = retro.config
    k, r, m = sc["k_head"], c.neighbor_length, c.chunk_length
    cost: dict[str, Any] = {
        "retro": {"decoder_tokens_per_token": 1.0, "encoder_tokens_per_token": k * r / m,
                  "encoder_layers": c.retro.retro_encoder_num_layers, "encoder_width": c.encoder_hidden_size,
                  "forward_gflops_per_token": retro.model.flops_per_token() / 3 / 1e9},
        "base": None, "in_context": None,
    }
    if gpt is not None:
        base_gflops = gpt.model.flops_per_token() / 3 / 1e9
        cost["base"] = {"decoder_tokens_per_token": 1.0, "forward_gflops_per_token": base_gflops}
        if sc.get("in_context"):
            per = sc["in_context"]["tokens_processed"] / sc["tokens"]
            cost["in_context"] = {"decoder_tokens_per_token": per, "forward_gflops_per_token": base_gflops * per,
                                  "neighbors": sc["in_context"]["neighbors"], "window": sc["in_context"]["window"]}
    return {
        "ppl": table, "bpb": {label: bpb.get(p) for label, p in names.items()}, "base": base_name,
        "gain_nats_per_token": diff(base, saved), "adaptation_nats_per_token": diff(base, other),
        "retrieval_nats_per_token": diff(other, saved), "oracle_nats_per_token": diff(other, oracle),
        "saved_over_other": over(saved, other), "oracle_over_other": over(oracle, other),
        "saved_over_base": over(saved, base), "saved_over_in_context": over(saved, ctx),
        "in_context_over_base": over(ctx, base), "inference_cost": cost,
    }


def _goal(value: float | None, target: float, text: str) -> dict[str, Any]:
    """A goal of the form value <= target; met is None when the value was not measured."""
    return {"value": value, "target": target, "met": None if value is None else value <= target, "goal": text}


def run_eval(project_dir: str | Path | Project, exp_dir: str | Path, baseline_dir: str | Path | None = None,
             cfg: EvalConfig = EvalConfig(), out_dir: str | Path | None = None,
             heldout: str | Path | list | bool | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate the RETRO run in ``exp_dir`` against the GPT baseline in ``baseline_dir`` on the project's
    valid split, and the knowledge update on held-out documents; write report.md, the plots and
    results.json to ``out_dir`` (default ``<project>/eval``); return the results dict (what results.json holds).

    ``exp_dir`` / ``baseline_dir``: an experiment directory (or run / checkpoint directory) or a model.pt.
    ``heldout``: a path or a list of {"title", "text"} records; None = the project's data/heldout.jsonl
    (prep's corpus.holdout_fraction) when it exists; False = no knowledge update. The knowledge update
    adds the documents to the project's retrieval database (add-docs; a rerun adds nothing)."""
    from retro_ray.eval.report import write_report

    t_start = time.perf_counter()
    project = project_dir if isinstance(project_dir, Project) else Project(project_dir)
    pcfg = project.read_config()  # "not a project" error first
    project.require("query", "eval")
    device = resolve_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    retro = load_model(exp_dir, project, "--exp-dir")
    if not retro.is_retro:
        raise RetroRayError(f"--exp-dir {retro.source} holds a GPT (retro.enabled=false); give the RETRO run as "
                            "--exp-dir and the GPT run as --baseline.")
    gpt = None
    if baseline_dir is not None:
        gpt = load_model(baseline_dir, project, "--baseline")
        if gpt.is_retro:
            raise RetroRayError(f"--baseline {gpt.source} holds a RETRO model (retro.enabled=true); give the GPT "
                                "baseline run (trained with model.retro.enabled=false).")
    if heldout is None and project.heldout_path.is_file():
        heldout = project.heldout_path  # what prep held out (corpus.holdout_fraction)
    heldout_docs = None
    if heldout is not None and heldout is not False:  # read (and checked) before minutes of scoring
        from retro_ray.eval.knowledge import read_heldout

        heldout_docs = read_heldout(project, heldout)
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(project)
    precision = eval_precision(cfg.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    retro.model.to(device, dtype)
    if gpt is not None:
        gpt.model.to(device, dtype)

    t0 = time.perf_counter()
    from retro_ray.tokenizer import load_tokenizer

    byte_len = token_byte_lengths(load_tokenizer(project.tokenizer_path), retro.config.vocab_size)
    sc = score_valid(project, retro, gpt, cfg, device, byte_len, progress)
    v = summarise_valid(sc, cfg, pcfg.chunk_length)
    t_valid = time.perf_counter() - t0

    ku = None
    if heldout_docs is not None:
        from retro_ray.eval.knowledge import knowledge_update

        ctx = sc["in_context"]
        ku = knowledge_update(project, retro, heldout_docs, sc["k_head"], batch_size=cfg.batch_size, device=device,
                              neighbors_query=cfg.heldout_neighbors_query,
                              embed_device="cuda" if device.type == "cuda" else "cpu", progress=progress,
                              controls=cfg.controls, baseline=gpt,
                              in_context=(min(ctx["neighbors"], sc["k_head"]), ctx["window"]) if ctx else None)
        ku["source"] = str(heldout) if isinstance(heldout, (str, Path)) else f"{len(heldout_docs)} records given"

    twin = same_decoder(retro, gpt) if gpt else None  # a RETRO-fit of this very GPT
    ppl, bpb = v["ppl"], v["bpb"]
    gpt_ppl = ppl.get("gpt")
    ratio = ppl["retro"] / gpt_ppl if gpt_ppl else None
    off_dev = abs(ppl["retro_off"] / gpt_ppl - 1.0) if gpt_ppl else None
    ku_ratio = ku["ratio"] if ku else None
    rf = retrieval_figures(ppl, bpb, sc, retro, gpt)
    g_reads, g_pays, g_ctx = rf["oracle_over_other"], rf["saved_over_other"], rf["saved_over_in_context"]
    ku_c = (ku or {}).get("controls") or {}
    results: dict[str, Any] = {
        "retro_ppl": ppl["retro"], "retro_off_ppl": ppl["retro_off"], "gpt_ppl": gpt_ppl,
        "retro_bpb": bpb["retro"], "retro_off_bpb": bpb["retro_off"], "gpt_bpb": bpb.get("gpt"),
        "retro_k": sc["k_head"],
        "ppl_by_k": v["ppl_by_k"], "bpb_by_k": v["bpb_by_k"], "bpb_by_alpha": v["bpb_by_alpha"],
        "knowledge_update_before_ppl": ku["before_ppl"] if ku else None,
        "knowledge_update_after_ppl": ku["after_ppl"] if ku else None,
        "knowledge_update": ku,
        "retro_other_ppl": ppl.get("retro_other"), "retro_oracle_ppl": ppl.get("retro_oracle"),
        "in_context_ppl": ppl.get("in_context"),
        "retrieval": rf,
        "goals": {
            "reads": _goal(g_reads, GOAL_READS,
                           f"an oracle neighbour (the chunk's own continuation) <= {GOAL_READS} x another sample's "
                           "neighbours: the model reads (measured: oracle / other-sample)"),
            "retrieval_pays": _goal(g_pays, GOAL_RETRIEVAL_PAYS,
                                    f"its retrieved neighbours <= {GOAL_RETRIEVAL_PAYS} x another sample's (measured: "
                                    "saved / other-sample)"),
            "vs_in_context": _goal(g_ctx, GOAL_VS_IN_CONTEXT,
                                   f"RETRO within {GOAL_VS_IN_CONTEXT - 1:.0%} of In-Context RALM on its baseline "
                                   "(measured: RETRO / In-Context RALM)"),
            "knowledge_update_reads": _goal(ku_c.get("after_over_other_after"), GOAL_RETRIEVAL_PAYS,
                                            f"held-out, after add-docs: its retrieved neighbours <= {GOAL_RETRIEVAL_PAYS} "
                                            "x another window's (measured: after / other-window after)"),
            "retro_vs_gpt": _goal(ratio, GOAL_RETRO_VS_GPT,
                                  f"RETRO perplexity <= {GOAL_RETRO_VS_GPT} x the GPT baseline's (measured: RETRO / GPT; "
                                  "retrieval and adaptation together)"),
            "retro_off_vs_gpt": _goal(off_dev, GOAL_OFF_VS_GPT,
                                      f"RETRO with retrieval off within {GOAL_OFF_VS_GPT:.0%} of the baseline "
                                      "(measured: abs(off / GPT - 1))"),
            "knowledge_update": _goal(ku_ratio, GOAL_KNOWLEDGE_UPDATE,
                                      f"held-out perplexity after add-docs <= {GOAL_KNOWLEDGE_UPDATE} x before "
                                      "(measured: after / before)"),
        },
        "data": {
            "project_dir": str(project.root), "split": "valid", "samples": sc["samples"],
            "valid_samples": sc["valid_samples"], "seq_length": pcfg.seq_length, "chunk_length": pcfg.chunk_length,
            "tokens": v["tokens"], "bytes": v["bytes"], "neighbors_available": sc["available"],
            "mean_neighbors_per_chunk": v["mean_neighbors_per_chunk"], "leakage": v["leakage"],
            "ks_unavailable": [k for k in cfg.ks if k not in sc["ks_ok"]],
        },
        "models": {"retro": retro.info(), "gpt": gpt.info() if gpt else None},
        "retrofit": ({"init_from": retro.init_from, "frozen": bool(retro.config.retro.freeze_decoder),
                      "decoder_equals_baseline": twin}
                     if retro.init_from or retro.config.retro.freeze_decoder else None),
        "comparability": comparability(retro, gpt, twin) if gpt else [],
        "config": C.to_dict(cfg),
        "device": str(device), "precision": precision,
        "timings": {"valid_s": round(t_valid, 3), **{f"pass_{p}_s": round(s, 3) for p, s in sc["seconds"].items()}},
    }
    files = write_report(results, out, retro.history, gpt.history if gpt else [], plots=cfg.plots)
    results["files"] = files
    results["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
    atomic_write_json(out / RESULTS_FILE, results)  # last: its presence means the evaluation finished
    return results
