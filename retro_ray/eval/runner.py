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

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.eval.config import GOAL_KNOWLEDGE_UPDATE, GOAL_OFF_VS_GPT, GOAL_RETRO_VS_GPT, EvalConfig
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


def default_out_dir(project: Project) -> Path:
    return project.eval_dir


def alpha_key(alpha: float) -> str:
    return f"{alpha:g}"


def score_valid(project: Project, retro: LoadedModel, gpt: LoadedModel | None, cfg: EvalConfig, device: torch.device,
                byte_len: np.ndarray, progress: bool = True) -> dict[str, Any]:
    """Every pass over the same valid samples, reduced as it goes to what the figures need: per pass the
    NLL of each sample and of each chunk 1..C-1; per chunk its bytes and leakage (memory O(samples x C))."""
    from tqdm import tqdm

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
    ds = RetroDataset(project, "valid", max([k_head, *ks_ok]))
    N = len(ds) if cfg.max_samples is None else min(len(ds), cfg.max_samples)
    if N == 0:
        raise RetroRayError(f"the valid split of {project.root} has no samples; give the project a valid split "
                            "(split=98,2,0) and rerun the pipeline.")

    passes = ["retro", "retro_off"] + (["gpt"] if gpt is not None else []) + [f"k={k}" for k in ks_ok if k != k_head]
    lo, hi = m - 1, max(C_, 1) * m - 1  # label positions u*m-1 .. (u+1)*m-2 predict chunk u (1..C-1)
    sample_nll = {p: np.zeros(N) for p in passes}
    chunk_nll = {p: np.zeros((N, max(C_ - 1, 0))) for p in passes}
    sample_bytes = np.zeros(N, dtype=np.int64)
    chunk_bytes = np.zeros((N, max(C_ - 1, 0)), dtype=np.int64)
    leakage = np.zeros((N, max(C_ - 1, 0)), dtype=np.int64)
    nbr_count = np.zeros((N, C_), dtype=np.int64)
    seconds = dict.fromkeys(passes, 0.0)

    def run(name: str, model, b: dict, k: int | None, s: int, e: int) -> None:
        t0 = time.perf_counter()
        nt = nm = None
        if k is not None:
            nt, nm = b["neighbor_tokens"][:, :, :k], b["neighbor_mask"][:, :, :k]
        with torch.inference_mode():
            nll = token_nll(model, b["tokens"], b["labels"], nt, nm).double().cpu().numpy()  # [B, n]
        sample_nll[name][s:e] = nll.sum(axis=1)
        if C_ > 1:
            chunk_nll[name][s:e] = nll[:, lo:hi].reshape(e - s, C_ - 1, m).sum(-1)
        seconds[name] += time.perf_counter() - t0

    bar = tqdm(total=N, desc="eval valid", unit=" samples", disable=True if not progress else None, leave=False)
    for s in range(0, N, cfg.batch_size):
        e = min(N, s + cfg.batch_size)
        items = [ds[i] for i in range(s, e)]
        b = {key: v.to(device) for key, v in collate(items).items()}
        run("retro", retro.model, b, k_head, s, e)
        run("retro_off", retro.model, b, None, s, e)
        if gpt is not None:
            run("gpt", gpt.model, b, None, s, e)
        for k in ks_ok:
            if k != k_head:
                run(f"k={k}", retro.model, b, k, s, e)
        text = np.stack([it["text"] for it in items])                              # [B, n+1]
        tok_bytes = byte_len[text[:, 1:]]                                           # [B, n], of the labels
        sample_bytes[s:e] = tok_bytes.sum(axis=1)
        nbr_tok = np.stack([it["neighbor_tokens"][:, :k_head] for it in items])  # [B, C, K, r]
        nbr_ok = np.stack([it["neighbor_mask"][:, :k_head] for it in items])     # [B, C, K]
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
            "ks_ok": ks_ok, "samples": N, "valid_samples": len(ds), "tokens": N * n, "seconds": seconds}


