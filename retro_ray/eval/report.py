"""report.md and its PNG plots from the results dict of :func:`retro_ray.eval.run_eval`.

Every number in the report is formatted by :func:`num` from a value in the results dict, so the
report and results.json always agree (a test checks this).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retro_ray.plots import figure, save_figure
from retro_ray.project import atomic_write_bytes

REPORT_FILE = "report.md"
PLOT_LOSS = "loss_curves.png"
PLOT_ALPHA = "bpb_by_alpha.png"
PLOT_K = "ppl_by_k.png"

DEFINITIONS = """\
- **Perplexity** = exp(mean token NLL) over the same scored tokens for every model: the labels
  (text[1:]) of the first {samples} samples of the valid split, {tokens:,} tokens in all.
- **Bits-per-byte** = total NLL in bits / UTF-8 bytes of the scored tokens decoded as text ({bytes:,}
  bytes); tokenizer-independent. The end-of-document token decodes to no text: it adds bits, no bytes.
- **Retrieval off** ("blanked"): RETRO is run with no neighbours, so every chunked cross-attention
  adds exactly zero to the residual stream (identical to masking every neighbour out); the decoder,
  embedding and all other weights are RETRO's own.
- **Neighbours**: the ones the `query` stage saved for each chunk (neighbours from any document of the
  sample are excluded); RETRO with k uses the first k. Mean real neighbours per chunk at k={k}: {mean_nbrs}.
- **Leakage** of chunk u (Borgeaud et al. 2022, section 2.6): the tokens of chunk u are predicted at
  positions u*m-1 .. (u+1)*m-2, which attend (through CCA) to the neighbours of chunk u-1; the leakage
  is the longest common contiguous token run between chunk u and any of those neighbours (chunk +
  continuation, end-of-document padding ignored). bpb(alpha) is over the chunks with leakage <=
  alpha x chunk_length (m = {m}); alpha = 100 % is every chunk. Chunk 0 has no neighbours to read and is
  excluded from this curve, as is the sample's last label (the first token of the next chunk).
