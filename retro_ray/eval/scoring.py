"""The numbers of an evaluation: per-token NLL of a model pass, bytes per token, chunk leakage.

Definitions (written into the report as well):
    perplexity      exp(mean token NLL) over the scored tokens (labels text[1:] of every sample).
    bits-per-byte   total NLL in bits / UTF-8 bytes of the scored tokens decoded as text; the
                    end-of-document token decodes to no text, so it adds bits but no bytes.
    leakage of u    chunk u of a sample is text[u*m:(u+1)*m]; those tokens are predicted at
                    positions u*m-1 .. (u+1)*m-2, whose chunked cross-attention reads the neighbours
                    of chunk u-1. Its leakage is the longest common contiguous token run between
                    chunk u and any of those neighbours (chunk + continuation, EOD padding ignored).
"""

from __future__ import annotations

import math

import numpy as np
import torch

LN2 = math.log(2.0)


def token_byte_lengths(tokenizer, size: int) -> np.ndarray:
    """int64 [size]: UTF-8 bytes each token id contributes to decoded text (special tokens: 0).

    Byte-level BPE (the project's tokenizer, GPT-2's): each character of a token's string stands for
    one byte, so the count is exact and additive over any token run (decoding a slice could split a
    multi-byte character). Other tokenizers: the bytes of each token decoded alone.
    """
    from tokenizers import decoders, pre_tokenizers

    out = np.zeros(size, dtype=np.int64)
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    for i in range(min(size, tokenizer.get_vocab_size())):
        if i in special:
            continue
        tok = tokenizer.id_to_token(i)
        if tok is None:
            continue
        if byte_level and set(tok) <= alphabet:
            out[i] = len(tok)
        else:
            out[i] = len(tokenizer.decode([i], skip_special_tokens=True).encode("utf-8"))
    return out


def token_nll(model, tokens: torch.Tensor, labels: torch.Tensor, neighbor_tokens: torch.Tensor | None = None,
              neighbor_mask: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [B, n] NLL (nats) of each label; 0 where the label is IGNORE_INDEX. No gradient.

    RetroModel.token_nll: the output layer in blocks of rows, never the whole [B, n, V] logits
    (at 8 x 2048 tokens and V = 50,304 those are 3.3 GB of float32).
    """
    return model.token_nll(tokens, labels, neighbor_tokens, neighbor_mask)


def longest_common_run(chunks: np.ndarray, neighbors: np.ndarray, valid: np.ndarray, pad_id: int) -> np.ndarray:
    """int64 [N]: for each chunk [m] the longest contiguous token run it shares with any of its
    neighbours [K, r] (only those with valid True; ``pad_id`` tokens of a neighbour never match).

    Dynamic programming along the chunk: run[j] = length of the common run ending at chunk position
    i and neighbour position j; vectorised over chunks, neighbours and j.
    """
    N, m = chunks.shape
    if N == 0:
        return np.zeros(0, dtype=np.int64)
    K, r = neighbors.shape[1], neighbors.shape[2]
    nb = np.where(neighbors == pad_id, -1, neighbors)
    nb = np.where(valid[:, :, None], nb, -1)  # a missing neighbour matches nothing
    best = np.zeros(N, dtype=np.int64)
    run = np.zeros((N, K, r + 1), dtype=np.int64)
    for i in range(m):
        eq = nb == chunks[:, i][:, None, None]            # [N, K, r]; -1 never equals a token id
        nxt = np.zeros_like(run)
        nxt[:, :, 1:] = np.where(eq, run[:, :, :-1] + 1, 0)
        run = nxt
        best = np.maximum(best, run.max(axis=(1, 2)))
    return best


def perplexity(nll_sum: float, count: int) -> float | None:
    if not count:
        return None
    mean = nll_sum / count
    return math.exp(mean) if mean < 700 else math.inf  # a diverged model: no OverflowError


def bits_per_byte(nll_sum: float, n_bytes: int) -> float | None:
    return nll_sum / LN2 / n_bytes if n_bytes else None
