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