"""


def num(x: Any, digits: int = 4) -> str:
    """The one number format of the report."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}g}" if abs(x) < 1e6 else f"{x:.4e}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def plot_loss_curves(retro_history: list[dict], gpt_history: list[dict], path: Path) -> str | None:
    series = [(name, h) for name, h in (("RETRO", retro_history), ("GPT", gpt_history)) if h]
    if not any(r.get("kind") in ("train", "val") for _, h in series for r in h):
        return None
    fig, ax = figure()
    for (name, h), color in zip(series, ("tab:blue", "tab:orange")):
        train = [(r["step"], r["train_loss"]) for r in h if r.get("kind") == "train" and r.get("train_loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in h if r.get("kind") == "val" and r.get("val_loss") is not None]
        if train:
            ax.plot(*zip(*train), color=color, lw=1.0, alpha=0.6, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), "o-", color=color, lw=1.6, ms=4, label=f"{name} val")
    return str(save_figure(fig, ax, path, xlabel="step", ylabel="cross-entropy (nats/token)", title="training curves"))


def plot_bpb_by_alpha(by_alpha: dict[str, Any], path: Path) -> str | None:
    rows = list(by_alpha.values())
    if not rows:
        return None
    fig, ax = figure()
    xs = [100 * r["alpha"] for r in rows]
    for key, label, style in (("retro", "RETRO", "o-"), ("retro_off", "RETRO, retrieval off", "s--"), ("gpt", "GPT", "^-"),
                              ("retro_other", "RETRO, another sample's neighbours", "x:"),
                              ("in_context", "In-Context RALM", "d-.")):
        pts = [(x, r[key]) for x, r in zip(xs, rows) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_xticks(xs, [f"{x:g}%\n{r['chunks']} chunks" for x, r in zip(xs, rows)], fontsize=7)
    return str(save_figure(fig, ax, path, xlabel="max leakage alpha (% of chunk length), chunks kept",
                           ylabel="bits per byte", title="bits-per-byte of chunks with leakage <= alpha"))


def plot_ppl_by_k(results: dict[str, Any], path: Path) -> str | None:
    pts = [(0, results["retro_off_ppl"])] + [(int(k), v) for k, v in results["ppl_by_k"].items() if v is not None]
    fig, ax = figure()
    pts.sort()
    ax.plot(*zip(*pts), "o-", label="RETRO (k = 0: retrieval off)")
    if results.get("gpt_ppl") is not None:
        ax.axhline(results["gpt_ppl"], color="tab:orange", ls="--", label="GPT baseline")
    ax.set_xticks([p[0] for p in pts])
    return str(save_figure(fig, ax, path, xlabel="neighbours per chunk k", ylabel="perplexity",
                           title="validation perplexity vs neighbours"))


def _goal_rows(goals: dict[str, Any]) -> list[list[str]]:
    rows = []
    for g in goals.values():
        result = "not measured" if g["met"] is None else ("met" if g["met"] else "**not met**")
        rows.append([g["goal"], num(g["value"]), num(g["target"]), result])
    return rows


CONTROL_ROWS = (
    ("saved", "RETRO, its retrieved neighbours"),
    ("other_sample", "RETRO, another sample's neighbours (relevance removed)"),
    ("oracle", "RETRO, oracle neighbour (the chunk's own continuation)"),
    ("blank", "RETRO, neighbours blanked"),
    ("base", "base ({base})"),
    ("in_context", "In-Context RALM on the base ({k} neighbours, window {window})"),
)


def _retrieval_section(r: dict[str, Any]) -> list[str]:
    """The neighbour controls, the gain split into adaptation and retrieval, and the inference cost."""
    rf = r.get("retrieval")
    if not rf:
        return []
    cost = rf["inference_cost"]
    ctx = cost.get("in_context") or {}
    base = "the GPT baseline" if rf["base"] == "gpt" else "RETRO with retrieval blanked"
    L = ["## Retrieval, told from adaptation", ""]
    L += ["The same tokens with four neighbour settings, the base, and In-Context RALM. Another sample's "
          "neighbours keep what the new weights (encoder, CCA) give without relevant text; the oracle asks "
          "whether the model reads its neighbours at all.", ""]
    rows = []
    for key, label in CONTROL_ROWS:
        if rf["ppl"].get(key) is None:
            continue
        rows.append([label.format(base=base, k=num(ctx.get("neighbors")), window=num(ctx.get("window"))),
                     num(rf["ppl"][key]), num(rf["bpb"][key])])
    L += _table(["model and neighbours", "perplexity", "bits/byte"], rows)
    if rf["retrieval_nats_per_token"] is not None:
        L += [f"Gain over the base: {num(rf['gain_nats_per_token'])} nats/token = the weights "
              f"{num(rf['adaptation_nats_per_token'])} (base -> RETRO with another sample's neighbours: for a "
              f"RETRO-fit, adaptation to the corpus) + retrieval {num(rf['retrieval_nats_per_token'])} (another "
              f"sample's neighbours -> its own). Saved / other-sample: {num(rf['saved_over_other'])}; oracle / "
              f"other-sample: {num(rf['oracle_over_other'])}.", ""]
    rc = cost["retro"]
    crow = [["RETRO", num(rc["decoder_tokens_per_token"]),
             f"{num(rc['encoder_tokens_per_token'])} ({num(rc['encoder_layers'])} layers of width {num(rc['encoder_width'])})",
             num(rc["forward_gflops_per_token"])]]
    if cost.get("base"):
        crow.append(["base", num(cost["base"]["decoder_tokens_per_token"]), "", num(cost["base"]["forward_gflops_per_token"])])
    if ctx:
        crow.append(["In-Context RALM", num(ctx["decoder_tokens_per_token"]), "", num(ctx["forward_gflops_per_token"])])
    L += ["Inference cost per scored token (forward GFLOPs: matrix products, attention over seq_length keys; "
          "In-Context RALM runs one forward of neighbours + prefix per chunk):", ""]
    L += _table(["", "decoder tokens", "encoder tokens", "forward GFLOPs"], crow)
    return L


def render(results: dict[str, Any], plots: dict[str, str | None]) -> str:
    r = results
    d, models, k = r["data"], r["models"], r["retro_k"]
    ret, gpt = models["retro"], models["gpt"]
    L: list[str] = ["# RETRO evaluation: does retrieval help?", ""]
    L += [f"Project `{d['project_dir']}`, {d['split']} split: {num(d['samples'])} of {num(d['valid_samples'])} samples of "
          f"{num(d['seq_length'])} tokens (chunk length {num(d['chunk_length'])}), {num(d['tokens'])} scored tokens, "
          f"{num(d['bytes'])} bytes. Device: {r['device']}, precision {r.get('precision', '32')}.", ""]
    L += [f"- RETRO: `{ret['source']}` — step {num(ret['train_step'])}, {num(ret['num_parameters'])} parameters, "
          f"trained with {num(ret['retro_num_neighbors'])} neighbours, evaluated with k = {num(k)}."]
    L += [f"- GPT baseline: `{gpt['source']}` — step {num(gpt['train_step'])}, {num(gpt['num_parameters'])} parameters."
          if gpt else "- GPT baseline: none given; its figures are n/a."]
    fit = r.get("retrofit")
    if fit:
        base = f"`{fit['init_from']}`" if fit["init_from"] else "a base not recorded in the model"
        L += [f"- RETRO-fit of {base}, decoder {'frozen' if fit['frozen'] else 'trained with the rest'}."
              + {True: " Its decoder equals the GPT baseline's bit for bit, so retrieval off equals the baseline "
                       "exactly and every difference below comes from the new weights (encoder, CCA): adaptation to "
                       "the corpus or retrieval, told apart by another sample's neighbours (next section).",
                 False: " Its decoder differs from the GPT baseline's: the baseline is not its base.",
                 None: ""}[fit["decoder_equals_baseline"]]]
    L += [""]

    L += ["## Goals", ""]
    L += _table(["goal", "measured", "target", "result"], _goal_rows(r["goals"]))
    g = r["goals"]
    if g["retro_vs_gpt"]["met"] is False:
        L += [f"RETRO's perplexity is {num(r['retro_ppl'])}, {num(g['retro_vs_gpt']['value'])} x the baseline's "
              f"{num(r['gpt_ppl'])}; the goal of {num(g['retro_vs_gpt']['target'])} x is not met.", ""]
    if g["retro_off_vs_gpt"]["met"] is False:
        L += [f"With retrieval off RETRO's perplexity is {num(r['retro_off_ppl'])} against the baseline's "
              f"{num(r['gpt_ppl'])} (off by {num(g['retro_off_vs_gpt']['value'])}, more than "
              f"{num(g['retro_off_vs_gpt']['target'])}). Why: RETRO's decoder was trained with chunked cross-attention "
              "always adding retrieved information, so without it its hidden states are off the distribution "
              "it learned; the paper's RETRO[OFF] matches the baseline only after long training on a large corpus, "
              "where the decoder must also model the many chunks whose neighbours do not help. "
              + ("The two runs also differ: " + "; ".join(r["comparability"]) + "." if r["comparability"] else ""), ""]
    if g["knowledge_update"]["met"] is False:
        ku = r["knowledge_update"]
        L += [f"Held-out perplexity went from {num(ku['before_ppl'])} to {num(ku['after_ppl'])} after add-docs "
              f"({num(ku['ratio'])} x, goal {num(g['knowledge_update']['target'])} x): not met.", ""]
    if r["comparability"]:
        L += ["The GPT baseline is not a like-for-like comparison: " + "; ".join(r["comparability"]) + ".", ""]

    L += _retrieval_section(r)

    L += ["## Perplexity and bits-per-byte", ""]
    L += _table(["model", "perplexity", "bits/byte"], [
        [f"RETRO (k = {num(k)})", num(r["retro_ppl"]), num(r["retro_bpb"])],
        ["RETRO, retrieval off", num(r["retro_off_ppl"]), num(r["retro_off_bpb"])],
        ["GPT baseline", num(r["gpt_ppl"]), num(r["gpt_bpb"])],
    ])

    L += ["## Neighbours per chunk", ""]
    L += _table(["k", "perplexity", "bits/byte"],
                [[k_, num(v), num(r["bpb_by_k"][k_])] for k_, v in r["ppl_by_k"].items()])
    if d["ks_unavailable"]:
        L += [f"k = {', '.join(map(str, d['ks_unavailable']))}: not available, the query stage saved "
              f"{num(d['neighbors_available'])} neighbours per chunk (rerun `retro-ray query` with a larger "
              "query.num_neighbors_save to evaluate more).", ""]
    if plots.get("ppl_by_k"):
        L += [f"![perplexity vs k]({Path(plots['ppl_by_k']).name})", ""]

    L += ["## Leakage-filtered bits-per-byte", ""]
    if r["bpb_by_alpha"]:
        L += _table(["alpha", "max leakage (tokens)", "chunks", "RETRO", "RETRO off", "GPT", "RETRO, other sample's",
                     "In-Context RALM"], [
            [f"{100 * row['alpha']:g} %", num(row["max_leakage_tokens"]), num(row["chunks"]), num(row.get("retro")),
             num(row.get("retro_off")), num(row.get("gpt")), num(row.get("retro_other")), num(row.get("in_context"))]
            for row in r["bpb_by_alpha"].values()])
        empty = [f"{100 * row['alpha']:g} %" for row in r["bpb_by_alpha"].values() if row["chunks"] == 0]
        if empty:
            L += [f"alpha = {', '.join(empty)}: no chunk overlaps its neighbours that little (alpha = 0 keeps only "
                  "chunks that share not a single token with any neighbour), so there is no figure.", ""]
        lk = d["leakage"]
        L += [f"Over the {num(lk['chunks'])} chunks with neighbours: mean leakage {num(lk['mean_tokens'])} tokens, "
              f"largest {num(lk['max_tokens'])}; a fraction {num(lk['verbatim_fraction'])} of chunks appear whole "
              "in a neighbour of the chunk before. Chunk 0 of every sample is excluded (it has no neighbours).", ""]
        if plots.get("bpb_by_alpha"):
            L += [f"![bpb by alpha]({Path(plots['bpb_by_alpha']).name})", ""]
    else:
        L += ["No chunk has neighbours to read (a sample is a single chunk): no curve.", ""]

    L += ["## Knowledge update", ""]
    ku = r["knowledge_update"]
    if ku is None:
        L += ["Not run: no held-out documents were given, and the project has none (prep's corpus.holdout_fraction "
              "writes them to data/heldout.jsonl).", ""]
    else:
        L += [f"{num(ku['documents'])} documents (`{ku.get('source', '')}`) held out of training and of the database, "
              f"{num(ku['tokens_scored'])} "
              f"tokens in {num(ku['windows'])} windows, scored by RETRO with k = {num(ku['neighbors'])} neighbours "
              "retrieved live for every chunk from the project's index.", ""]
        L += _table(["", "perplexity", "fraction of chunks whose text is in a neighbour", "database chunks"], [
            ["before add-docs", num(ku["before_ppl"]), num(ku["verbatim_fraction_before"]), num(ku["database_chunks_before"])],
            ["after add-docs", num(ku["after_ppl"]), num(ku["verbatim_fraction_after"]), num(ku["database_chunks_after"])],
            ["retrieval off (reference)", num(ku["retrieval_off_ppl"]), "", ""],
        ])
        kc = ku.get("controls") or {}
        rows = [[label, num(kc[key])] for key, label in (
            ("other_after_ppl", "RETRO, another window's neighbours (after add-docs)"),
            ("oracle_ppl", "RETRO, oracle neighbour"), ("base_ppl", "the baseline"),
            ("in_context_before_ppl", "In-Context RALM, before add-docs"),
            ("in_context_after_ppl", "In-Context RALM, after add-docs")) if kc.get(key) is not None]
        if rows:
            L += ["Controls on the same held-out tokens:", ""]
            L += _table(["", "perplexity"], rows)
            if kc.get("after_over_other_after") is not None:
                L += [f"After add-docs, its own neighbours / another window's: {num(kc['after_over_other_after'])}; "
                      f"oracle / another window's: {num(kc['oracle_over_other_after'])}.", ""]
        counts = ku["add_docs"].get("counts", {}) if isinstance(ku["add_docs"], dict) else {}
        if counts:
            L += [f"add-docs: {num(counts.get('docs_added', 0))} documents added "
                  f"({num(counts.get('chunks_added', 0))} chunks), {num(counts.get('docs_skipped_already_added', 0))} "
                  "already added by an earlier run.", ""]
        if counts.get("docs_skipped_in_corpus"):
            L += [f"**{num(counts['docs_skipped_in_corpus'])} of the documents are in the project's corpus** (add-docs "
                  "skipped them): they were not held out, so for them these figures are not a knowledge update.", ""]
        L += [f"After / before: {num(ku['ratio'])}. The 'before' figure drops neighbour ids >= "
              f"{num(ku['database_chunks_before'])} (the chunks add-docs adds) from {num(ku['neighbors_query'])} searched "
              "candidates, so it is the same whether or not the documents were already added.", ""]

    L += ["## Loss curves", ""]
    if plots.get("loss_curves"):
        L += [f"![loss curves]({Path(plots['loss_curves']).name})", ""]
    else:
        L += ["No training history was found beside either model (metrics.jsonl); no plot.", ""]

    L += ["## Definitions", ""]
    L += [DEFINITIONS.format(samples=num(d["samples"]), tokens=d["tokens"], bytes=d["bytes"], k=num(k),
                             mean_nbrs=num(d["mean_neighbors_per_chunk"]), m=num(d["chunk_length"]))]
    L += ["## Settings", ""]
    L += _table(["setting", "value"], [[key, f"`{val}`"] for key, val in r["config"].items()])
    return "\n".join(L)


def format_results(results: dict[str, Any]) -> str:
    """A few lines for the terminal: the headline figures, the goals, where the report is."""
    rows = ["eval: done"]
    for key in ("retro_ppl", "retro_off_ppl", "gpt_ppl", "retro_other_ppl", "retro_oracle_ppl", "in_context_ppl",
                "knowledge_update_before_ppl", "knowledge_update_after_ppl"):
        rows.append(f"  {key:<30} {num(results.get(key))}")
    rows.append(f"  {'ppl_by_k':<30} " + ", ".join(f"k={k}: {num(v)}" for k, v in results["ppl_by_k"].items()))
    for name, g in results["goals"].items():
        state = "not measured" if g["met"] is None else ("met" if g["met"] else "NOT MET")
        rows.append(f"  goal {name:<25} {state} ({num(g['value'])} vs {num(g['target'])})")
    for path in (results.get("files") or {}).values():
        if path:
            rows.append(f"  -> {path}")
    return "\n".join(rows)


def write_report(results: dict[str, Any], out_dir: Path, retro_history: list[dict], gpt_history: list[dict], *,
                 plots: bool = True) -> dict[str, str | None]:
    """Write the plots and report.md into ``out_dir``; returns {name: path or None}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, str | None] = {"loss_curves": None, "bpb_by_alpha": None, "ppl_by_k": None}
    if plots:
        made["loss_curves"] = plot_loss_curves(retro_history, gpt_history, out_dir / PLOT_LOSS)
        made["bpb_by_alpha"] = plot_bpb_by_alpha(results["bpb_by_alpha"], out_dir / PLOT_ALPHA)
        made["ppl_by_k"] = plot_ppl_by_k(results, out_dir / PLOT_K)
    report = out_dir / REPORT_FILE
    atomic_write_bytes(report, render(results, made).encode())
    return {"report": str(report), **made}
