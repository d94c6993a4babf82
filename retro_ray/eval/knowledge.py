"""Knowledge update: perplexity of held-out documents before and after ``add-docs``, no retraining.

The documents (a JSONL file of {"title", "text"} records, or a list of such dicts) were held out of
prep, so neither the model nor the retrieval database has seen them. They are normalised and
tokenized as prep does (each ends with the end-of-document token), and each document is cut on its
own into windows of seq_length + 1 tokens starting at its first token, so that a window's chunks
line up with the chunks add-docs cuts the document into; the last window of a document is padded
and its padding is not scored. Every chunk of a window gets its neighbours retrieved live from the
project's index (``Retriever``: decode → embed → search), and RETRO scores the window with them.

"before": retrieval from the database without the added documents. To make the figure the same on a
rerun (when the documents were already added), chunk ids at or above the train database's size —
the ids add-docs gives to added chunks — are dropped from the search results before the first k are
kept (``heldout_neighbors_query`` candidates are searched, so k remain). "after": the documents are
added with ``retro_ray.stages.add_docs.add_documents`` (idempotent), and retrieval runs on the grown
index and database with nothing dropped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retro_ray.errors import RetroRayError
from retro_ray.eval.scoring import longest_common_run, perplexity, token_nll
from retro_ray.model.retro import IGNORE_INDEX
from retro_ray.project import Project


def read_heldout(project: Project, source: str | Path | list) -> list[dict[str, str]]:
    """[{"title", "text"}] (normalised) from a path (read as add-docs and the corpus read it: .jsonl,
    .jsonl.gz, .parquet, text files, a directory) or a list of records; fields "text" and "title"."""
    try:
        from retro_ray.stages.add_docs import read_documents
    except ImportError:
        raise RetroRayError(
            "the knowledge update needs add-docs (retro_ray.stages.add_docs), which this installation lacks; "
            "run eval without held-out documents."
        ) from None

    docs, _ = read_documents(source, "text", "title", project.read_config().corpus.normalization)
    return [{"title": d.title, "text": d.text} for d in docs]


def heldout_windows(project: Project, docs: list[dict[str, str]], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [W, seq_length + 1] windows, bool [W, seq_length + 1] document-token mask).

    Each document (its tokens + EOD) is cut on its own into windows of seq_length + 1 tokens with
    stride seq_length, starting at its first token: the window's chunks then line up with the
    chunks the database cuts the same document into. The last window is EOD-padded.
    """
    cfg = project.read_config()
    eod = int(project.derived()["eod_id"])
    n = cfg.seq_length
    windows, real = [], []
    for e in tokenizer.encode_batch([d["text"] for d in docs], add_special_tokens=False):
        toks = np.append(np.asarray(e.ids, dtype=np.int64), eod)
        for start in range(0, max(1, len(toks) - 1), n):
            part = toks[start:start + n + 1]
            w = np.full(n + 1, eod, dtype=np.int64)
            w[:len(part)] = part
            windows.append(w)
            real.append(np.arange(n + 1) < len(part))
    return np.stack(windows), np.stack(real)


def retrieve_neighbors(retriever, windows: np.ndarray, real: np.ndarray, chunk_length: int, k: int, k_query: int,
                       exclude_from: int | None) -> np.ndarray:
    """int64 [W, C, k] neighbour chunk ids (-1 = none) of every chunk of every window.

    ``real`` [W, seq_length]: which token positions hold document tokens (padding is never searched).
    With ``exclude_from``, ids >= it are dropped before the first k are kept.
    """
    W, n1 = windows.shape
    C = (n1 - 1) // chunk_length
    chunks = windows[:, :C * chunk_length].reshape(W * C, chunk_length)
    lengths = real[:, :C * chunk_length].reshape(W * C, chunk_length).sum(axis=1)
    ids = np.full((W * C, k), -1, dtype=np.int64)
    todo = np.flatnonzero(lengths > 0)
    if len(todo):
        found = retriever.search_token_chunks([chunks[i, :lengths[i]] for i in todo], k_query).ids
        for row, cand in zip(todo, found):
            keep = cand[cand >= 0]
            if exclude_from is not None:
                keep = keep[keep < exclude_from]
            ids[row, :min(k, len(keep))] = keep[:k]
    return ids.reshape(W, C, k)


