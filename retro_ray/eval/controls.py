"""What retrieval contributes, told apart from what new weights contribute: the neighbour controls and
In-Context RALM.

A RETRO-fit's encoder and CCA are new weights, and new weights can lower perplexity whatever the
neighbours say (they adapt the frozen base to the corpus). So a RETRO is scored on the same tokens
with four neighbour settings:
    saved         the neighbours the query stage retrieved (the model as it is used)
    blank         no neighbours: every CCA adds exactly zero (for a frozen RETRO-fit, its base exactly)
    other-sample  the saved neighbours of *another* sample, chunk for chunk: the same count and kind of
                  text, relevance removed. What the new weights give on their own.
    oracle        the chunk's own continuation as the first neighbour (the chunk itself + the chunk it
                  must predict next, as a database holding the document would return it), the saved
                  neighbours after it: does the model read at all?
Retrieval's share of a gain is saved against other-sample; adaptation's is other-sample against the base.

In-Context RALM (Ram et al. 2023) is what a user would do instead: the base decoder, frozen, reads
the retrieved text in its prompt. Retrieval happens every chunk_length tokens from the last complete
chunk, as RETRO's: the tokens at positions (j+1)m-1 .. (j+2)m-2, which RETRO predicts reading the
neighbours of chunk j, are predicted by the base from
    [neighbour K] <eod> ... [neighbour 1] <eod> [the sample's tokens up to that position]
(each neighbour = chunk + continuation without its padding, the best nearest the text), the oldest
prefix tokens dropped when the whole exceeds the model's context window. Positions 0 .. m-2 (no
complete chunk yet) are predicted from the prefix alone. Its cost is one forward of that whole input
for every chunk: the tokens processed per scored token are reported beside RETRO's.
"""

from __future__ import annotations

import numpy as np
import torch

from retro_ray.model.retro import IGNORE_INDEX


def other_sample_order(n: int) -> np.ndarray | None:
    """int64 [n]: whose neighbours each of n samples gets in the other-sample control (never its own:
    a shift by n // 2, so neighbours in the sequence of samples, often of one document, are far apart).
    None when n < 2."""
    if n < 2:
        return None
    return (np.arange(n) + n // 2) % n


def oracle_neighbors(text: np.ndarray, neighbor_tokens: np.ndarray, neighbor_mask: np.ndarray, chunk_length: int,
                     pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [B, C, K, r], bool [B, C, K]): chunk j's first neighbour = text[jm : jm + r] (the chunk and
    the one after it: what positions (j+1)m-1 .. (j+2)m-2 predict), ``pad_id`` past the sample's end;
    neighbours 1..K-1 = the saved neighbours 0..K-2.

    text [B, n+1]; neighbor_tokens [B, C, K, r] and neighbor_mask [B, C, K]: the saved ones."""
    B, C, K, r = neighbor_tokens.shape
    m = chunk_length
    padded = np.full((B, C * m + r), pad_id, dtype=np.int64)
    padded[:, :text.shape[1]] = text
    own = np.stack([padded[:, j * m:j * m + r] for j in range(C)], axis=1)  # [B, C, r]
    tokens = np.concatenate([own[:, :, None], neighbor_tokens[:, :, :K - 1]], axis=2)
    mask = np.concatenate([np.ones((B, C, 1), dtype=bool), neighbor_mask[:, :, :K - 1]], axis=2)
    return tokens, mask


def neighbor_text(neighbor_tokens: np.ndarray, neighbor_mask: np.ndarray, pad_id: int) -> list[int]:
    """One chunk's neighbours [K, r] as prompt tokens: each without its trailing padding and followed by
    ``pad_id`` (the end-of-document token) as a separator, the best (neighbour 0) last."""
    out: list[int] = []
    for k in reversed(range(len(neighbor_tokens))):
        if not neighbor_mask[k] or (neighbor_tokens[k] < 0).any():
            continue
        toks = neighbor_tokens[k]
        real = np.flatnonzero(toks != pad_id)
        out += toks[:real[-1] + 1].tolist() if len(real) else []
        out.append(pad_id)
    return out


def in_context_nll(model, text: np.ndarray, scored: np.ndarray, neighbor_tokens: np.ndarray, neighbor_mask: np.ndarray,
                   chunk_length: int, pad_id: int, window: int, device: torch.device) -> tuple[np.ndarray, int]:
    """(float64 [B, n] NLL of each label under In-Context RALM, 0 where not scored; tokens processed).

    model: the base decoder (a RetroModel with retro off, or any RetroModel run without neighbours).
    text [B, n+1]; scored [B, n] bool: which labels text[1:] count. neighbor_tokens [B, C, K, r],
    neighbor_mask [B, C, K]: chunk j's neighbours (the ones RETRO reads from position (j+1)m-1).
    window: the most tokens one forward may hold (the model's context)."""
    B, n1 = text.shape
    n, m = n1 - 1, chunk_length
    C = neighbor_tokens.shape[1]
    nll = np.zeros((B, n))
    processed = 0
    # (start, end) label positions of each forward: the first m-1 from the prefix alone, then one per chunk.
    spans = [(0, min(m - 1, n))] + [((j + 1) * m - 1, min((j + 2) * m - 1, n)) for j in range(C)]
    for j, (lo, hi) in enumerate(spans):
        if hi <= lo:
            continue
        inputs, label_rows, keep = [], [], []
        for b in range(B):
            if not scored[b, lo:hi].any():
                continue
            ctx = neighbor_text(neighbor_tokens[b, j - 1], neighbor_mask[b, j - 1], pad_id) if j > 0 else []
            budget = max(0, window - (hi - lo))  # the text to score must fit: the prefix gives way first, then
            ctx = ctx[max(0, len(ctx) - budget):]  # the lowest-ranked neighbours
            prefix = text[b, max(0, hi - (window - len(ctx))):hi].tolist()
            labels = np.full(len(ctx) + len(prefix), IGNORE_INDEX, dtype=np.int64)
            span = np.where(scored[b, lo:hi], text[b, lo + 1:hi + 1], IGNORE_INDEX)
            labels[len(labels) - (hi - lo):] = span
            inputs.append(ctx + prefix)
            label_rows.append(labels)
            keep.append(b)
            processed += len(ctx) + len(prefix)
        if not inputs:
            continue
        T = max(len(x) for x in inputs)
        # Right padding: a causal model's earlier positions never see it.
        tok = torch.full((len(inputs), T), pad_id, dtype=torch.long)
        lab = torch.full((len(inputs), T), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(zip(inputs, label_rows)):
            tok[i, :len(x)] = torch.tensor(x)
            lab[i, :len(y)] = torch.from_numpy(y)
        with torch.inference_mode():
            out = model.token_nll(tok.to(device), lab.to(device)).double().cpu().numpy()  # [rows, T]
        for i, b in enumerate(keep):
            L = len(inputs[i])
            nll[b, lo:hi] = out[i, L - (hi - lo):L]
    return nll, processed
