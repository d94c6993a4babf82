"""The .bin/.idx token dataset against the published MMIDIDX layout, byte by byte."""

import struct

import numpy as np
import pytest

from retro_ray.errors import RetroRayError
from retro_ray.indexed import IndexedDataset, IndexedDatasetWriter


def _docs():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 8000, size=n).astype(np.uint16) for n in (5, 1, 17, 64, 3)]


def test_writer_produces_the_published_layout(tmp_path):
    docs = _docs()
    w = IndexedDatasetWriter(tmp_path / "train", np.uint16)
    w.add_documents(np.concatenate(docs[:2]), [len(d) for d in docs[:2]])
    w.add_documents(np.concatenate(docs[2:]), [len(d) for d in docs[2:]])
    w.finalize()

    raw = (tmp_path / "train.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17])[0] == 1  # version
    assert raw[17] == 8  # dtype code of uint16
    n_seq, n_doc = struct.unpack("<QQ", raw[18:34])
    assert (n_seq, n_doc) == (5, 6)
    off = 34
    lengths = np.frombuffer(raw, np.int32, n_seq, off)
    off += 4 * n_seq
    pointers = np.frombuffer(raw, np.int64, n_seq, off)
    off += 8 * n_seq
    doc_idx = np.frombuffer(raw, np.int64, n_doc, off)
    off += 8 * n_doc
    assert off == len(raw)
    assert lengths.tolist() == [5, 1, 17, 64, 3]
    assert pointers.tolist() == [0, 10, 12, 46, 174]  # byte offsets, 2 bytes a token
    assert doc_idx.tolist() == [0, 1, 2, 3, 4, 5]
    assert (tmp_path / "train.bin").read_bytes() == np.concatenate(docs).tobytes()
    assert not list(tmp_path.glob(".*tmp*"))


def test_reader_reads_a_file_built_by_hand(tmp_path):
    """A file written straight from the spec (as Megatron would) reads back through our reader."""
    docs = [np.array([1, 2, 3], np.int32), np.array([70000, 5], np.int32)]
    (tmp_path / "x.bin").write_bytes(b"".join(d.tobytes() for d in docs))
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4) + struct.pack("<QQ", 2, 3)
    body = (np.array([3, 2], np.int32).tobytes() + np.array([0, 12], np.int64).tobytes()
            + np.array([0, 1, 2], np.int64).tobytes())
    (tmp_path / "x.idx").write_bytes(header + body)
    ds = IndexedDataset(tmp_path / "x")
    assert len(ds) == 2 and ds.dtype == np.int32 and ds.num_tokens == 5
    assert ds[0].tolist() == [1, 2, 3]
    assert ds[1].tolist() == [70000, 5]
    assert ds.get(0, offset=1, length=2).tolist() == [2, 3]


def test_round_trip_and_empty(tmp_path):
    docs = _docs()
    w = IndexedDatasetWriter(tmp_path / "a", np.uint16)
    w.add_documents(np.concatenate(docs), [len(d) for d in docs])
    w.finalize()
    ds = IndexedDataset(tmp_path / "a")
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d)
    w = IndexedDatasetWriter(tmp_path / "empty", np.uint16)
    w.finalize()
    empty = IndexedDataset(tmp_path / "empty")
    assert len(empty) == 0 and empty.num_tokens == 0


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(RetroRayError, match="not found"):
        IndexedDataset(tmp_path / "nope")
    (tmp_path / "bad.idx").write_bytes(b"NOTMAGIC!" + b"\0" * 40)
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(RetroRayError, match="bad header"):
        IndexedDataset(tmp_path / "bad")


def test_out_of_range_tokens_rejected(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "a", np.uint16)
    with pytest.raises(ValueError, match="out of range"):
        w.add_documents(np.array([70000]), [1])
    w.abort()
    assert not list(tmp_path.iterdir())
