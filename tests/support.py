"""Helpers shared by test modules and benchmarks (a plain module: test modules import from here, never
from one another or from a conftest): a small real project (the whole data pipeline through the CLI),
an exported model with random weights that fits it, JSON-lines files, and the Grafana dashboard's
metric names. Real files, a real Ray cluster."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from retro_ray.project import Project

REPO = Path(__file__).resolve().parents[1]

SMALL_PIPELINE = ["tokenizer.vocab_size=1024", "split=90,10,0", "seq_length=256", "chunk_length=64",
                  "query.num_neighbors_query=20", "query.num_neighbors_save=4", "query.train_samples=60",
                  "index.num_shards=2"]
SMALL_DOCS = 150  # the small project's corpus: the first 150 documents of the bundled default corpus


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


# The Grafana dashboard (tests/unit/test_dashboards.py; tests/integration/test_jobs.py scrapes the same names)
DASHBOARD = REPO / "dashboards" / "retro_ray.json"

# PromQL words that are not metric names
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
             "unless", "inf", "nan"}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (identifiers that are not functions, keywords or labels)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range / subquery durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    names = set()
    for m in _IDENT.finditer(expr):
        word = m.group(0)
        rest = expr[m.end():].lstrip()
        if rest.startswith("("):  # a function call
            continue
        if word.lower() in _KEYWORDS or re.fullmatch(r"\d+(\.\d+)?", word):
            continue
        names.add(word)
    return names


def dashboard_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def dashboard_metric_names(path: Path = DASHBOARD) -> set[str]:
    """Every metric name any panel of the dashboard queries."""
    dash = json.loads(path.read_text())
    names = set()
    for p in dashboard_panels(dash):
        for t in p.get("targets", []):
            names |= promql_metric_names(t["expr"])
    return names


def build_small_project(root: Path, docs: list[tuple[str, str]], ray_address: str | None, *extra: str) -> Project:
    """`retro-ray pipeline` (SMALL_PIPELINE, then ``extra``) on (title, text) docs into root/proj, the
    corpus in root/corpus.jsonl; returns the finished Project.

    On the Ray cluster at ``ray_address``; with None the CLI starts a local cluster of its own for the
    run (as it does for a user who gives no address). The session's shared build is the
    ``small_project`` fixture (tests/integration/conftest.py); a module that uses it copies it first
    (copy_project).
    """
    corpus = write_jsonl(root / "corpus.jsonl", [{"title": t, "text": x} for t, x in docs])
    cmd = [sys.executable, "-m", "retro_ray.cli", "pipeline", "--project-dir", str(root / "proj"), "--no-progress",
           f"corpus.path={corpus}", *SMALL_PIPELINE, *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return Project(root / "proj")


def copy_project(project: Project, root: Path) -> Project:
    """A copy of a finished project in root/proj, for a module to use (and change) as its own."""
    shutil.copytree(project.root, root / "proj")
    return Project(root / "proj")


def write_random_export(path: Path, project: Project, *, retro: bool = True, seed: int = 0, **model) -> Path:
    """A model.pt (the `retro-ray export` format) with random weights, sized for the project."""
    import torch

    from retro_ray.model.retro import RetroConfig, RetroModel
    from retro_ray.train.export import EXPORT_FORMAT, EXPORT_VERSION
    from retro_ray.train.trainer import project_model_data

    cfg = project.read_config()
    data = project_model_data(project, num_neighbors_available=4)
    vocab = -(-data["vocab_size"] // 128) * 128
    base = RetroConfig.tiny(vocab_size=vocab, seq_length=cfg.seq_length, chunk_length=cfg.chunk_length)
    d = base.to_dict()
    d.update(model)
    d["retro"] = {**d["retro"], "enabled": retro}
    config = RetroConfig.from_dict(d)
    torch.manual_seed(seed)
    m = RetroModel(config)
    payload = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "config": config.to_dict(),
               "state_dict": m.state_dict(), "train_step": 0, "data": data, "weights_source": "random init (test)",
               "checkpoint": ""}
    buf = io.BytesIO()
    torch.save(payload, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


GGUF_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _permute(w, heads: int):
    """llama.cpp's row order for Llama's q/k projections (pairs of rotary halves interleaved per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, hf, tokens: list[str], merges: list[str], qtype=None) -> Path:
    """``hf`` (LlamaForCausalLM, Qwen2ForCausalLM or GPT2LMHeadModel) as a GGUF file in llama.cpp's layout
    (its tensor names, Llama's q/k rows permuted, GPT-2's Conv1D weights as [out, in], a BPE tokenizer with
    end-of-text id 2 and a chat template in the metadata); 2-D weights in ``qtype`` (a
    gguf.GGMLQuantizationType; default F32)."""
    import gguf

    qtype = qtype or gguf.GGMLQuantizationType.F32
    c = hf.config
    arch = c.model_type
    w = gguf.GGUFWriter(str(path), arch)
    if arch == "gpt2":
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(GGUF_TEMPLATE)

    def put(name: str, t) -> None:
        a = t.detach().float().numpy().copy()
        if a.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, a)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype("float16"))
        elif qtype.name in K_QUANT_SCALE:  # gguf-py cannot quantise k-quants: random blocks, sane scales
            w.add_tensor(name, random_k_quant(a.shape, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    for name, t in _gguf_tensors(hf):
        put(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# Where a k-quant block keeps its float16 scale(s) (byte offsets), per llama.cpp's block layouts.
K_QUANT_SCALE = {"Q4_K": (0, 2), "Q6_K": (208,)}


def random_k_quant(shape: tuple[int, int], qtype, seed: int = 0):
    """uint8 [rows, bytes]: random k-quant blocks for a [rows, cols] tensor (cols a multiple of 256), their
    float16 super-block scales set to 0.01 so that the dequantised values are finite and small."""
    import gguf
    import numpy as np

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in K_QUANT_SCALE[qtype.name]:
        raw[:, :, at:at + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def _gguf_tensors(hf):
    """(llama.cpp name, tensor) of every weight of ``hf``, in llama.cpp's layout."""
    import torch

    c, sd, arch = hf.config, hf.state_dict(), hf.config.model_type
    if arch == "gpt2":
        yield "token_embd.weight", sd["transformer.wte.weight"]
        yield "position_embd.weight", sd["transformer.wpe.weight"]
        for i in range(c.n_layer):
            p, b = f"transformer.h.{i}.", f"blk.{i}."
            for ours, theirs in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
                yield b + theirs + ".weight", sd[p + ours + ".weight"]
                yield b + theirs + ".bias", sd[p + ours + ".bias"]
            for ours, theirs in (("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"), ("mlp.c_fc", "ffn_up"),
                                 ("mlp.c_proj", "ffn_down")):
                yield b + theirs + ".weight", sd[p + ours + ".weight"].t()  # Conv1D keeps [in, out]
                yield b + theirs + ".bias", sd[p + ours + ".bias"]
        yield "output_norm.weight", sd["transformer.ln_f.weight"]
        yield "output_norm.bias", sd["transformer.ln_f.bias"]
        return
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q = torch.from_numpy(_permute(q.numpy(), c.num_attention_heads))
            k = torch.from_numpy(_permute(k.numpy(), c.num_key_value_heads))
        yield from ((b + name + ".weight", t) for name, t in (
            ("attn_norm", sd[p + "input_layernorm.weight"]), ("attn_q", q), ("attn_k", k),
            ("attn_v", sd[p + "self_attn.v_proj.weight"]), ("attn_output", sd[p + "self_attn.o_proj.weight"]),
            ("ffn_norm", sd[p + "post_attention_layernorm.weight"]), ("ffn_gate", sd[p + "mlp.gate_proj.weight"]),
            ("ffn_up", sd[p + "mlp.up_proj.weight"]), ("ffn_down", sd[p + "mlp.down_proj.weight"])))
        if arch == "qwen2":
            yield from ((b + f"attn_{x}.bias", sd[p + f"self_attn.{x}_proj.bias"]) for x in "qkv")
    yield "output_norm.weight", sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        yield "output.weight", sd["lm_head.weight"]


def assert_greedy_tokens_equal(hf, model, prompt, n: int) -> None:
    """``model`` (ours, through its KV cache: a prefill, then one token a step) generates greedily the
    ``n`` tokens transformers' ``hf.generate`` does after ``prompt`` [1, P]."""
    import torch

    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
        cache = model.new_cache(1, prompt.shape[1] + n)
        logits = model(prompt, cache=cache, positions=0, logits_to_keep=1).logits[:, -1]
        ours = []
        for pos in range(prompt.shape[1], prompt.shape[1] + n):
            t = logits.argmax(-1)
            ours.append(int(t))
            logits = model(t[:, None], cache=cache, positions=pos, logits_to_keep=1).logits[:, -1]
    assert ours == ref
