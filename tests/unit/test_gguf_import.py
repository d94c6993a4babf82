"""GGUF files: tiny random Llama (GQA) and Qwen2 models written here with ``gguf.GGUFWriter`` the way
llama.cpp's converter lays them out (llama.cpp's tensor names, q/k rows permuted for Llama, a BPE
tokenizer and a chat template in the metadata), in float32 and quantised. ``import-hf`` must give
transformers' own GGUF load to 1e-5 and the same greedy tokens through our KV cache; bad files are
one line each, with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from retro_ray.errors import RetroRayError
from retro_ray.train.export import import_hf, load_exported, read_base, read_export
from tests.support import GGUF_TEMPLATE as TEMPLATE
from tests.support import assert_greedy_tokens_equal, write_gguf

Q = gguf.GGMLQuantizationType


def _bpe(texts: list[str]):
    """A byte-level BPE of ~300 tokens (ids 0-2 special), as llama.cpp's 'gpt2' tokenizer stores one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tok, tokens, merges


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok, tokens, merges = _bpe(["The capital of France is Paris. " * 3, "retrieval reads its neighbours " * 3,
                                "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9"])
    shape = dict(vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, make, qtype in (
        ("llama_f32", lambda: LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=2, tie_word_embeddings=False,
                                                           rope_parameters={"rope_theta": 10000.0})), Q.F32),
        ("llama_q8_0", lambda: LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=2, tie_word_embeddings=True,
                                                            rope_parameters={"rope_theta": 50000.0})), Q.Q8_0),
        ("qwen2_q4_0", lambda: Qwen2ForCausalLM(Qwen2Config(**shape, num_key_value_heads=2, tie_word_embeddings=True,
                                                            rope_parameters={"rope_theta": 10000.0})), Q.Q4_0),
        ("qwen2_f16", lambda: Qwen2ForCausalLM(Qwen2Config(**shape, num_key_value_heads=4, tie_word_embeddings=False,
                                                           rope_parameters={"rope_theta": 10000.0})), Q.F16),
        ("llama_bf16", lambda: LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=1, tie_word_embeddings=True,
                                                            rope_parameters={"rope_theta": 10000.0})), Q.BF16),
        # 1,024 positions: transformers' own GGUF reader leaves GPT2Config.n_positions at its default (our
        # import reads the file's context_length); the reference must load the file too.
        ("gpt2_q8_0", lambda: GPT2LMHeadModel(GPT2Config(vocab_size=len(tokens), n_embd=64, n_layer=2, n_head=4,
                                                          n_positions=1024)), Q.Q8_0),
    ):
        torch.manual_seed(len(out))
        hf = make().eval()
        with torch.no_grad():
            for p in hf.parameters():  # biases and norm scales must map too, not only HF's init values
                p.normal_(0.0, 0.2)
        out[name] = write_gguf(d / f"{name}.gguf", hf, tokens, merges, qtype)
        assert qtype in {t.tensor_type for t in gguf.GGUFReader(str(out[name])).tensors}  # the type under test
    return out


def _transformers(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", ["llama_f32", "llama_q8_0", "qwen2_q4_0", "qwen2_f16", "llama_bf16", "gpt2_q8_0"])
def test_gguf_import_has_transformers_logits_and_greedy_tokens(files, name, tmp_path):
    f = files[name]
    out = import_hf(f, tmp_path / "base.pt", chunk_length=16)
    payload = read_export(out)
    assert payload["config"]["family"] == name.split("_")[0] and payload["weights_source"] == f"gguf:{f.resolve()}"
    assert payload["config"]["num_key_value_heads"] == {"gpt2_q8_0": None, "qwen2_f16": 4, "llama_bf16": 1}.get(name, 2)
    model, hf = load_exported(out), _transformers(f)
    tokens = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = hf(tokens).logits, model(tokens).logits
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    assert_greedy_tokens_equal(hf, model, tokens[:1, :9], 20)


def test_gguf_tokenizer_is_written_as_a_hugging_face_directory(files, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    f = files["llama_f32"]
    out = import_hf(f, tmp_path / "smol.pt", chunk_length=16)
    data = read_export(out)["data"]
    tok_dir = tmp_path / "smol-tokenizer"
    assert data["tokenizer_path"] == str((tok_dir / "tokenizer.json").resolve())
    assert data["vocab_size"] == 300 and data["eod_id"] == 2 and data["chat_template"] == TEMPLATE
    ref = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    ours = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    text = "The capital of France is Paris, and retrieval reads its neighbours."
    assert ours.encode(text).ids == ref(text)["input_ids"] and len(ours.encode(text).ids) < len(text)
    again = AutoTokenizer.from_pretrained(str(tok_dir))
    assert again.eos_token == "<|im_end|>" and again.chat_template == TEMPLATE
    assert again.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    # A project prepared with it records the end-of-text token the checkpoint declares.
    from retro_ray.config import TokenizerConfig
    from retro_ray.tokenizer import load_user_tokenizer, resolve_eod_token

    cfg = TokenizerConfig(path=str(tok_dir))
    assert resolve_eod_token(cfg) == "<|im_end|>" and load_user_tokenizer(str(tok_dir), cfg).get_vocab_size() == 300
    # --tokenizer-dir puts it elsewhere; a Hugging Face directory has its own and refuses the flag.
    import_hf(f, tmp_path / "b.pt", tokenizer_dir=tmp_path / "elsewhere", chunk_length=16)
    assert (tmp_path / "elsewhere" / "tokenizer.json").is_file()
    cfg2, sd, data2 = read_base(f, chunk_length=16)
    assert cfg2.family == "llama" and data2["vocab_size"] == 300 and "tokenizer_path" not in data2 and sd


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 3])
    return dst


