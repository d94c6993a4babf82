"""Benchmark of generation: KV-cache decoding against full recomputation, and against HF GPT-2.

What is measured (one process, one thread unless --threads, same prompt for every side)
    cache       ``Generator.generate``: prefill the prompt, then one token per step against the
                self-attention KV cache; neighbours (given, 2 of them) encoded once.
    recompute   ``Generator.generate(recompute=True)``: the whole sequence from scratch for every
                token, with the same neighbours (the equality of the two is a unit test).
    ours-gpt    the same Generator with retro.enabled=false (our decoder alone, with the cache).
    hf-gpt2     ``transformers`` GPT2LMHeadModel of the same decoder size (layers, width, heads, MLP,
                vocabulary), random weights, ``generate(do_sample=False, use_cache=True)``.
    ours-llama  the Generator on a LlamaForCausalLM of the same size (8 heads, 4 key/value heads)
                imported exactly by model/hf.py, against
    hf-llama    that LlamaForCausalLM's own ``generate`` with cache (issue 16's goal: <= 1.2x).
Per-token decode time is (time for P + N tokens − time for P + 1 tokens) / (N − 1): the prompt's
prefill cancels out, so the figure is the cost of one decode step at context P..P+N (default
448 + 64 = 512 tokens of context at the end). Median of --repeats runs.

Model: the decoder of ``train_demo.yaml`` (6 layers, d=256, 8 heads, MLP 1024, CCA in layers 3 and 6,
2 neighbours of 128 tokens, chunk 64, vocabulary 8192), fp32, random weights.
Goals (issue 6): cache ≥ 5× faster than recompute; RETRO with cache ≤ 1.3× HF GPT-2's per-token time.

With --against DIR (another checkout, e.g. ``git worktree add /tmp/base <commit>``) only the cache
decode is timed, of this checkout's Generator and of DIR's, in one process, with the same weights,
alternating A/B --repeats times: a before/after comparison that a busy machine's load shifts alike.
The figure per side is the median per-token time; the ratio is the median of the paired ratios.

Run:  .venv/bin/python benchmarks/bench_generate.py [--prompt-tokens 448] [--new-tokens 64] [--repeats 3]
      .venv/bin/python benchmarks/bench_generate.py --against /tmp/base --repeats 15
Writes benchmarks/results/bench_generate.json (--against: bench_generate_against.json), or --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch
from benchlib import timed


def demo_config(retro: bool):
    from retro_ray.config import load_yaml, shipped_config_dir
    from retro_ray.model.retro import RetroConfig

    model = dict(load_yaml(shipped_config_dir() / "train_demo.yaml")["model"])
    for key in ("micro_batch_size", "global_batch_size", "optim", "data"):
        model.pop(key, None)
    model.update(vocab_size=8192, seq_length=512, chunk_length=64, hidden_dropout=0.0, attention_dropout=0.0,
                 ffn_dropout=0.0)
    model["retro"] = {**model["retro"], "enabled": retro, "retro_encoder_hidden_dropout": 0.0,
                      "retro_encoder_attention_dropout": 0.0}
    return RetroConfig.from_dict(model)


def train_tokenizer_on_corpus(vocab: int):
    from itertools import islice

    from retro_ray.config import CorpusConfig, TokenizerConfig
    from retro_ray.corpus import IngestStats, iter_raw_documents
    from retro_ray.tokenizer import train_tokenizer

    texts = [t for _, t in islice(iter_raw_documents(CorpusConfig(), IngestStats()), 3000)]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=vocab), progress=False), texts


def import_other_checkout(root: Path):
    """The retro_ray.model.retro and retro_ray.serve.generate modules of the checkout at root,
    imported beside this checkout's.

    Its modules are imported first, as retro_ray, then moved aside in sys.modules, so the names
    they bound at import time keep pointing at their own package (generation imports nothing lazily).
    """
    import importlib
    import sys

    def ours(name: str) -> bool:
        return name == "retro_ray" or name.startswith("retro_ray.")

    mine = {k: sys.modules.pop(k) for k in list(sys.modules) if ours(k)}
    sys.path.insert(0, str(root))
    try:
        model_mod = importlib.import_module("retro_ray.model.retro")
        gen_mod = importlib.import_module("retro_ray.serve.generate")
        assert Path(model_mod.__file__).resolve().is_relative_to(root.resolve()), model_mod.__file__
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if ours(k)]:
            sys.modules["_other_" + k] = sys.modules.pop(k)
        sys.modules.update(mine)
    return model_mod, gen_mod


def against(args, tok, eod: int, prompt: str, neighbors: list[str]) -> None:
    """Cache decode of this checkout (A) against args.against's (B), interleaved; see the module docstring."""
    from retro_ray.model import retro as model_a
    from retro_ray.serve import generate as gen_a

    model_b, gen_b = import_other_checkout(Path(args.against))
    a = model_a.RetroModel(demo_config(True))
    with torch.no_grad():
        a.token_embedding.weight[eod] = 0.0  # never stop early at the end-of-document token
    # The other checkout may predate some settings: give it only the ones it knows (they are at their defaults).
    known = {f.name for f in dataclasses.fields(model_b.RetroConfig)}
    b = model_b.RetroModel(model_b.RetroConfig.from_dict({k: v for k, v in a.config.to_dict().items() if k in known}))
    b.load_state_dict(a.state_dict())  # same weights, same parameter names
    sides = {"A": (gen_a, gen_a.Generator(a, tok, eod)), "B": (gen_b, gen_b.Generator(b, tok, eod))}
    N = args.new_tokens

    def run(side: str, n: int) -> tuple[float, list[int]]:
        mod, gen = sides[side]
        request = mod.GenerationRequest(prompt, neighbors, mod.InferenceConfig(tokens_to_generate=n, greedy=True))
        t0 = time.perf_counter()
        out = gen.generate([request])[0]
        elapsed = time.perf_counter() - t0
        assert len(out.tokens) == n, (len(out.tokens), out.finish_reason)
        return elapsed, out.tokens

    assert run("A", N)[1] == run("B", N)[1], "the two checkouts generate different tokens"  # also the warm-up
    per: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(args.repeats):
        for side in ("AB" if i % 2 == 0 else "BA"):  # alternate the order too
            full, one = run(side, N)[0], run(side, 1)[0]
            per[side].append(1000 * (full - one) / (N - 1))
    ratios = [x / y for x, y in zip(per["A"], per["B"])]
    summary = {"against": str(args.against), "repeats": args.repeats, "new_tokens": N, "prompt_tokens": len(tok.encode(prompt).ids),
               "threads": args.threads, "load_average": os.getloadavg(),
               "this_ms_per_token": per["A"], "against_ms_per_token": per["B"],
               "this_median": statistics.median(per["A"]), "against_median": statistics.median(per["B"]),
               "median_paired_ratio": statistics.median(ratios)}
    print(f"this checkout: {summary['this_median']:.2f} ms/token, {args.against}: {summary['against_median']:.2f} "
          f"ms/token (medians of {args.repeats}); paired ratio this/against: {summary['median_paired_ratio']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=448)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--against", default=None, help="another checkout's root: time its cache decode against this one's")
    ap.add_argument("--out", default=None, help="default results/bench_generate.json (--against: bench_generate_against.json)")
    args = ap.parse_args()
    if args.out is None:
        name = "bench_generate_against.json" if args.against else "bench_generate.json"
        args.out = str(Path(__file__).parent / "results" / name)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import GPT2Config, GPT2LMHeadModel

    from retro_ray.model.retro import RetroModel
    from retro_ray.serve.generate import GenerationRequest, Generator, InferenceConfig

    tok, texts = train_tokenizer_on_corpus(8192)
    eod = tok.token_to_id("<|endoftext|>")
    ids = [i for t in texts for i in tok.encode(t).ids][: args.prompt_tokens]
    prompt = tok.decode(ids)
    P = len(tok.encode(prompt).ids)
    neighbors = [texts[-1][:600], texts[-2][:600]]
    N = args.new_tokens
    if args.against:
        return against(args, tok, eod, prompt, neighbors)

    def ours(gen: Generator, n: int, recompute: bool = False, nbrs=None):
        cfg = InferenceConfig(tokens_to_generate=n, greedy=True)
        out = gen.generate([GenerationRequest(prompt, nbrs, cfg)], recompute=recompute)[0]
        assert len(out.tokens) == n, (len(out.tokens), out.finish_reason)

    retro = Generator(RetroModel(demo_config(True)), tok, eod)
    gpt = Generator(RetroModel(demo_config(False)), tok, eod)
    # never stop early at the end-of-document token: the timings must cover N tokens
    for g in (retro, gpt):
        with torch.no_grad():
            g.model.token_embedding.weight[eod] = 0.0

    results = {}

    def per_token(name: str, fn_n, n_full: int) -> None:
        fn_n(2)  # warm-up
        full, one = timed(lambda: fn_n(n_full), args.repeats), timed(lambda: fn_n(1), args.repeats)
        results[name] = {"ms_per_token": 1000 * (full - one) / (n_full - 1), "total_s": full, "prefill_s": one}
        print(f"{name:>10}: {results[name]['ms_per_token']:.2f} ms/token (prefill {1000 * one:.0f} ms)", flush=True)

    per_token("cache", lambda n: ours(retro, n, nbrs=neighbors), N)
    per_token("recompute", lambda n: ours(retro, n, True, nbrs=neighbors), N)
    per_token("ours-gpt", lambda n: ours(gpt, n), N)

    c = demo_config(False)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=1024, n_embd=c.hidden_size, n_layer=c.num_layers,
                                    n_head=c.num_attention_heads, n_inner=c.ffn_hidden_size, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eod, eos_token_id=eod)).eval()
    input_ids = torch.tensor([tok.encode(prompt).ids])

    def hf_gen(n: int) -> None:
        with torch.inference_mode():
            out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=True, pad_token_id=eod, eos_token_id=None)
        assert out.shape[1] == P + n

    per_token("hf-gpt2", hf_gen, N)

    # A Llama-family decoder of the demo's size (GQA 8/4 heads), random weights, imported exactly from
    # transformers' LlamaForCausalLM (model/hf.py): our Generator against transformers' generate.
    from transformers import LlamaConfig, LlamaForCausalLM

    from retro_ray.model.hf import config_from_hf, state_dict_from_hf

    hf_llama = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                            intermediate_size=c.ffn_hidden_size, num_hidden_layers=c.num_layers,
                                            num_attention_heads=c.num_attention_heads, num_key_value_heads=4,
                                            max_position_embeddings=1024, bos_token_id=eod, eos_token_id=eod)).eval()
    llama_cfg = config_from_hf(hf_llama.config, chunk_length=c.chunk_length, seq_length=c.seq_length)
    imported = RetroModel(llama_cfg)
    imported.load_state_dict(state_dict_from_hf(hf_llama.state_dict(), llama_cfg))
    llama_gen = Generator(imported, tok, eod)

    def ours_llama(n: int) -> None:
        cfg = InferenceConfig(tokens_to_generate=n, greedy=True, min_tokens_to_generate=n)
        assert len(llama_gen.generate([GenerationRequest(prompt, None, cfg)])[0].tokens) == n

    def hf_llama_gen(n: int) -> None:
        with torch.inference_mode():
            out = hf_llama.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=eod,
                                    eos_token_id=None)
        assert out.shape[1] == P + n

    per_token("ours-llama", ours_llama, N)
    per_token("hf-llama", hf_llama_gen, N)

    cache, rec, hfg = (results[k]["ms_per_token"] for k in ("cache", "recompute", "hf-gpt2"))
    summary = {
        "prompt_tokens": P, "new_tokens": N, "context_at_end": P + N, "threads": args.threads,
        "load_average": os.getloadavg(), "results": results,
        "cache_speedup_vs_recompute": rec / cache, "retro_cache_vs_hf_gpt2": cache / hfg,
        "ours_gpt_vs_hf_gpt2": results["ours-gpt"]["ms_per_token"] / hfg,
        "imported_llama_vs_hf_llama": results["ours-llama"]["ms_per_token"] / results["hf-llama"]["ms_per_token"],
    }
    print(f"KV cache vs full recomputation: {rec / cache:.1f}x faster (goal >= 5x)")
    print(f"RETRO (cache) per token vs HF GPT-2 generate: {cache / hfg:.2f}x (goal <= 1.3x); "
          f"our GPT vs HF GPT-2: {summary['ours_gpt_vs_hf_gpt2']:.2f}x")
    print(f"imported Llama (Generator) per token vs HF LlamaForCausalLM generate: "
          f"{summary['imported_llama_vs_hf_llama']:.2f}x (goal <= 1.2x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
