"""`retro-ray import-hf`: local Hugging Face directories (tiny random models that transformers itself
saves here) become model.pt files with transformers' logits and greedy generations; bad ones are
refused in one line, with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retro_ray.errors import RetroRayError
from retro_ray.train.export import import_hf, load_exported, read_export
from tests.support import assert_greedy_tokens_equal

V = 96
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def _models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    llama = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256)
    return {
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_layer=2, n_embd=64, n_head=4, n_positions=128)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**llama, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                                                      rope_parameters={"rope_theta": 500000.0, **LLAMA3})),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**llama, num_key_value_heads=2, tie_word_embeddings=True)),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each family saved by save_pretrained (llama in several safetensors shards), with non-default weights."""
    out = {}
    for i, (name, make) in enumerate(_models().items()):
        torch.manual_seed(i)
        hf = make().eval()
        with torch.no_grad():
            for p in hf.parameters():  # biases and norm scales must map too, not only HF's init values
                p.normal_(0.0, 0.2)
        d = tmp_path_factory.mktemp(name)
        hf.save_pretrained(str(d), max_shard_size="40KB" if name == "llama" else "50GB")
        out[name] = (d, hf)
    assert (out["llama"][0] / "model.safetensors.index.json").is_file()  # sharded indeed
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_imported_model_has_transformers_logits_and_greedy_tokens(saved, name, tmp_path):
    d, hf = saved[name]
    out = import_hf(d, tmp_path / "base.pt", chunk_length=16)
    model = load_exported(out)
    payload = read_export(out)
    assert payload["config"]["family"] == name and payload["config"]["retro"]["enabled"] is False
    assert payload["weights_source"] == f"huggingface:{d.resolve()}"
    tokens = torch.randint(0, V, (2, 60), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got = hf(tokens).logits, model(tokens).logits
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    assert_greedy_tokens_equal(hf, model, tokens[:1, :11], 24)


def test_the_checkpoints_tokenizer_is_recorded(saved, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    d, _ = saved["qwen2"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(d))
    data = read_export(import_hf(d, tmp_path / "q.pt", chunk_length=16))["data"]
    assert data["tokenizer_path"] == str((d / "tokenizer.json").resolve())
    assert data["vocab_size"] == 2 and data["eod_id"] == 0


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_directories_are_one_line_and_write_nothing(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "never.pt"
    gpt2, _ = saved["gpt2"]
    cases = []
    cases.append((tmp_path / "nowhere", r"nowhere does not exist; give a local Hugging Face model directory"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "weights.bin").write_bytes(b"")
    cases.append((empty, r"has no config.json \(found: weights.bin\); give the directory save_pretrained wrote"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases.append((bert, r"holds a model of type 'bert'; supported: gpt2 \(GPT2LMHeadModel\), llama "
                        r"\(LlamaForCausalLM\), qwen2 \(Qwen2ForCausalLM\)"))
    noweights = _copy(gpt2, tmp_path / "noweights")
    (noweights / "model.safetensors").unlink()
    cases.append((noweights, r"has no model.safetensors or model.safetensors.index.json"))
    missing = _copy(gpt2, tmp_path / "missing")
    sd = load_file(str(missing / "model.safetensors"))
    sd.pop("transformer.h.1.mlp.c_fc.weight")
    save_file(sd, str(missing / "model.safetensors"), metadata={"format": "pt"})
    cases.append((missing, r"lacks the weight 'h.1.mlp.c_fc.weight' that a gpt2 model of its config has"))
    extra = _copy(gpt2, tmp_path / "extra")
    sd = load_file(str(extra / "model.safetensors"))
    sd["transformer.h.1.adapter.weight"] = torch.zeros(2, 2)
    save_file(sd, str(extra / "model.safetensors"), metadata={"format": "pt"})
    cases.append((extra, r"has a weight 'h.1.adapter.weight' \(and 0 more\) that a gpt2 model of its config does not"))
    corrupt = _copy(gpt2, tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append((corrupt, r"model.safetensors is not a readable safetensors file \(.*\); copy it again"))
    for directory, match in cases:
        with pytest.raises(RetroRayError, match=match):
            import_hf(directory, out)
        assert not out.exists()
    with pytest.raises(RetroRayError, match=r"seq_length=256 .* max_position_embeddings=128"):
        import_hf(gpt2, out, chunk_length=16, seq_length=256)
    assert not out.exists()


def test_cli(saved, tmp_path):
    d, _ = saved["llama"]
    run = [sys.executable, "-m", "retro_ray.cli", "import-hf", str(d), "--out", str(tmp_path / "m.pt")]
    r = subprocess.run([*run, "chunk_length=16", "seq_length=128"], capture_output=True, text=True)
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr
    assert read_export(tmp_path / "m.pt")["config"]["seq_length"] == 128
    r = subprocess.run([*run, "num_layers=4"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == ("retro-ray: error: import-hf takes only chunk_length, seq_length, not num_layers: the "
                                "rest of the shape comes from the checkpoint's config.json")