def summarise_valid(sc: dict[str, Any], cfg: EvalConfig, m: int) -> dict[str, Any]:
    total_bytes = int(sc["sample_bytes"].sum())
    ppl = {p: perplexity(float(v.sum()), sc["tokens"]) for p, v in sc["sample_nll"].items()}
    bpb = {p: bits_per_byte(float(v.sum()), total_bytes) for p, v in sc["sample_nll"].items()}

    def by_name(k: int) -> str:
        return "retro" if k == sc["k_head"] else f"k={k}"

    ppl_by_k = {str(k): (ppl[by_name(k)] if k in sc["ks_ok"] else None) for k in cfg.ks}
    bpb_by_k = {str(k): (bpb[by_name(k)] if k in sc["ks_ok"] else None) for k in cfg.ks}
    models = [p for p in ("retro", "retro_off", "gpt") if p in sc["chunk_nll"]]
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


def _goal(value: float | None, target: float, ok: bool | None, text: str) -> dict[str, Any]:
    return {"value": value, "target": target, "met": ok, "goal": text}


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
    retro.model.to(device)
    if gpt is not None:
        gpt.model.to(device)

    t0 = time.perf_counter()
    from retro_ray.tokenizer import load_tokenizer

    byte_len = token_byte_lengths(load_tokenizer(project.tokenizer_path), retro.config.vocab_size)
    sc = score_valid(project, retro, gpt, cfg, device, byte_len, progress)
    v = summarise_valid(sc, cfg, pcfg.chunk_length)
    t_valid = time.perf_counter() - t0

    ku = None
    if heldout_docs is not None:
        from retro_ray.eval.knowledge import knowledge_update

        ku = knowledge_update(project, retro, heldout_docs, sc["k_head"], batch_size=cfg.batch_size, device=device,
                              neighbors_query=cfg.heldout_neighbors_query,
                              embed_device="cuda" if device.type == "cuda" else "cpu", progress=progress)
        ku["source"] = str(heldout) if isinstance(heldout, (str, Path)) else f"{len(heldout_docs)} records given"

    twin = same_decoder(retro, gpt) if gpt else None  # a RETRO-fit of this very GPT
    ppl, bpb = v["ppl"], v["bpb"]
    gpt_ppl = ppl.get("gpt")
    ratio = ppl["retro"] / gpt_ppl if gpt_ppl else None
    off_dev = abs(ppl["retro_off"] / gpt_ppl - 1.0) if gpt_ppl else None
    ku_ratio = ku["ratio"] if ku else None
    results: dict[str, Any] = {
        "retro_ppl": ppl["retro"], "retro_off_ppl": ppl["retro_off"], "gpt_ppl": gpt_ppl,
        "retro_bpb": bpb["retro"], "retro_off_bpb": bpb["retro_off"], "gpt_bpb": bpb.get("gpt"),
        "retro_k": sc["k_head"],
        "ppl_by_k": v["ppl_by_k"], "bpb_by_k": v["bpb_by_k"], "bpb_by_alpha": v["bpb_by_alpha"],
        "knowledge_update_before_ppl": ku["before_ppl"] if ku else None,
        "knowledge_update_after_ppl": ku["after_ppl"] if ku else None,
        "knowledge_update": ku,
        "goals": {
            "retro_vs_gpt": _goal(ratio, GOAL_RETRO_VS_GPT, None if ratio is None else ratio <= GOAL_RETRO_VS_GPT,
                                  f"RETRO perplexity <= {GOAL_RETRO_VS_GPT} x the GPT baseline's (measured: RETRO / GPT)"),
            "retro_off_vs_gpt": _goal(off_dev, GOAL_OFF_VS_GPT, None if off_dev is None else off_dev <= GOAL_OFF_VS_GPT,
                                      f"RETRO with retrieval off within {GOAL_OFF_VS_GPT:.0%} of the baseline "
                                      "(measured: abs(off / GPT - 1))"),
            "knowledge_update": _goal(ku_ratio, GOAL_KNOWLEDGE_UPDATE,
                                      None if ku_ratio is None else ku_ratio <= GOAL_KNOWLEDGE_UPDATE,
                                      f"held-out perplexity after add-docs <= {GOAL_KNOWLEDGE_UPDATE} x before (measured: after / before)"),
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
        "device": str(device),
        "timings": {"valid_s": round(t_valid, 3), **{f"pass_{p}_s": round(s, 3) for p, s in sc["seconds"].items()}},
    }
    files = write_report(results, out, retro.history, gpt.history if gpt else [], plots=cfg.plots)
    results["files"] = files
    results["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
    atomic_write_json(out / RESULTS_FILE, results)  # last: its presence means the evaluation finished
    return results