def score_windows(model, windows: np.ndarray, real_labels: np.ndarray, neighbor_tokens: np.ndarray | None,
                  neighbor_mask: np.ndarray | None, device: torch.device, batch_size: int) -> tuple[float, int]:
    """(summed NLL, scored tokens) of RETRO on the windows, with the neighbours given (None = off)."""
    total, count = 0.0, 0
    for s in range(0, len(windows), batch_size):
        text = torch.from_numpy(windows[s:s + batch_size]).to(device)
        labels = text[:, 1:].masked_fill(~torch.from_numpy(real_labels[s:s + batch_size]).to(device), IGNORE_INDEX)
        nt = nm = None
        if neighbor_tokens is not None:
            nt = torch.from_numpy(neighbor_tokens[s:s + batch_size]).to(device)
            nm = torch.from_numpy(neighbor_mask[s:s + batch_size]).to(device)
        with torch.inference_mode():
            nll = token_nll(model, text[:, :-1], labels, nt, nm)
        total += float(nll.double().sum())
        count += int((labels != IGNORE_INDEX).sum())
    return total, count


def verbatim_fraction(windows: np.ndarray, real: np.ndarray, neighbor_tokens: np.ndarray, neighbor_mask: np.ndarray,
                      chunk_length: int, pad_id: int) -> tuple[float | None, int]:
    """(fraction of full chunks u >= 1 whose whole text is inside a neighbour of chunk u-1, chunks counted)."""
    m = chunk_length
    W, C = neighbor_tokens.shape[:2]
    rows = []
    for u in range(1, C):
        full = real[:, u * m:(u + 1) * m].all(axis=1)  # chunk u's tokens are text[u*m:(u+1)*m]
        for w in np.flatnonzero(full):
            rows.append((w, u))
    if not rows:
        return None, 0
    w_idx, u_idx = np.array(rows).T
    chunks = np.stack([windows[w, u * m:(u + 1) * m] for w, u in rows])
    nbrs = neighbor_tokens[w_idx, u_idx - 1]
    runs = longest_common_run(chunks, nbrs, neighbor_mask[w_idx, u_idx - 1], pad_id)
    return float((runs >= m).mean()), len(rows)


def _controls(model, baseline, windows: np.ndarray, real_labels: np.ndarray, before: tuple[np.ndarray, np.ndarray],
              after: tuple[np.ndarray, np.ndarray], after_ppl: float | None, m: int, eod: int, device: torch.device,
              batch_size: int, controls: bool, in_context: tuple[int, int] | None) -> dict[str, Any]:
    """The knowledge update's controls (eval/controls.py) on the same windows and tokens; ``after_ppl``:
    RETRO's with the neighbours retrieved after add-docs."""
    from retro_ray.eval.controls import in_context_nll, oracle_neighbors, other_sample_order

    out: dict[str, Any] = {}

    def ppl(nll_count: tuple[float, int]) -> float | None:
        return perplexity(*nll_count)

    order = other_sample_order(len(windows)) if controls else None
    if order is not None:
        out["other_after_ppl"] = ppl(score_windows(model, windows, real_labels, after[0][order], after[1][order],
                                                   device, batch_size))
    if controls:
        out["oracle_ppl"] = ppl(score_windows(model, windows, real_labels,
                                              *oracle_neighbors(windows, *after, m, eod), device, batch_size))
    if baseline is not None:
        out["base_ppl"] = ppl(score_windows(baseline.model, windows, real_labels, None, None, device, batch_size))
        if in_context is not None:
            k_ctx, window = in_context
            for name, (nt, nm) in (("before", before), ("after", after)):
                total, count, used = 0.0, 0, 0
                for s in range(0, len(windows), batch_size):
                    sl = slice(s, s + batch_size)
                    nll, n_used = in_context_nll(baseline.model, windows[sl], real_labels[sl], nt[sl, :, :k_ctx],
                                                 nm[sl, :, :k_ctx], m, eod, window, device)
                    total, count, used = total + float(nll.sum()), count + int(real_labels[sl].sum()), used + n_used
                out[f"in_context_{name}_ppl"] = perplexity(total, count)
                out[f"in_context_{name}_tokens_per_token"] = used / count if count else None
    other, oracle = out.get("other_after_ppl"), out.get("oracle_ppl")
    out["after_over_other_after"] = after_ppl / other if other and after_ppl else None
    out["oracle_over_other_after"] = oracle / other if other and oracle else None
    b, a = out.get("in_context_before_ppl"), out.get("in_context_after_ppl")
    out["in_context_after_over_before"] = a / b if a and b else None
    return out


