"""Embedder on the bundled all-MiniLM-L6-v2 (CPU, no network)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from retro_ray import embedder as emb
from retro_ray.embedder import (
    Embedder,
    EmbedderConfig,
    load_wordpiece_tokenizer,
    resolve_model_dir,
    wordpiece_lengths,
)
from retro_ray.errors import RetroRayError

SENTENCES = [
    "The retrieval-enhanced transformer looks up neighbours of each chunk in a database of trillions of tokens.",
    "Paris is the capital of France.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "A",
    "",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "Ünïcödé text, émojis 🙂 and CJK 漢字 are tokenised too.",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Mount Everest is Earth's highest mountain above sea level.",
    "In 1969 Apollo 11 landed on the Moon.",
]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(EmbedderConfig(precision="fp32"))


@pytest.fixture(scope="module")
def ref(embedder) -> np.ndarray:
    return embedder.embed(SENTENCES)


def test_shape_finite_normalised(embedder, ref):
    assert embedder.dim == 384
    assert ref.shape == (len(SENTENCES), 384)
    assert ref.dtype == np.float32
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_order_restored_after_length_sort(embedder, ref):
    rev = embedder.embed(SENTENCES[::-1])[::-1]
    assert cosine_rows(ref, rev).min() >= 0.9999


def test_batch_of_one_equals_batch_of_many(ref):
    one = Embedder(EmbedderConfig(precision="fp32", batch_size=1))
    single = one.embed(SENTENCES)
    assert cosine_rows(ref, single).min() >= 0.999
    assert cosine_rows(ref[2:3], one.embed([SENTENCES[2]])).min() >= 0.999


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_vector_depends_only_on_its_group(precision):
    """embed_groups: the same group gives the same bits in any list that starts on a group boundary;
    bf16 (emulated on CPUs without it) is where the padded width of a batch moves embeddings most."""
    e = Embedder(EmbedderConfig(precision=precision, batch_size=4))
    texts = (SENTENCES * 2)[:16]
    whole = e.embed_groups(texts, 4)
    parts = np.concatenate([e.embed_groups(texts[:8], 4), e.embed_groups(texts[8:12], 4), e.embed_groups(texts[12:], 4)])
    assert whole.tobytes() == parts.tobytes()
    # the group is the forward pass: the same text in another group may differ, but only by rounding
    assert cosine_rows(whole, e.embed_groups(texts[::-1], 4)[::-1]).min() >= 0.995
    with pytest.raises(RetroRayError, match="embedding group size 0 must be >= 1"):
        e.embed_groups(texts, 0)


def test_matches_sentence_transformers(embedder, ref):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(embedder.model_dir), device="cpu", local_files_only=True)
    want = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    assert cosine_rows(ref, want).min() >= 0.9999


def test_truncation_to_max_chunk_length(embedder):
    long = " ".join(f"word{i}" for i in range(400))
    ids = embedder.tokenize([long])[0]
    assert len(ids) == embedder.cfg.max_chunk_length == 256
    a, b = embedder.embed([long, long + " and many more words that are cut off"])
    assert float(a @ b) >= 0.99999


def test_bf16_close_to_fp32(ref):
    bf16 = Embedder(EmbedderConfig(precision="bf16"))
    assert bf16.precision == "bf16"
    assert cosine_rows(ref, bf16.embed(SENTENCES)).min() >= 0.999


def test_auto_precision_follows_cpu(ref, caplog):
    native, _ = emb.cpu_has_native_bf16()
    with caplog.at_level(logging.INFO, logger="retro_ray.embedder"):
        auto = Embedder(EmbedderConfig(precision="auto"))
    assert any("precision" in r.getMessage() for r in caplog.records if r.name == "retro_ray.embedder")
    if not native:
        assert auto.precision == "fp32"
        assert "native bf16" in auto.precision_reason
    if auto.precision == "bf16":
        assert cosine_rows(ref, auto.embed(SENTENCES)).min() >= 0.999


def test_auto_picks_bf16_when_native_and_accurate(ref, monkeypatch):
    monkeypatch.setattr(emb, "cpu_has_native_bf16", lambda: (True, "pretend AMX"))
    auto = Embedder(EmbedderConfig(precision="auto", batch_size=16))
    assert auto.precision == "bf16", auto.precision_reason
    assert "cosine" in auto.precision_reason
    assert cosine_rows(ref[:4], auto.embed(SENTENCES[:4])).min() >= 0.999
    monkeypatch.setattr(emb, "AUTO_PRECISION_MIN_COSINE", 1.5)
    strict = Embedder(EmbedderConfig(precision="auto"))
    assert strict.precision == "fp32"
    assert "too far" in strict.precision_reason


def test_wordpiece_length_equals_model_tokenizer(embedder):
    tok = load_wordpiece_tokenizer(None)
    texts = SENTENCES + [" ".join(["antidisestablishmentarianism"] * 80)]  # > 128 wordpieces: no truncation
    lengths = wordpiece_lengths(tok, texts)
    for text, n in zip(texts, lengths):
        want = embedder.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, add_special_tokens=False).ids == want
        assert n == len(want)
    assert lengths[-1] > 256


def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(RetroRayError, match="does not exist") as e:
        resolve_model_dir(EmbedderConfig(model_dir=str(missing)))
    assert str(missing) in str(e.value)
    with pytest.raises(RetroRayError, match="does not exist"):
        load_wordpiece_tokenizer(missing)
    with pytest.raises(RetroRayError, match="does not exist"):
        Embedder(EmbedderConfig(model_dir=str(missing)))


def test_not_a_bert_directory(tmp_path):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(RetroRayError, match=r"type 'gpt2', not a BERT-like encoder"):
        resolve_model_dir(str(tmp_path / "gpt"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.bin").write_bytes(b"x")
    with pytest.raises(RetroRayError, match=r"no config.json \(found: weights.bin\)"):
        Embedder(EmbedderConfig(model_dir=str(tmp_path / "empty")))


def test_bad_inputs(embedder):
    with pytest.raises(RetroRayError, match="wrap it in a list"):
        embedder.embed("one string")
    with pytest.raises(RetroRayError, match="position 1"):
        embedder.embed(["ok", 3])
    with pytest.raises(RetroRayError, match="precision"):
        EmbedderConfig(precision="int8")
    with pytest.raises(RetroRayError, match="max_chunk_length"):
        Embedder(EmbedderConfig(max_chunk_length=1024))


def test_bundled_model_dir_default():
    path = resolve_model_dir(EmbedderConfig())
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
