"""GPT training samples: fixed-length token windows over a seeded shuffle of the documents.

As Megatron's GPT dataset does: the documents of a split are shuffled (seeded, a new permutation
per epoch), concatenated — every document already ends with the end-of-document token — and cut
into samples of ``seq_length + 1`` tokens, consecutive samples overlapping by one token (the +1 is
the last label). Sample i is fully determined by (token dataset, seed, seq_length, i): ids are
stable across runs and machines.

Both the ``query`` stage (neighbours for every chunk of every sample) and training read samples
through :class:`GptSamples`, so they agree on what sample i is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retro_ray.errors import RetroRayError
from retro_ray.indexed import IndexedDataset


def max_samples(n_tokens: int, seq_length: int, epochs: int = 1) -> int:
    """Samples that ``epochs`` passes over ``n_tokens`` tokens give (each needs seq_length + 1)."""
    total = n_tokens * epochs
    return max(0, (total - 1) // seq_length)


@dataclass(frozen=True)
class SampleSpan:
    """Where sample i lies: its tokens and the split-local documents it covers."""

    tokens: np.ndarray  # int64 [seq_length + 1]
    docs: np.ndarray    # int64 [d] split-local document indices, in order of appearance


class GptSamples:
    """Sample i → seq_length + 1 tokens and the documents they come from."""

    def __init__(self, dataset: IndexedDataset, seq_length: int, num_samples: int | None, seed: int,
                 split: str = "train") -> None:
        self.ds = dataset
        self.seq_length = seq_length
        n_docs = len(dataset)
        n_tokens = dataset.num_tokens
        one_epoch = max_samples(n_tokens, seq_length)
        if num_samples is not None and num_samples < 0:
            raise RetroRayError(f"{split} samples={num_samples} must be >= 0.")
        if num_samples != 0 and n_tokens <= seq_length:
            raise RetroRayError(
                f"the {split} split has {n_tokens} tokens, fewer than one sample of seq_length + 1 = "
                f"{seq_length + 1}; lower seq_length or give the split more data."
            )
        if num_samples is None:
            num_samples = one_epoch
        # Enough epochs to cover the samples asked for; each epoch is a fresh permutation.
        epochs = 1
        while max_samples(n_tokens, seq_length, epochs) < num_samples:
            epochs += 1
            if epochs > 1000:
                raise RetroRayError(
                    f"{num_samples} {split} samples would need more than 1000 epochs of the {split} split "
                    f"(one epoch gives {one_epoch}); ask for at most {max_samples(n_tokens, seq_length, 1000)}."
                )
        self.num_samples = num_samples
        self.epochs = epochs
        rng = np.random.default_rng(seed)
        self.doc_order = np.concatenate([rng.permutation(n_docs) for _ in range(epochs)]).astype(np.int64) \
            if n_docs else np.zeros(0, np.int64)
        lengths = dataset.sequence_lengths.astype(np.int64)[self.doc_order]
        self._doc_end = np.cumsum(lengths)             # stream position where each ordered doc ends
        self._doc_start = self._doc_end - lengths
        self._doc_token0 = (dataset.sequence_pointers // dataset.dtype.itemsize).astype(np.int64)

    def __len__(self) -> int:
        return self.num_samples

    def span(self, i: int) -> SampleSpan:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        start = i * self.seq_length
        end = start + self.seq_length + 1
        first = int(np.searchsorted(self._doc_end, start, side="right"))
        last = int(np.searchsorted(self._doc_start, end, side="left"))  # exclusive
        parts = []
        for j in range(first, last):
            doc = self.doc_order[j]
            lo = max(start, self._doc_start[j]) - self._doc_start[j]
            hi = min(end, self._doc_end[j]) - self._doc_start[j]
            t0 = self._doc_token0[doc]
            parts.append(self.ds.bin[t0 + lo:t0 + hi])
        tokens = np.concatenate(parts).astype(np.int64)
        assert len(tokens) == self.seq_length + 1
        return SampleSpan(tokens=tokens, docs=self.doc_order[first:last])

    def tokens(self, i: int) -> np.ndarray:
        return self.span(i).tokens
