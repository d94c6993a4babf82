"""Megatron's indexed token dataset (the MMIDIDX layout): ``<prefix>.bin`` + ``<prefix>.idx``.

``.bin`` holds the tokens of every document back to back. ``.idx`` is::

    b"MMIDIDX\\x00\\x00"   magic (9 bytes)
    <Q  version = 1
    <B  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    <Q  sequence count S
    <Q  document count D (= S + 1 here: one sequence per document)
    int32[S]  sequence lengths (tokens)
    int64[S]  sequence pointers (byte offsets into .bin)
    int64[D]  document indices (sequence index where each document starts, then S)

So a Megatron user can bring their own preprocessed data and read ours. The reader memory-maps both
files; nothing is loaded until it is indexed.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from retro_ray.errors import RetroRayError

MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {
    np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
    np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8,
}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


class IndexedDatasetWriter:
    """Append documents, then :meth:`finalize`; both files appear at once (temporary names, rename)."""

    def __init__(self, prefix: str | os.PathLike, dtype) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = self.prefix.with_name(f".{self.prefix.name}.bin.tmp")
        self._idx_tmp = self.prefix.with_name(f".{self.prefix.name}.idx.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[np.ndarray] = []

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """``tokens``: the concatenated tokens of ``len(lengths)`` documents."""
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids out of range for {self.dtype}")
        assert int(np.sum(lengths)) == tokens.size, "lengths do not add up to the tokens given"
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(np.asarray(lengths, dtype=np.int32))

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_indices)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_indices.tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        # .bin first: a reader opens .idx first, so a present .idx always has its .bin.
        os.replace(self._bin_tmp, self.prefix.with_suffix(".bin"))
        os.replace(self._idx_tmp, self.prefix.with_suffix(".idx"))

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)


class IndexedDataset:
    """Memory-mapped reader. ``ds[i]`` is document i's tokens; ``ds.get(i, offset, length)`` a slice."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = Path(prefix)
        idx_path, bin_path = self.prefix.with_suffix(".idx"), self.prefix.with_suffix(".bin")
        if not idx_path.is_file() or not bin_path.is_file():
            raise RetroRayError(
                f"token dataset {self.prefix}.bin/.idx not found; run `retro-ray prep` for this project."
            )
        with open(idx_path, "rb") as f:
            magic = f.read(9)
            if magic != MAGIC:
                raise RetroRayError(f"{idx_path} is not a Megatron MMIDIDX index (bad header); regenerate it.")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != 1:
                raise RetroRayError(f"{idx_path} has index version {version}; only version 1 is supported.")
            (code,) = struct.unpack("<B", f.read(1))
            self.dtype = _CODE_DTYPES[code]
            (self._n_seq,) = struct.unpack("<Q", f.read(8))
            (self._n_doc,) = struct.unpack("<Q", f.read(8))
            offset = f.tell()
        idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(idx, dtype=np.int32, count=self._n_seq, offset=offset)
        offset += self._n_seq * 4
        self.sequence_pointers = np.frombuffer(idx, dtype=np.int64, count=self._n_seq, offset=offset)
        offset += self._n_seq * 8
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=self._n_doc, offset=offset)
        self._idx = idx
        size = bin_path.stat().st_size
        self._bin = np.memmap(bin_path, mode="r", dtype=self.dtype) if size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return int(self._n_seq)

    @property
    def bin(self) -> np.ndarray:
        """Every token of the dataset, memory-mapped (read-only)."""
        return self._bin

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def _start(self, i: int) -> int:
        return int(self.sequence_pointers[i]) // self.dtype.itemsize

    def __getitem__(self, i: int) -> np.ndarray:
        start = self._start(i)
        return self._bin[start:start + int(self.sequence_lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        n = int(self.sequence_lengths[i])
        length = n - offset if length is None else length
        start = self._start(i) + offset
        return self._bin[start:start + length]

    def token_range(self, first_doc: int, last_doc: int) -> tuple[int, int]:
        """Token offsets [start, end) of documents first_doc .. last_doc - 1 in .bin."""
        if first_doc >= last_doc:
            return 0, 0
        start = self._start(first_doc)
        end = self._start(last_doc - 1) + int(self.sequence_lengths[last_doc - 1])
        return start, end
