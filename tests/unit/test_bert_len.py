"""The db stage's shortcuts are exact: per-word wordpiece counts and the byte-table decoder."""

from __future__ import annotations

import random

import numpy as np
import pytest

from retro_ray.config import TokenizerConfig
from retro_ray.embedder import load_wordpiece_tokenizer
from retro_ray.stages.db import ByteLevelDecoder, WordpieceCounter
from retro_ray.tokenizer import train_tokenizer

# Every character Python's str.split() splits on, and the ones BERT deletes or joins on.
PY_WHITESPACE = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000 and chr(c).isspace()]
ODD = [
    "tab\there", "new\nline", "cr\rlf\r\n", "vt\x0bjoined", "ff\x0cjoined", "fs\x1cgs\x1drs\x1eus\x1fend",
    "nel\x85joined", "nbsp\xa0split", "ideographic\u3000space", "line\u2028para\u2029sep", "zero\u200bwidth",
    "bom\ufeffhere", "nul\x00char", "bell\x07char", "replacement\ufffdchar", "\ufffd\ufffd", "soft\xadhyphen",
    "CJK 漢字かなカナ한국어 mixed漢字text", "Ünïcödé àccénts naïve café Ωmega ΣΊΣΥΦΟΣ İstanbul ß straße",
    "combining e\u0301 and \u0301 alone and a\u0308\u0304", "emoji 🙂👍🏽 flags 🇫🇷", "Devanagari हिन्दी Arabic العربية",
    "punct!?\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ «quotes» — dashes … ellipsis",
    "special [CLS] [SEP] x[MASK]y [UNK] [PAD] [cls] [ CLS ]", "a" * 99 + " " + "b" * 100 + " " + "c" * 101,
    "x" * 250 + "." + "y" * 250, "", "   ", " leading", "trailing ", "\x0b", "\x1c \x1d", "\x85\u3000\x0c",
    "numbers 3.14159 1,000,000 2026-11-26 12:30", "URLs https://example.org/a_b?c=d&e=f#g and e-mails a.b@c.de",
]


@pytest.fixture(scope="module")
def bert():
    return load_wordpiece_tokenizer(None)


def _full(bert, texts):
    return [len(e.ids) for e in bert.encode_batch(list(texts), add_special_tokens=False)]