def _other_arch(dst: Path) -> Path:
    w = gguf.GGUFWriter(str(dst), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _undequantisable(src: Path, dst: Path) -> Path:
    """``src`` with its first 2-D tensor stored as Q8_K (which the gguf library cannot dequantise)."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "llama")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    swapped = False
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        if not swapped and len(shape) == 2:
            block, size = gguf.GGML_QUANT_SIZES[Q.Q8_K]
            raw = np.zeros((shape[0], shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(t.name, raw, raw_dtype=Q.Q8_K)
            swapped = True
        else:
            w.add_tensor(t.name, np.array(t.data).reshape(shape), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_bad_gguf_files_are_one_line_and_write_nothing(files, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    # A tensor type gguf cannot dequantise needs rows of 256 (Q8_K's block): a model that wide.
    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    _, tokens, merges = _bpe(["abc " * 10])
    wide_file = write_gguf(tmp_path / "wide.gguf", wide.eval(), (tokens + [f"<x{i}>" for i in range(300)])[:300], merges)
    cases = [
        (_truncated(files["llama_f32"], tmp_path / "cut.gguf"), r"cut.gguf is not a readable GGUF file \(.*\); it may "
                                                                r"be truncated: copy or download it again"),
        (_other_arch(tmp_path / "phi.gguf"), r"phi.gguf holds a GGUF model of architecture 'phi3', which does not map "
                                             r"onto a retro-ray family; supported: llama, qwen2, gpt2"),
        (_undequantisable(wide_file, tmp_path / "q8k.gguf"), r"q8k.gguf has tensors quantised as Q8_K, which the gguf "
                                                            r"library cannot dequantise; use a file quantised as F32"),
        (tmp_path / "absent.gguf", r"absent.gguf does not exist; give a .gguf file"),
    ]
    out = tmp_path / "never.pt"
    for path, match in cases:
        with pytest.raises(RetroRayError, match=match):
            import_hf(path, out, tokenizer_dir=tmp_path / "never-tok")
        assert not out.exists() and not (tmp_path / "never-tok").exists()


def test_cli_imports_a_gguf_file(files, tmp_path):
    f = files["qwen2_q4_0"]
    run = [sys.executable, "-m", "retro_ray.cli", "import-hf", str(f), "--out", str(tmp_path / "m.pt"), "chunk_length=16"]
    r = subprocess.run(run, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"its tokenizer: {tmp_path / 'm-tokenizer'}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "retro_ray.cli", "import-hf", str(tmp_path / "m-tokenizer"), "--out",
                        str(tmp_path / "x.pt"), "--tokenizer-dir", str(tmp_path / "t")], capture_output=True, text=True)
    assert r.returncode == 2 and "has no config.json" in r.stderr and not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quants_are_dequantised_as_transformers_does(qtype, tmp_path):
    """Random k-quant blocks (gguf-py writes none): our import of the file equals transformers' own load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokens, merges = _bpe(["abc def ghi " * 10])
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokens), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    f = write_gguf(tmp_path / f"{qtype}.gguf", hf.eval(), tokens, merges, Q[qtype])
    assert Q[qtype] in {t.tensor_type for t in gguf.GGUFReader(str(f)).tensors}
    model, ref = load_exported(import_hf(f, tmp_path / "k.pt", chunk_length=16)), _transformers(f)
    x = torch.randint(0, len(tokens), (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x).logits
        assert torch.isfinite(want).all() and want.std() > 0
        torch.testing.assert_close(model(x).logits, want, rtol=0, atol=1e-5)


def test_a_gpt2_file_keeps_its_own_context_length(tmp_path):
    """transformers reads a GPT-2 file's context_length into a name GPT2Config ignores (so its own load
    of a 128-position file fails); ours reads it, and equals the model the file was written from."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokens, merges = _bpe(["abc def ghi " * 10])
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokens), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                    n_inner=96)).eval()
    f = write_gguf(tmp_path / "g.gguf", hf, tokens, merges)
    model = load_exported(import_hf(f, tmp_path / "g.pt", chunk_length=16))
    assert model.config.max_position_embeddings == 128 and model.config.ffn_hidden_size == 96
    x = torch.randint(0, len(tokens), (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, rtol=0, atol=1e-5)
