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

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retro_ray.errors import RetroRayError
from retro_ray.indexed import IndexedDataset


def max_samples(n_tokens: int, seq_length: int, epochs: int = 1) -> int:
    """Samples that ``epochs`` passes over ``n_tokens`` tokens give (each needs seq_length + 1)."""
    total = n_tokens * epochs
    return max(0, (total - 1) // seq_length)


log = logging.getLogger(__name__)


def _shuffled_docs(dataset: IndexedDataset, seed: int, epochs: int, cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(document order, stream position where each ordered document ends): int64 [epochs x documents].

    With ``cache``, read from that .npy memory-mapped, written there first if it is not yet: every
    query actor and training worker then shares one copy in the page cache instead of holding 16 B per
    document and epoch of its own (64 GB for 2 B documents). A cache that cannot be written (a read-only
    project) is skipped with a warning; one that does not match the dataset is recomputed.
    """
    n_docs, n_tokens = len(dataset), dataset.num_tokens
    if cache is not None and cache.is_file():
        arr = np.load(cache, mmap_mode="r")
        if arr.shape == (2, n_docs * epochs) and (arr.shape[1] == 0 or int(arr[1, -1]) == n_tokens * epochs):
            return arr[0], arr[1]
        log.warning("%s does not match the dataset; recomputing it", cache)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n_docs) for _ in range(epochs)]).astype(np.int64) \
        if n_docs else np.zeros(0, np.int64)
    doc_end = np.cumsum(dataset.sequence_lengths[order].astype(np.int64))
    if cache is None:
        return order, doc_end
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".tmp")
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(2, len(order)))
            out[0], out[1] = order, doc_end
            out.flush()
            del out
            os.chmod(tmp, 0o644)
            os.replace(tmp, cache)  # concurrent writers write the same bytes; the last rename wins
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as e:
        log.warning("could not write the sample order cache %s (%s); keeping it in memory", cache, e)
    return order, doc_end


@dataclass(frozen=True)
class SampleSpan:
    """Where sample i lies: its tokens and the split-local documents it covers."""

    tokens: np.ndarray  # int64 [seq_length + 1]
    docs: np.ndarray    # int64 [d] split-local document indices, in order of appearance


class GptSamples:
    """Sample i → seq_length + 1 tokens and the documents they come from."""

    def __init__(self, dataset: IndexedDataset, seq_length: int, num_samples: int | None, seed: int,
                 split: str = "train", cache_dir: Path | None = None) -> None:
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
        key = f"{split}_seed{seed}_seq{seq_length}_epochs{epochs}_docs{n_docs}_tokens{n_tokens}.npy"
        self.doc_order, self._doc_end = _shuffled_docs(dataset, seed, epochs,
                                                       None if cache_dir is None else Path(cache_dir) / key)

    def __len__(self) -> int:
        return self.num_samples

    def span(self, i: int) -> SampleSpan:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        start = i * self.seq_length
        end = start + self.seq_length + 1
        first = int(np.searchsorted(self._doc_end, start, side="right"))
        # exclusive: ordered document j starts where j - 1 ends (document 0 at 0), so the documents that
        # start before `end` are 0 and every j whose predecessor ends before it
        last = 1 + int(np.searchsorted(self._doc_end[:-1], end, side="left"))
        ds, parts = self.ds, []
        for j in range(first, last):
            doc = self.doc_order[j]
            doc_start = int(self._doc_end[j]) - int(ds.sequence_lengths[doc])
            lo = max(start, doc_start) - doc_start
            hi = min(end, int(self._doc_end[j])) - doc_start
            t0 = int(ds.sequence_pointers[doc]) // ds.dtype.itemsize
            parts.append(ds.bin[t0 + lo:t0 + hi])
        tokens = np.concatenate(parts).astype(np.int64)
        assert len(tokens) == self.seq_length + 1
        return SampleSpan(tokens=tokens, docs=np.array(self.doc_order[first:last]))

    def tokens(self, i: int) -> np.ndarray:
        return self.span(i).tokens
