"""The neighbour controls and In-Context RALM (eval/controls.py) against computations written out by
hand on a tiny random model: each forward's input built token by token, its logits through log-softmax."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from retro_ray.eval.controls import in_context_nll, neighbor_text, oracle_neighbors, other_sample_order
from retro_ray.model.retro import RetroConfig, RetroModel, RetroSettings

M, PAD = 4, 0  # chunk length, end-of-document / padding id


def test_other_sample_order_never_gives_a_sample_its_own():
    assert other_sample_order(1) is None and other_sample_order(0) is None
    for n in (2, 3, 7, 64):
        order = other_sample_order(n)
        assert sorted(order.tolist()) == list(range(n)) and (order != np.arange(n)).all()
    assert other_sample_order(6).tolist() == [3, 4, 5, 0, 1, 2]


def test_oracle_is_the_chunk_and_its_continuation_then_the_saved_neighbours():
    text = np.arange(1, 14)[None]                       # n + 1 = 13 tokens: n = 12, C = 3
    saved = np.arange(100, 100 + 3 * 2 * 8).reshape(1, 3, 2, 8)
    mask = np.array([[[True, False], [True, True], [False, False]]])
    tokens, m = oracle_neighbors(text, saved, mask, M, PAD)
    assert tokens.shape == (1, 3, 2, 8) and m.shape == (1, 3, 2)
    assert tokens[0, 0, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert tokens[0, 1, 0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert tokens[0, 2, 0].tolist() == [9, 10, 11, 12, 13, PAD, PAD, PAD]  # the sample ends: padded
    assert (tokens[0, :, 1] == saved[0, :, 0]).all()   # the saved first neighbour moves to the second slot
    assert m[0, :, 0].all() and m[0, :, 1].tolist() == [True, True, False]


def test_neighbor_text_strips_padding_and_puts_the_best_last():
    nbrs = np.array([[7, 8, 9, PAD], [5, 6, PAD, PAD], [3, 3, 3, 3]])
    assert neighbor_text(nbrs, np.array([True, True, True]), PAD) == [3, 3, 3, 3, PAD, 5, 6, PAD, 7, 8, 9, PAD]
    assert neighbor_text(nbrs, np.array([True, False, False]), PAD) == [7, 8, 9, PAD]
    assert neighbor_text(np.full((1, 4), -1), np.array([True]), PAD) == []  # -1: no neighbour


@pytest.fixture(scope="module")
def gpt() -> RetroModel:
    torch.manual_seed(0)
    cfg = dataclasses.replace(RetroConfig.tiny(vocab_size=50, chunk_length=M, seq_length=12),
                              retro=RetroSettings(enabled=False))
    return RetroModel(cfg).eval()


def _by_hand(model: RetroModel, inp: list[int], targets: list[int]) -> list[float]:
    """NLL of ``targets`` as the continuation predicted at the last len(targets) positions of ``inp``."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].double(), -1)
    first = len(inp) - len(targets)
    return [-float(logp[first + i, t]) for i, t in enumerate(targets)]


def test_in_context_nll_equals_the_forwards_written_out(gpt):
    rng = np.random.default_rng(0)
    n, C, K, r = 12, 3, 2, 2 * M
    text = rng.integers(1, 50, (2, n + 1))
    nbrs = rng.integers(1, 50, (2, C, K, r))
    nbrs[0, 1, 0, 5:] = PAD                              # a neighbour cut short by its document's end
    mask = np.ones((2, C, K), dtype=bool)
    mask[1, 0, 1] = False                                # a chunk with one neighbour only
    scored = np.ones((2, n), dtype=bool)
    scored[1, 9:] = False                                # a padded window: its last labels are not scored
    nll, used = in_context_nll(gpt, text, scored, nbrs, mask, M, PAD, window=64, device=torch.device("cpu"))
    want = np.zeros((2, n))
    processed = 0
    for b in range(2):
        t = text[b].tolist()
        want[b, 0:3] = _by_hand(gpt, t[:3], t[1:4])      # positions 0..m-2: the prefix alone
        processed += 3
        for j in range(C):                               # positions (j+1)m-1 .. (j+2)m-2 read chunk j's neighbours
            lo, hi = (j + 1) * M - 1, min((j + 2) * M - 1, n)
            if not scored[b, lo:hi].any():
                continue
            ctx = []
            for k in (1, 0):                             # the best neighbour nearest the text
                if mask[b, j, k]:
                    toks = nbrs[b, j, k].tolist()
                    while toks and toks[-1] == PAD:
                        toks.pop()
                    ctx += toks + [PAD]
            inp = ctx + t[:hi]
            processed += len(inp)
            want[b, lo:hi] = _by_hand(gpt, inp, t[lo + 1:hi + 1])
    want[~scored] = 0.0
    np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-6)
    assert used == processed
    # the retrieved text matters: other neighbours, other NLL from position m-1 on; none before
    nll2, _ = in_context_nll(gpt, text, scored, np.roll(nbrs, 1, axis=0), mask, M, PAD, 64, torch.device("cpu"))
    assert np.allclose(nll2[:, :3], nll[:, :3]) and not np.allclose(nll2[:, 3:], nll[:, 3:])


def test_in_context_window_drops_the_prefix_first_then_the_lowest_ranked_neighbours(gpt):
    rng = np.random.default_rng(1)
    n, C, K, r = 12, 3, 2, 2 * M
    text = rng.integers(1, 50, (1, n + 1))
    nbrs = rng.integers(1, 50, (1, C, K, r))
    mask = np.ones((1, C, K), dtype=bool)
    t = text[0].tolist()
    window = 2 * (r + 1) + 3                              # both neighbours + 3 prefix tokens
    nll, _ = in_context_nll(gpt, text, np.ones((1, n), bool), nbrs, mask, M, PAD, window, torch.device("cpu"))
    ctx = nbrs[0, 2, 1].tolist() + [PAD] + nbrs[0, 2, 0].tolist() + [PAD]
    lo, hi = 11, 12                                      # the last chunk's neighbours: position 11 only
    np.testing.assert_allclose(nll[0, lo:hi], _by_hand(gpt, ctx + t[hi - 3:hi], t[lo + 1:hi + 1]), rtol=1e-5)
    lo, hi = 7, 11                                       # chunk 1's: 4 positions to score
    small = (r + 1) + 4 + 2                              # room for the 4 scored tokens and 11 retrieved ones
    nll, _ = in_context_nll(gpt, text, np.ones((1, n), bool), nbrs, mask, M, PAD, small, torch.device("cpu"))
    both = nbrs[0, 1, 1].tolist() + [PAD] + nbrs[0, 1, 0].tolist() + [PAD]
    inp = both[-11:] + t[lo:hi]                          # the prefix down to the scored span; the best neighbour whole
    assert inp[-(4 + r + 1):-4] == nbrs[0, 1, 0].tolist() + [PAD]
    np.testing.assert_allclose(nll[0, lo:hi], _by_hand(gpt, inp, t[lo + 1:hi + 1]), rtol=1e-5)
