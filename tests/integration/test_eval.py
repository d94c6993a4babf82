"""retro-ray eval on a real small project: report structure, numbers recomputed from the run, invariants
that tie the figures together, a real trained experiment directory, and the knowledge update end to end.

A real project (the whole pipeline through the CLI on 150 documents, on a real local Ray cluster),
real Faiss, the real embedder and add-docs. Models: exports with random weights (`write_random_export`)
and GPT / zero-CCA variants built from the same weights, so invariants are exact; plus one real
4-step Ray Train + DeepSpeed RETRO run for the experiment-directory path and the loss curves.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from retro_ray.errors import RetroRayError
from retro_ray.eval import EvalConfig, format_results, load_eval_config, run_eval
from retro_ray.eval.report import num
from retro_ray.eval.scoring import longest_common_run, token_byte_lengths
from retro_ray.project import Project
from retro_ray.tokenizer import load_tokenizer
from tests.support import build_small_project, write_random_export

N_CORPUS = 150
HOLDOUT = "corpus.holdout_fraction=0.04"  # prep keeps ~6 of the documents out, in data/heldout.jsonl
KEYS = ("retro_ppl", "retro_off_ppl", "gpt_ppl", "knowledge_update_before_ppl", "knowledge_update_after_ppl",
        "bpb_by_alpha", "ppl_by_k")
SECTIONS = ("# RETRO evaluation", "## Goals", "## Perplexity and bits-per-byte", "## Neighbours per chunk",
            "## Leakage-filtered bits-per-byte", "## Knowledge update", "## Loss curves", "## Definitions", "## Settings")
SMALL = EvalConfig(max_samples=6, batch_size=4, ks=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def project(train_ray_address, wiki_docs, tmp_path_factory) -> Project:
    return build_small_project(tmp_path_factory.mktemp("eval"), wiki_docs[:N_CORPUS], train_ray_address, HOLDOUT)


def evaluate(project: Project, retro, gpt, cfg: EvalConfig, out: Path, heldout=False) -> dict:
    """run_eval without the knowledge update unless asked (it adds documents to the project)."""
    return run_eval(project.root, retro, gpt, cfg, out_dir=out, heldout=heldout, progress=False)


def _save(payload: dict, path: Path) -> Path:
    buf = io.BytesIO()
    torch.save(payload, buf)
    path.write_bytes(buf.getvalue())
    return path


def _variant(src: Path, dst: Path, *, gpt: bool = False, zero_cca: bool = False) -> Path:
    """The export at ``src`` as a GPT (its decoder weights, no CCA / encoder) or with every CCA output
    projection zeroed (so CCA adds exactly nothing)."""
    payload = torch.load(src, weights_only=True)
    sd = dict(payload["state_dict"])
    if gpt:
        payload["config"] = {**payload["config"], "retro": {**payload["config"]["retro"], "enabled": False}}
        sd = {k: v for k, v in sd.items() if ".cca." not in k and ".ln_cca." not in k and not k.startswith("encoder.")}
    if zero_cca:
        sd = {k: torch.zeros_like(v) if ".cca.attn.out_proj." in k else v for k, v in sd.items()}
    payload["state_dict"] = sd
    return _save(payload, dst)


@pytest.fixture(scope="module")
def models(project, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    retro = write_random_export(d / "retro.pt", project, retro=True, seed=0)
    zero = _variant(retro, d / "retro_zero_cca.pt", zero_cca=True)
    return {"retro": retro, "gpt": _variant(retro, d / "gpt.pt", gpt=True), "zero_cca": zero,
            "gpt_of_zero": _variant(zero, d / "gpt_of_zero.pt", gpt=True),
            "retro_seed1": write_random_export(d / "retro_seed1.pt", project, retro=True, seed=1),
            "chunk32": write_random_export(d / "chunk32.pt", project, retro=True, chunk_length=32)}


@pytest.fixture(scope="module")
def base(project, models, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval_base")
    return evaluate(project, models["retro"], models["gpt"], SMALL, out), out


def _report_numbers(results: dict) -> list[tuple[str, object]]:
    """Every figure the report shows, with where it comes from in results.json."""
    rows = [(k, results[k]) for k in ("retro_ppl", "retro_off_ppl", "gpt_ppl", "retro_bpb", "retro_off_bpb", "gpt_bpb")]
    rows += [(f"ppl_by_k.{k}", v) for k, v in results["ppl_by_k"].items()]
    rows += [(f"bpb_by_k.{k}", v) for k, v in results["bpb_by_k"].items()]
    for a, row in results["bpb_by_alpha"].items():
        rows += [(f"bpb_by_alpha.{a}.{k}", row[k]) for k in ("chunks", "retro", "retro_off", "gpt")]
    rows += [(f"data.{k}", results["data"][k]) for k in ("samples", "tokens", "bytes")]
    rf = results["retrieval"]
    rows += [(f"retrieval.ppl.{k}", v) for k, v in rf["ppl"].items() if v is not None]
    rows += [(f"retrieval.{k}", rf[k]) for k in ("gain_nats_per_token", "adaptation_nats_per_token",
                                                 "retrieval_nats_per_token", "saved_over_other", "oracle_over_other")]
    if rf["inference_cost"]["in_context"]:
        rows += [("in_context tokens", rf["inference_cost"]["in_context"]["decoder_tokens_per_token"])]
    ku = results["knowledge_update"]
    if ku:
        rows += [(f"knowledge_update.{k}", ku[k]) for k in ("before_ppl", "after_ppl", "retrieval_off_ppl", "ratio",
                                                            "verbatim_fraction_before", "verbatim_fraction_after")]
    return rows


def test_report_structure_and_results_json(base, project):
    results, out = base
    saved = json.loads((out / "results.json").read_text())
    assert saved["retro_ppl"] == results["retro_ppl"] and set(KEYS) <= set(saved)
    report = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in report, section
    for name in ("bpb_by_alpha.png", "ppl_by_k.png"):
        assert (out / name).stat().st_size > 5000 and f"]({name})" in report
    # random-weight exports carry no training history: no loss-curve plot, and the report says so
    assert results["files"]["loss_curves"] is None and "No training history" in report
    for where, value in _report_numbers(results):
        assert num(value) in report, f"{where}={value} is not in the report as {num(value)}"
    assert results["knowledge_update"] is None and "Not run: no held-out documents" in report
    assert results["knowledge_update_before_ppl"] is None and results["knowledge_update_after_ppl"] is None
    summary = format_results(results)  # what the CLI prints
    assert f"retro_ppl                      {num(results['retro_ppl'])}" in summary
    assert "goal retro_vs_gpt" in summary and str(out / "report.md") in summary


def test_figures_are_consistent_and_recomputed(base, project, models):
    results, _ = base
    cfg = project.read_config()
    m, C = cfg.chunk_length, cfg.seq_length // cfg.chunk_length
    d = results["data"]
    assert d["samples"] == 6 and d["tokens"] == 6 * cfg.seq_length and d["neighbors_available"] == 4
    # the headline RETRO figure is RETRO at its trained k (2)
    assert results["retro_k"] == 2 and results["ppl_by_k"]["2"] == results["retro_ppl"]
    # k = 8 is more than the query stage saved: reported as unavailable, not computed
    assert results["ppl_by_k"]["8"] is None and d["ks_unavailable"] == [8]
    assert all(results["ppl_by_k"][k] > 0 for k in ("1", "2", "4"))
    # the GPT is RETRO's decoder without CCA: exactly RETRO with retrieval off
    assert results["gpt_ppl"] == pytest.approx(results["retro_off_ppl"], rel=1e-9)
    # the random CCA does change RETRO's output
    assert results["retro_ppl"] != pytest.approx(results["retro_off_ppl"], rel=1e-9)
    # bits-per-byte and perplexity measure the same NLL: bpb = ln(ppl) * tokens / (ln 2 * bytes)
    for key in ("retro", "retro_off", "gpt"):
        assert results[f"{key}_bpb"] == pytest.approx(
            math.log(results[f"{key}_ppl"]) * d["tokens"] / (math.log(2) * d["bytes"]), rel=1e-9)
    # the bytes are those of the scored text, decoded (EOD decodes to nothing)
    from retro_ray.train.dataset import RetroDataset

    tok = load_tokenizer(project.tokenizer_path)
    ds = RetroDataset(project, "valid", 2)
    decoded = sum(len(tok.decode(ds[i]["text"][1:].tolist(), skip_special_tokens=True).encode()) for i in range(6))
    assert d["bytes"] == pytest.approx(decoded, rel=2e-3)
    # GPT perplexity recomputed here, independently: the model's own mean loss over the same samples
    from retro_ray.train.export import load_exported

    gpt = load_exported(models["gpt"])
    losses = []
    with torch.no_grad():
        for i in range(6):
            text = torch.from_numpy(ds[i]["text"].astype(np.int64))[None]
            losses.append(gpt(text[:, :-1], labels=text[:, 1:]).loss.item())
    assert results["gpt_ppl"] == pytest.approx(math.exp(sum(losses) / 6), rel=1e-5)
    # the leakage curve: chunk 0 excluded, counts grow with alpha up to every other chunk at 100 %
    rows = list(results["bpb_by_alpha"].values())
    assert [r["alpha"] for r in rows] == [0.0, 0.125, 0.25, 0.5, 1.0]
    counts = [r["chunks"] for r in rows]
    assert counts == sorted(counts) and counts[-1] == 6 * (C - 1) == d["leakage"]["chunks"]
    assert rows[-1]["max_leakage_tokens"] == m and d["leakage"]["max_tokens"] <= m
    full = rows[-1]
    assert full["gpt"] == pytest.approx(full["retro_off"], rel=1e-9) and full["retro"] > 0


def test_controls_and_in_context_are_recomputed(base, project, models):
    """Other-sample and oracle neighbours, recomputed here with the model's own forward; In-Context RALM
    through its scorer (tests/unit/test_eval_controls.py checks that one against forwards written out)."""
    from retro_ray.eval.controls import in_context_nll, oracle_neighbors
    from retro_ray.train.dataset import RetroDataset
    from retro_ray.train.export import load_exported

    results, _ = base
    cfg = project.read_config()
    m, eod = cfg.chunk_length, int(project.derived()["eod_id"])
    ds = RetroDataset(project, "valid", 2)
    retro, gpt = load_exported(models["retro"]), load_exported(models["gpt"])
    other_nll, oracle_nll, ctx_nll, used = [], [], [], 0
    with torch.no_grad():
        for i in range(6):
            it, theirs = ds[i], ds[(i + 3) % 6]  # 6 samples: the other sample is 3 along
            text = torch.from_numpy(it["text"].astype(np.int64))[None]
            nt = torch.from_numpy(theirs["neighbor_tokens"])[None]
            nm = torch.from_numpy(theirs["neighbor_mask"])[None]
            other_nll.append(retro(text[:, :-1], nt, nm, labels=text[:, 1:]).loss.item())
            ot, om = oracle_neighbors(it["text"][None], it["neighbor_tokens"][None], it["neighbor_mask"][None], m, eod)
            assert (ot[0, 0, 0, :m] == it["text"][:m]).all() and (ot[0, 1, 0] == it["text"][m:3 * m]).all()
            oracle_nll.append(retro(text[:, :-1], torch.from_numpy(ot), torch.from_numpy(om), labels=text[:, 1:]).loss.item())
            nll, u = in_context_nll(gpt, it["text"][None], np.ones((1, cfg.seq_length), bool), it["neighbor_tokens"][None],
                                    it["neighbor_mask"][None], m, eod, cfg.seq_length, torch.device("cpu"))
            ctx_nll.append(nll.mean())
            used += u
    assert results["retro_other_ppl"] == pytest.approx(math.exp(sum(other_nll) / 6), rel=1e-5)
    assert results["retro_oracle_ppl"] == pytest.approx(math.exp(sum(oracle_nll) / 6), rel=1e-5)
    assert results["in_context_ppl"] == pytest.approx(math.exp(sum(ctx_nll) / 6), rel=1e-5)
    rf = results["retrieval"]
    cost = rf["inference_cost"]
    assert cost["in_context"]["window"] == cfg.seq_length and cost["in_context"]["neighbors"] == 2
    assert cost["in_context"]["decoder_tokens_per_token"] == pytest.approx(used / results["data"]["tokens"])
    assert cost["in_context"]["decoder_tokens_per_token"] > 2 and cost["retro"]["encoder_tokens_per_token"] == 4
    # the gain over the base splits exactly into adaptation and retrieval; the base here is the GPT
    assert rf["base"] == "gpt" and rf["ppl"]["base"] == results["gpt_ppl"]
    assert rf["gain_nats_per_token"] == pytest.approx(rf["adaptation_nats_per_token"] + rf["retrieval_nats_per_token"])
    assert rf["retrieval_nats_per_token"] == pytest.approx(math.log(results["retro_other_ppl"] / results["retro_ppl"]))
    assert results["goals"]["reads"]["value"] == pytest.approx(results["retro_oracle_ppl"] / results["retro_other_ppl"])
    assert results["goals"]["vs_in_context"]["value"] == pytest.approx(results["retro_ppl"] / results["in_context_ppl"])
    # without controls or a baseline those passes are not run, and say n/a
    bare = run_eval(project.root, models["retro"], None, EvalConfig(max_samples=2, ks=(2,), controls=False),
                    out_dir=project.root / "bare-eval", heldout=False, progress=False)
    assert bare["retro_other_ppl"] is None and bare["in_context_ppl"] is None and bare["goals"]["reads"]["met"] is None
    assert bare["retrieval"]["base"] == "retro_off" and bare["retrieval"]["inference_cost"]["in_context"] is None
    # in bf16 the same figures move in their last digits only
    bf16 = run_eval(project.root, models["retro"], None, EvalConfig(max_samples=2, ks=(2,), controls=False, precision="bf16"),
                    out_dir=project.root / "bare-eval-bf16", heldout=False, progress=False)
    assert bf16["precision"] == "bf16" and bare["precision"] == "32"
    assert bf16["retro_ppl"] != bare["retro_ppl"] and bf16["retro_ppl"] == pytest.approx(bare["retro_ppl"], rel=0.02)


def test_numbers_change_with_the_data(base, project, models, tmp_path):
    results, out = base
    other = evaluate(project, models["retro_seed1"], models["gpt"], SMALL, tmp_path / "seed1")
    assert other["retro_ppl"] != results["retro_ppl"] and other["retro_off_ppl"] != results["retro_off_ppl"]
    assert other["gpt_ppl"] == results["gpt_ppl"]  # same baseline, same data
    assert other["bpb_by_alpha"]["1"]["retro"] != results["bpb_by_alpha"]["1"]["retro"]
    report = (tmp_path / "seed1" / "report.md").read_text()
    assert num(other["retro_ppl"]) in report and num(results["retro_ppl"]) not in report
    fewer = evaluate(project, models["retro"], models["gpt"], EvalConfig(max_samples=3, batch_size=2, ks=(1, 2)),
                     tmp_path / "fewer")
    assert fewer["data"]["tokens"] == results["data"]["tokens"] // 2
    assert fewer["gpt_ppl"] != results["gpt_ppl"] and fewer["retro_ppl"] != results["retro_ppl"]
    assert list(fewer["ppl_by_k"]) == ["1", "2"] and fewer["bpb_by_alpha"]["1"]["chunks"] == 3 * 3
    # the batch size changes nothing but speed
    rebatched = evaluate(project, models["retro"], models["gpt"], EvalConfig(max_samples=3, batch_size=3, ks=(1, 2)),
                         tmp_path / "rebatched")
    assert rebatched["retro_ppl"] == pytest.approx(fewer["retro_ppl"], rel=1e-6)


def test_zero_cca_makes_retrieval_a_no_op(project, models, tmp_path):
    r = evaluate(project, models["zero_cca"], models["gpt_of_zero"], EvalConfig(max_samples=4, ks=(1, 2, 4)), tmp_path)
    assert r["retro_ppl"] == pytest.approx(r["retro_off_ppl"], rel=1e-12)
    assert all(v == pytest.approx(r["retro_off_ppl"], rel=1e-12) for v in r["ppl_by_k"].values())
    # the controls too: with CCA adding nothing, no neighbour setting moves anything
    assert r["retro_other_ppl"] == pytest.approx(r["retro_off_ppl"], rel=1e-12)
    assert r["retro_oracle_ppl"] == pytest.approx(r["retro_off_ppl"], rel=1e-12)
    assert r["retrieval"]["retrieval_nats_per_token"] == pytest.approx(0.0, abs=1e-9)
    assert r["gpt_ppl"] == pytest.approx(r["retro_off_ppl"], rel=1e-9)
    goals = r["goals"]
    assert goals["retro_off_vs_gpt"]["met"] is True and goals["retro_vs_gpt"]["met"] is False
    report = (tmp_path / "report.md").read_text()
    assert re.search(r"RETRO perplexity <= 0.9 x the GPT baseline's \(measured: RETRO / GPT; retrieval and adaptation together\) "
                     r"\| 1 \| 0.9 \| \*\*not met\*\*", report)
    assert f"RETRO's perplexity is {num(r['retro_ppl'])}" in report


def test_leakage_is_the_longest_common_token_run(project):
    m, r = 8, 16
    chunk = np.arange(10, 10 + m)[None]
    nbrs = np.full((1, 3, r), 999)
    nbrs[0, 0, 2:5] = chunk[0, 1:4]        # a run of 3
    nbrs[0, 1, 0:5] = chunk[0, 3:8]        # a run of 5 ...
    nbrs[0, 2, :m] = chunk[0]              # ... and the whole chunk, in a neighbour that is masked out
    assert longest_common_run(chunk, nbrs, np.array([[True, True, False]]), pad_id=0).tolist() == [5]
    assert longest_common_run(chunk, nbrs, np.array([[True, True, True]]), pad_id=0).tolist() == [m]
    # padding tokens never match, even where the chunk holds the same id
    padded = np.zeros((1, 1, r), dtype=np.int64)
    assert longest_common_run(np.zeros((1, m), np.int64), padded, np.ones((1, 1), bool), pad_id=0).tolist() == [0]
    assert longest_common_run(np.zeros((1, m), np.int64), padded, np.ones((1, 1), bool), pad_id=-5).tolist() == [m]
    # the byte table adds up to the UTF-8 length of any text (byte-level BPE, multi-byte characters too)
    tok = load_tokenizer(project.tokenizer_path)
    table = token_byte_lengths(tok, 1024)
    for text in ("Ærøskøbing — 東京 and ÷ √ 🙂", "The quick brown fox.\nA second line."):
        assert int(table[tok.encode(text, add_special_tokens=False).ids].sum()) == len(text.encode("utf-8"))
    assert table[int(project.derived()["eod_id"])] == 0


def test_bad_input_is_one_clear_error(project, models, tmp_path):
    with pytest.raises(RetroRayError, match="holds a GPT .* give the RETRO run as --exp-dir"):
        evaluate(project, models["gpt"], None, SMALL, tmp_path)
    with pytest.raises(RetroRayError, match="--baseline .* holds a RETRO model"):
        evaluate(project, models["retro"], models["retro_seed1"], SMALL, tmp_path)
    with pytest.raises(RetroRayError, match="--exp-dir .*nowhere does not exist"):
        evaluate(project, tmp_path / "nowhere", None, SMALL, tmp_path)
    with pytest.raises(RetroRayError, match="chunk_length: --exp-dir .* has chunk_length=32 but the project .* has 64"):
        evaluate(project, models["chunk32"], None, SMALL, tmp_path)
    with pytest.raises(RetroRayError, match="is not a retro-ray project"):
        run_eval(tmp_path, models["retro"], None, SMALL, out_dir=tmp_path, heldout=False, progress=False)
    with pytest.raises(RetroRayError, match=r"ks=\[0\] must be a non-empty list"):
        load_eval_config(None, ["ks=[0]"])
    with pytest.raises(RetroRayError, match="max_samples=0 must be at least 1"):
        load_eval_config(None, ["max_samples=0"])
    with pytest.raises(RetroRayError, match="precision='fp16' is not one of 32, bf16, auto"):
        load_eval_config(None, ["precision=fp16"])
    with pytest.raises(RetroRayError, match="in_context_window=0 must be at least 1"):
        load_eval_config(None, ["in_context_window=0"])
    with pytest.raises(RetroRayError, match="unknown config key nope"):
        load_eval_config(None, ["nope=1"])
    with pytest.raises(RetroRayError, match="alphas=.* must be fractions in"):
        load_eval_config(None, ["alphas=0,1.5"])
    (tmp_path / "eval.yaml").write_text("max_samples: 5\nks: [1, 2]\n")
    cfg = load_eval_config(tmp_path / "eval.yaml", ["batch_size=2"])
    assert (cfg.max_samples, cfg.ks, cfg.batch_size) == (5, (1, 2), 2)
    assert not (tmp_path / "results.json").exists()  # nothing was written by the failed runs


def test_retrofit_against_its_frozen_base_and_a_hugging_face_baseline(project, models, tmp_path):
    """A RETRO-fit before its first update (the GPT's decoder, frozen; CCA outputs zero) is recognised as
    the RETRO-fit of its baseline, and equals it exactly with retrieval on and off. The baseline may be a
    local Hugging Face directory (imported in memory) whose tokenizer must be the project's."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    from retro_ray.model.retro import RetroConfig, RetroModel
    from retro_ray.model.retrofit import retrofit
    from retro_ray.train.export import import_hf, read_export, write_export

    gpt = read_export(models["gpt"])
    payload = read_export(models["retro"])
    config = RetroConfig.from_dict({**payload["config"], "retro": {**payload["config"]["retro"], "freeze_decoder": True}})
    torch.manual_seed(3)
    fit = RetroModel(config)
    retrofit(fit, gpt["state_dict"], freeze=True, source=str(models["gpt"]))
    fit_pt = write_export(tmp_path / "retrofit.pt", config, fit.state_dict(), data=payload["data"],
                          weights_source="test", train_step=5, init_from=str(models["gpt"]))
    cfg = EvalConfig(max_samples=4, batch_size=4, ks=(1, 2))
    r = evaluate(project, fit_pt, models["gpt"], cfg, tmp_path / "fit")
    assert r["retrofit"] == {"init_from": str(models["gpt"]), "frozen": True, "decoder_equals_baseline": True}
    assert r["comparability"] == []  # 5 RETRO-fit steps against a step-0 base: still like for like
    assert r["retro_ppl"] == r["retro_off_ppl"] == r["gpt_ppl"]  # zero CCA: retrieval adds exactly nothing
    assert "Its decoder equals the GPT baseline's bit for bit" in (tmp_path / "fit" / "report.md").read_text()
    other_gpt = _variant(models["retro_seed1"], tmp_path / "gpt_seed1.pt", gpt=True)  # another decoder
    r_other = evaluate(project, fit_pt, other_gpt, cfg, tmp_path / "other")
    assert r_other["retrofit"]["decoder_equals_baseline"] is False and r_other["retro_ppl"] != r_other["gpt_ppl"]
    assert evaluate(project, models["retro"], models["gpt"], cfg, tmp_path / "scratch")["retrofit"] is None

    # A GPT-2 saved by transformers with the project's tokenizer, as --baseline without import-hf.
    vocab = project.derived()["vocab_size"]
    hf = tmp_path / "hf-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=2, n_embd=64, n_head=4,
                               n_positions=project.read_config().seq_length)).save_pretrained(str(hf))
    shutil.copy(project.tokenizer_path, hf / "tokenizer.json")
    r_hf = evaluate(project, models["retro"], hf, cfg, tmp_path / "hf")
    assert r_hf["models"]["gpt"]["weights_source"] == f"huggingface:{hf.resolve()}"
    r_imported = evaluate(project, models["retro"], import_hf(hf, tmp_path / "imported.pt"), cfg, tmp_path / "imp")
    assert r_hf["gpt_ppl"] == r_imported["gpt_ppl"] and r_hf["gpt_ppl"] != r["gpt_ppl"]
    # ... and one whose tokenizer differs is refused, naming the first difference, before anything is written
    tok = json.loads((hf / "tokenizer.json").read_text())
    vocab_map = tok["model"]["vocab"]
    a, b = sorted(vocab_map, key=vocab_map.get)[300:302]
    vocab_map[a], vocab_map[b] = vocab_map[b], vocab_map[a]
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(RetroRayError, match=r"this project's tokenizer is not the one .*hf-gpt2 was trained with: "
                                            r"token id 300 is .* in the project's and .* in the base's"):
        evaluate(project, models["retro"], hf, cfg, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_a_gguf_file_is_a_baseline_and_in_context_base(project, models, tmp_path):
    """A Llama written as a GGUF file (llama.cpp's layout) with the project's tokenizer in its metadata:
    eval --baseline reads it as it is, the same as its import-hf model.pt, In-Context RALM included."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from retro_ray.train.export import import_hf
    from tests.support import write_gguf

    bpe = json.loads(project.tokenizer_path.read_text())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    f = write_gguf(tmp_path / "base.gguf", hf.eval(), tokens, merges)
    cfg = EvalConfig(max_samples=2, ks=(2,))
    r = evaluate(project, models["retro"], f, cfg, tmp_path / "gguf")
    assert r["models"]["gpt"]["weights_source"] == f"gguf:{f.resolve()}"
    assert r["retrieval"]["inference_cost"]["in_context"]["window"] == 512  # the file's context, not seq_length
    pt = import_hf(f, tmp_path / "base.pt", chunk_length=project.read_config().chunk_length)
    r2 = evaluate(project, models["retro"], pt, cfg, tmp_path / "pt")
    assert r["gpt_ppl"] == r2["gpt_ppl"] and r["in_context_ppl"] == r2["in_context_ppl"] != r["gpt_ppl"]
    # a file whose tokenizer (in its metadata) is not the project's is refused, naming the first difference
    swapped = list(tokens)
    swapped[300], swapped[301] = swapped[301], swapped[300]
    other = write_gguf(tmp_path / "other.gguf", hf.eval(), swapped, merges)
    with pytest.raises(RetroRayError, match=r"this project's tokenizer is not the one .*other.gguf was trained with: "
                                            r"token id 300 is .* in the project's and .* in the base's"):
        evaluate(project, models["retro"], other, cfg, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


@pytest.fixture(scope="module")
def trained(project, train_ray_address, tmp_path_factory) -> Path:
    """A real 30-step RETRO run (Ray Train + DeepSpeed, 2 workers) on the project's stage-3 data, validating
    on 8 valid samples (issue 5's real-data training test, and the eval's experiment directory)."""
    from retro_ray.train import trainer
    from retro_ray.train.config import load_train_config

    exp = tmp_path_factory.mktemp("exp")
    cfg = load_train_config("tiny", ["trainer.max_steps=30", "trainer.val_check_interval=15", "trainer.checkpoint_interval=30",
                                     "trainer.num_workers=2",
                                     "trainer.limit_val_batches=1", "trainer.use_gpu=false",
                                     "exp_manager.create_tensorboard_logger=false"])
    trainer.run(cfg, trainer.ProjectDatasetFactory(str(project.root), 2), trainer.project_model_data(project, 4), exp)
    return exp


def test_experiment_directory_and_loss_curves(project, trained, models, tmp_path):
    from retro_ray.train.export import export

    r = evaluate(project, trained, models["gpt"], EvalConfig(max_samples=8, ks=(2,)), tmp_path / "exp")
    history = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [h["train_loss"] for h in history if h["kind"] == "train"]
    vals = [h for h in history if h["kind"] == "val"]
    assert len(losses) == 30 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5  # real data: the loss goes down
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert (Path(json.loads((trained / "train_report.json").read_text())["final_checkpoint"]) / "retro_ray.json").is_file()
    last_val = vals[-1]
    # the training run validated on the same 8 samples with the same neighbours: the same perplexity
    assert last_val["step"] == 30 and r["retro_ppl"] == pytest.approx(last_val["val_ppl"], rel=1e-4)
    assert r["models"]["retro"]["train_step"] == 30 and r["models"]["retro"]["history_records"] == len(history)
    # the baseline has the same decoder but was not trained like RETRO: the report says so
    assert r["comparability"] == ["training steps: RETRO 30, GPT 0"]
    report = (tmp_path / "exp" / "report.md").read_text()
    assert "not a like-for-like comparison: training steps: RETRO 30, GPT 0" in report
    assert (tmp_path / "exp" / "loss_curves.png").stat().st_size > 5000 and "](loss_curves.png)" in report
    # the same run given as an exported model.pt gives the same figures
    pt = export(trained, tmp_path / "model.pt")
    r2 = evaluate(project, pt, models["gpt"], EvalConfig(max_samples=8, ks=(2,)), tmp_path / "pt")
    assert r2["retro_ppl"] == r["retro_ppl"] and r2["bpb_by_alpha"] == r["bpb_by_alpha"]


def test_knowledge_update_end_to_end(project, models, tmp_path):
    """The documents prep held out (data/heldout.jsonl): perplexity with live retrieval before add-docs,
    then after; a rerun (the documents now in the database) gives the same figures. Runs last: it adds
    to the project."""
    with pytest.raises(RetroRayError, match="document 0 has no field 'text'"):
        evaluate(project, models["retro"], None, EvalConfig(max_samples=1), tmp_path / "bad", heldout=[{"title": "x"}])
    held_out = [json.loads(line) for line in project.heldout_path.read_text().splitlines()]
    assert held_out, "prep held no document out; raise corpus.holdout_fraction"
    cfg = EvalConfig(max_samples=2, ks=(2,))
    r = evaluate(project, models["retro"], models["gpt"], cfg, tmp_path / "first", heldout=None)  # None: the project's
    ku = r["knowledge_update"]
    assert ku["source"] == str(project.heldout_path) and ku["documents"] == len(held_out)
    counts = ku["add_docs"]["counts"]
    assert counts["docs_added"] == len(held_out) and counts["docs_skipped_in_corpus"] == 0  # really held out
    n_base = project.derived()["chunks_per_split"]["train"]
    assert ku["database_chunks_before"] == n_base and ku["database_chunks_after"] == n_base + counts["chunks_added"] > n_base
    # before: nothing of the held-out text is retrievable; after: each chunk's text is in a neighbour of
    # the chunk before it (the document's own chunk + continuation)
    assert ku["neighbour_ids_at_or_above_base_before"] == 0 and ku["neighbour_ids_at_or_above_base_after"] > 0
    assert ku["verbatim_chunks_counted"] > 0
    assert ku["verbatim_fraction_before"] == 0.0 and ku["verbatim_fraction_after"] == 1.0
    assert r["knowledge_update_before_ppl"] == ku["before_ppl"] and r["knowledge_update_after_ppl"] == ku["after_ppl"]
    assert ku["before_ppl"] != ku["after_ppl"] and ku["ratio"] == pytest.approx(ku["after_ppl"] / ku["before_ppl"])
    goal = r["goals"]["knowledge_update"]
    assert goal["met"] is (ku["ratio"] <= 0.6)
    # its controls, on the same held-out tokens: the GPT is RETRO's decoder, so the baseline equals retrieval off
    kc = ku["controls"]
    assert kc["base_ppl"] == pytest.approx(ku["retrieval_off_ppl"], rel=1e-9)
    assert kc["other_after_ppl"] not in (None, ku["after_ppl"]) and kc["oracle_ppl"] not in (None, ku["after_ppl"])
    assert kc["after_over_other_after"] == pytest.approx(ku["after_ppl"] / kc["other_after_ppl"])
    assert kc["in_context_before_ppl"] != kc["in_context_after_ppl"] and kc["in_context_after_tokens_per_token"] > 1
    report = (tmp_path / "first" / "report.md").read_text()
    for where, value in _report_numbers(r):
        assert num(value) in report, f"{where}={value} is not in the report as {num(value)}"
    row = next(line for line in report.splitlines() if line.startswith("| held-out perplexity after add-docs"))
    assert row.endswith("| met |" if goal["met"] else "| **not met** |")
    # a rerun, the file named explicitly, into the default <project>/eval: add-docs adds nothing, and both
    # figures are the same as the first time
    again = run_eval(project.root, models["retro"], models["gpt"], cfg, heldout=project.heldout_path, progress=False)
    assert json.loads((project.root / "eval" / "results.json").read_text()) == json.loads(json.dumps(again))
    ku2 = again["knowledge_update"]
    assert ku2["add_docs"]["counts"]["docs_skipped_already_added"] == len(held_out)
    assert ku2["add_docs"]["counts"]["docs_added"] == 0
    assert ku2["before_ppl"] == ku["before_ppl"] and ku2["after_ppl"] == ku["after_ppl"]
    # the validation figures do not depend on the added documents (the saved neighbours are train chunks)
    assert again["retro_ppl"] == r["retro_ppl"]
