import json

import pytest

from retro_ray.config import TokenizerConfig
from retro_ray.errors import RetroRayError
from retro_ray.tokenizer import load_user_tokenizer, train_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text, emoji 🙂 and CJK 漢字 survive byte-level BPE.",
    "Numbers 1234567890 and code: def f(x): return x ** 2",
] * 30


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(TEXTS), TokenizerConfig(vocab_size=400, min_frequency=1), progress=False)


def test_trained_tokenizer_is_lossless(tok):
    for t in TEXTS[:3] + ["unseen wörds ☃ at all"]:
        ids = tok.encode(t, add_special_tokens=False).ids
        assert tok.decode(ids) == t
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.get_vocab_size() <= 400


def test_load_tokenizer_json_and_gpt2_files(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_user_tokenizer(str(tmp_path / "tokenizer.json"), TokenizerConfig())
    assert loaded.encode(TEXTS[1]).ids == tok.encode(TEXTS[1]).ids
    # GPT-2 layout: vocab.json + merges.txt
    gdir = tmp_path / "gpt2"
    gdir.mkdir()
    tok.model.save(str(gdir))
    assert (gdir / "vocab.json").is_file() and (gdir / "merges.txt").is_file()
    for path in (gdir, gdir / "vocab.json"):
        g = load_user_tokenizer(str(path), TokenizerConfig())
        assert g.decode(g.encode(TEXTS[1], add_special_tokens=False).ids) == TEXTS[1]
        assert g.encode(TEXTS[0]).ids == tok.encode(TEXTS[0]).ids


def test_missing_eod_token_is_added(tok, tmp_path):
    gdir = tmp_path / "g"
    gdir.mkdir()
    tok.model.save(str(gdir))
    vocab = json.loads((gdir / "vocab.json").read_text())
    del vocab["<|endoftext|>"]
    (gdir / "vocab.json").write_text(json.dumps(vocab))
    g = load_user_tokenizer(str(gdir), TokenizerConfig(eod_token="<|eod|>"))
    assert g.token_to_id("<|eod|>") is not None


def test_bad_tokenizer_files(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(RetroRayError, match="does not load"):
        load_user_tokenizer(str(bad), TokenizerConfig())
    with pytest.raises(RetroRayError, match="does not exist"):
        load_user_tokenizer(str(tmp_path / "nope.json"), TokenizerConfig())
    (tmp_path / "d").mkdir()
    with pytest.raises(RetroRayError, match="neither tokenizer.json nor vocab.json"):
        load_user_tokenizer(str(tmp_path / "d"), TokenizerConfig())
    v = tmp_path / "v"
    v.mkdir()
    (v / "vocab.json").write_text("{}")
    with pytest.raises(RetroRayError, match="merges.txt is missing"):
        load_user_tokenizer(str(v / "vocab.json"), TokenizerConfig())


def _save_checkpoint_tokenizer(tok, directory, **special) -> None:
    """A model directory's tokenizer files, written by transformers itself (as save_pretrained does)."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(str(directory))


@pytest.fixture(scope="module")
def llama3_style(tmp_path_factory):
    """Byte-level BPE with Llama-3's special tokens, end-of-text last, as its tokenizer.json has them."""
    from tokenizers import Tokenizer

    t = Tokenizer.from_str(train_tokenizer(iter(TEXTS), TokenizerConfig(vocab_size=400, min_frequency=1,
                                                                         eod_token="<|reserved|>"),
                                           progress=False).to_str())
    t.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    d = tmp_path_factory.mktemp("llama3")
    _save_checkpoint_tokenizer(t, d, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    return d


def test_a_checkpoints_end_of_text_token_ends_documents(llama3_style, tok, tmp_path):
    from retro_ray.tokenizer import checkpoint_eos_token, resolve_eod_token

    assert checkpoint_eos_token(llama3_style) == "<|end_of_text|>"
    cfg = TokenizerConfig(path=str(llama3_style))
    assert resolve_eod_token(cfg) == "<|end_of_text|>"
    loaded = load_user_tokenizer(cfg.path, cfg)
    from tokenizers import Tokenizer

    assert loaded.get_vocab_size() == Tokenizer.from_file(str(llama3_style / "tokenizer.json")).get_vocab_size()
    assert resolve_eod_token(TokenizerConfig(path=str(llama3_style / "tokenizer.json"))) == "<|end_of_text|>"
    # only config.json's eos_token_id (GPT-2 checkpoints name it there too)
    g = tmp_path / "gpt2"
    g.mkdir()
    tok.save(str(g / "tokenizer.json"))
    (g / "config.json").write_text(json.dumps({"model_type": "gpt2", "eos_token_id": [0, 5]}))
    assert checkpoint_eos_token(g) == "<|endoftext|>"
    # no checkpoint: the default; an explicit token wins over the checkpoint's
    assert resolve_eod_token(TokenizerConfig()) == "<|endoftext|>"
    assert resolve_eod_token(TokenizerConfig(path=str(llama3_style), eod_token="<|begin_of_text|>")) == "<|begin_of_text|>"
    (g / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(RetroRayError, match=r"cannot read .*tokenizer_config.json: .*; re-save the model directory"):
        checkpoint_eos_token(g)


def test_vocabulary_difference_names_the_first_one(llama3_style, tok):
    from tokenizers import Tokenizer

    from retro_ray.tokenizer import vocabulary_difference

    a = Tokenizer.from_file(str(llama3_style / "tokenizer.json"))
    assert vocabulary_difference(a, Tokenizer.from_str(a.to_str())) is None
    n = a.get_vocab_size()
    assert vocabulary_difference(a, tok) is not None
    b = Tokenizer.from_str(a.to_str())
    b.add_special_tokens(["<|extra|>"])
    assert vocabulary_difference(a, b) == f"token id {n} is None in the first and '<|extra|>' in the second"