def _corpus_pieces(wiki_docs, n: int = 3000, seed: int = 0) -> list[str]:
    """Random character slices of real documents, so that slices start and end inside words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = wiki_docs[rng.randrange(len(wiki_docs))][1]
        a = rng.randrange(len(text))
        out.append(text[a:a + rng.randint(1, 400)])
    return out


def test_bert_splits_where_python_does_except_the_listed_characters(bert):
    def tokens(text):
        return bert.encode(text, add_special_tokens=False).tokens

    joined = {c for c in PY_WHITESPACE if tokens(f"ab{c}cd") != tokens("ab cd")}
    assert joined == set("\x0b\x0c\x1c\x1d\x1e\x1f\x85")


def test_counter_is_the_wordpiece_tokenizer_on_odd_text(bert):
    counter = WordpieceCounter(bert)
    assert counter.per_word
    texts = ODD + [f"x{c}y {c}z{c}" for c in PY_WHITESPACE] + [" ".join(ODD)]
    assert counter(texts).tolist() == _full(bert, texts)
    # again, from the cache
    assert counter(texts[::-1]).tolist() == _full(bert, texts[::-1])


def test_counter_is_the_wordpiece_tokenizer_on_corpus_text(bert, wiki_docs):
    counter = WordpieceCounter(bert)
    texts = _corpus_pieces(wiki_docs)
    rng = random.Random(1)
    # sprinkle odd characters into some of them
    for i in range(0, len(texts), 7):
        t = texts[i]
        k = rng.randrange(len(t) + 1)
        texts[i] = t[:k] + rng.choice(PY_WHITESPACE + ["\ufffd", "\u200b", "\x00", "漢", "\u0301", "[SEP]"]) + t[k:]
    for start in range(0, len(texts), 1000):  # several calls: a warm cache must give the same counts
        batch = texts[start:start + 1000]
        assert counter(batch).tolist() == _full(bert, batch)


def test_counter_cache_is_bounded_and_still_exact(bert, wiki_docs):
    counter = WordpieceCounter(bert, max_words=500)
    texts = _corpus_pieces(wiki_docs, n=600, seed=2)
    for start in range(0, len(texts), 200):
        batch = texts[start:start + 200]
        assert counter(batch).tolist() == _full(bert, batch)
        assert len(counter._counts) <= 500
    assert len(counter._counts) == 500


def test_counter_falls_back_to_whole_texts_for_other_tokenizers(bert):
    gpt = train_tokenizer(iter(["some text to train on, some more text"] * 20),
                          TokenizerConfig(vocab_size=300, min_frequency=1), progress=False)
    counter = WordpieceCounter(gpt)
    assert not counter.per_word
    texts = ["some text", "more  text\x0bhere", ""]
    assert counter(texts).tolist() == [len(gpt.encode(t, add_special_tokens=False).ids) for t in texts]
    truncating = load_wordpiece_tokenizer(None)
    truncating.enable_truncation(8)
    assert not WordpieceCounter(truncating).per_word


@pytest.fixture(scope="module")
def gpt(wiki_docs):
    tok = train_tokenizer((t for _, t in wiki_docs[:200]), TokenizerConfig(vocab_size=1024), progress=False)
    tok.add_tokens(["naïve€token", "plain_added"])  # added, not special: decoded from their UTF-8
    return tok


def _check_decoder(gpt, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
    ids = tokens.tolist()
    want = gpt.decode_batch([ids[a:b] for a, b in zip(starts.tolist(), ends.tolist())], skip_special_tokens=True)
    for batch in (8192, 7, 1):  # pieces decoded a batch at a time: the same texts
        dec = ByteLevelDecoder(gpt, pieces_per_batch=batch)
        assert dec.usable
        assert dec.decode(tokens, starts, ends) == want


def test_byte_table_decoder_is_decode_batch_on_corpus_chunks(gpt, wiki_docs):
    eod = gpt.token_to_id("<|endoftext|>")
    texts = [t for _, t in wiki_docs[200:260]] + ODD + ["x naïve€token y plain_added <|endoftext|> z"]
    ids = []
    for e in gpt.encode_batch(texts, add_special_tokens=False):
        ids += e.ids + [eod]
    tokens = np.array(ids, dtype=np.uint16)
    rng = np.random.default_rng(0)
    # chunks of 64 tokens, and random short pieces that cut multi-byte characters
    starts = np.arange(0, len(tokens), 64)
    _check_decoder(gpt, tokens, starts, np.minimum(starts + 64, len(tokens)))
    a = rng.integers(0, len(tokens), 5000)
    _check_decoder(gpt, tokens, a, np.minimum(a + rng.integers(0, 6, len(a)), len(tokens)))


def test_byte_table_decoder_on_random_tokens(gpt):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, gpt.get_vocab_size(), 20000).astype(np.uint16)
    a = np.sort(rng.integers(0, len(tokens), 3000))
    _check_decoder(gpt, tokens, a, np.minimum(a + rng.integers(0, 9, len(a)), len(tokens)))
    _check_decoder(gpt, tokens[:0], np.zeros(0, np.int64), np.zeros(0, np.int64))


def test_byte_table_decoder_falls_back_for_other_decoders(bert):
    dec = ByteLevelDecoder(bert)
    assert not dec.usable
    tokens = np.array(bert.encode("hello wordpiece world", add_special_tokens=False).ids)
    assert dec.decode(tokens, np.array([0, 1]), np.array([len(tokens), 2])) == \
        bert.decode_batch([tokens.tolist(), tokens[1:2].tolist()], skip_special_tokens=True)