def knowledge_update(project: Project, retro, docs: list[dict[str, str]], k: int, *, batch_size: int,
                     device: torch.device, neighbors_query: int | None = None, embed_device: str = "auto",
                     progress: bool = True, controls: bool = True, baseline=None,
                     in_context: tuple[int, int] | None = None) -> dict[str, Any]:
    """Held-out perplexity before and after add-docs (see the module docstring); returns the figures.
    ``docs``: what :func:`read_heldout` returns. ``controls``: RETRO also with another window's
    neighbours after add-docs and with an oracle neighbour (eval/controls.py). ``baseline`` (a LoadedModel):
    its perplexity on the windows, and with ``in_context`` = (neighbours, window) In-Context RALM on it
    with the neighbours retrieved before and after."""
    from retro_ray.retrieval.retriever import Retriever
    from retro_ray.stages.add_docs import AddDocsConfig, add_documents

    t0 = time.perf_counter()
    cfg = project.read_config()
    m, eod = cfg.chunk_length, int(project.derived()["eod_id"])
    retriever = Retriever.local(project, device=embed_device)
    windows, real = heldout_windows(project, docs, retriever.db.tokenizer)
    W = len(windows)
    real_labels = real[:, 1:]
    k_query = max(k, neighbors_query or cfg.query.num_neighbors_query)
    base = int(retriever.db.n_train)  # the train database as built by `db`; add-docs numbers from here

    ids_before = retrieve_neighbors(retriever, windows, real[:, :-1], m, k, k_query, exclude_from=base)
    nt_before = retriever.neighbor_tokens(ids_before)
    before = score_windows(retro.model, windows, real_labels, nt_before, ids_before >= 0, device, batch_size)
    off = score_windows(retro.model, windows, real_labels, None, None, device, batch_size)
    t_before = time.perf_counter() - t0

    t1 = time.perf_counter()
    added = add_documents(project, docs, AddDocsConfig(text_field="text", title_field="title"), retriever=retriever,
                          progress=progress)
    t_add = time.perf_counter() - t1

    t2 = time.perf_counter()
    retriever.sync_added()  # add_documents syncs the retriever it is given; this is a no-op then
    ids_after = retrieve_neighbors(retriever, windows, real[:, :-1], m, k, k_query, exclude_from=None)
    nt_after = retriever.neighbor_tokens(ids_after)
    after = score_windows(retro.model, windows, real_labels, nt_after, ids_after >= 0, device, batch_size)
    t_after = time.perf_counter() - t2

    t3 = time.perf_counter()
    extra = _controls(retro.model, baseline, windows, real_labels, (nt_before, ids_before >= 0),
                      (nt_after, ids_after >= 0), perplexity(*after), m, eod, device, batch_size, controls, in_context)
    t_controls = time.perf_counter() - t3

    vb_before, n_chunks = verbatim_fraction(windows, real, nt_before, ids_before >= 0, m, eod)
    vb_after, _ = verbatim_fraction(windows, real, nt_after, ids_after >= 0, m, eod)
    before_ppl, after_ppl = perplexity(*before), perplexity(*after)
    added_summary = added.to_dict() if hasattr(added, "to_dict") else added
    return {
        "documents": len(docs), "windows": W, "tokens_scored": before[1], "neighbors": k,
        "neighbors_query": k_query, "database_chunks_before": base,
        "database_chunks_after": len(retriever.db),
        "before_ppl": before_ppl, "after_ppl": after_ppl, "retrieval_off_ppl": perplexity(*off),
        "ratio": after_ppl / before_ppl if before_ppl and after_ppl else None,
        "chunks_with_neighbours_before": int((ids_before >= 0).any(axis=-1).sum()),
        "chunks_with_neighbours_after": int((ids_after >= 0).any(axis=-1).sum()),
        "neighbour_ids_at_or_above_base_before": int((ids_before >= base).sum()),
        "neighbour_ids_at_or_above_base_after": int((ids_after >= base).sum()),
        "controls": extra,
        "verbatim_chunks_counted": n_chunks, "verbatim_fraction_before": vb_before, "verbatim_fraction_after": vb_after,
        "add_docs": added_summary if isinstance(added_summary, (dict, list, str, int, float, type(None))) else str(added_summary),
        "timings": {"before_s": round(t_before, 3), "add_docs_s": round(t_add, 3), "after_s": round(t_after, 3),
                    "controls_s": round(t_controls, 3)},
    }
