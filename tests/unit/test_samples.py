import numpy as np
import pytest

from retro_ray.errors import RetroRayError
from retro_ray.indexed import IndexedDataset, IndexedDatasetWriter
from retro_ray.samples import GptSamples, max_samples

EOD = 0


@pytest.fixture
def ds(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=25)
    docs = [np.append(rng.integers(1, 500, size=n - 1), EOD) for n in lengths]
    # make each doc's tokens identify the doc: first token = 1000 + doc index
    for i, d in enumerate(docs):
        d[0] = 1000 + i
    w = IndexedDatasetWriter(tmp_path / "train", np.uint16)
    w.add_documents(np.concatenate(docs), lengths)
    w.finalize()
    return IndexedDataset(tmp_path / "train"), docs


def test_samples_tile_the_shuffled_stream(ds):
    dataset, docs = ds
    s = GptSamples(dataset, seq_length=16, num_samples=None, seed=3)
    stream = np.concatenate([docs[i] for i in s.doc_order])
    assert len(s) == max_samples(len(stream), 16) == (len(stream) - 1) // 16
    for i in range(len(s)):
        span = s.span(i)
        assert np.array_equal(span.tokens, stream[i * 16:i * 16 + 17])
        # the documents reported are exactly those whose tokens appear in the sample
        covered = [d for d in span.docs]
        assert all(1000 + d in span.tokens.tolist() or docs[d][0] not in span.tokens.tolist() for d in covered)
    assert sorted(s.doc_order.tolist()) == list(range(len(docs)))
    assert not np.array_equal(s.doc_order, np.arange(len(docs)))


def test_sample_ids_are_stable_and_seeded(ds):
    dataset, _ = ds
    a = GptSamples(dataset, 16, None, seed=3)
    b = GptSamples(dataset, 16, None, seed=3)
    c = GptSamples(dataset, 16, None, seed=4)
    assert all(np.array_equal(a.tokens(i), b.tokens(i)) for i in range(len(a)))
    assert any(not np.array_equal(a.tokens(i), c.tokens(i)) for i in range(len(a)))


def test_more_samples_than_an_epoch_uses_more_epochs(ds):
    dataset, _ = ds
    one = len(GptSamples(dataset, 16, None, seed=1))
    s = GptSamples(dataset, 16, one * 2 + 3, seed=1)
    assert s.epochs == 3 and len(s) == one * 2 + 3
    s.tokens(len(s) - 1)
    with pytest.raises(IndexError):
        s.tokens(len(s))


def test_too_many_samples_and_too_little_data(ds, tmp_path):
    dataset, _ = ds
    with pytest.raises(RetroRayError, match="ask for at most"):
        GptSamples(dataset, 16, 10**9, seed=1)
    w = IndexedDatasetWriter(tmp_path / "tiny", np.uint16)
    w.add_documents(np.array([5, 6, EOD]), [3])
    w.finalize()
    with pytest.raises(RetroRayError, match="fewer than one sample"):
        GptSamples(IndexedDataset(tmp_path / "tiny"), 16, None, seed=1)


def _expected_docs(order, lengths, start, end):
    """The ordered documents whose stream range [s, e) meets [start, end), computed the slow way."""
    out, s = [], 0
    for d in order:
        e = s + int(lengths[d])
        if s < end and e > start:
            out.append(int(d))
        s = e
    return out


@pytest.mark.parametrize("num_samples", [None, 100])  # one epoch, and several
def test_cached_order_is_mapped_and_gives_the_same_samples(ds, tmp_path, num_samples):
    dataset, docs = ds
    lengths = [len(d) for d in docs]
    plain = GptSamples(dataset, 16, num_samples, seed=3)
    first = GptSamples(dataset, 16, num_samples, seed=3, cache_dir=tmp_path / "samples")
    files = list((tmp_path / "samples").iterdir())
    assert [f.name for f in files] == [f"train_seed3_seq16_epochs{plain.epochs}_docs25_tokens{sum(lengths)}.npy"]
    again = GptSamples(dataset, 16, num_samples, seed=3, cache_dir=tmp_path / "samples")
    assert isinstance(again.doc_order, np.memmap)  # read from the file, not recomputed
    for i in range(len(plain)):
        a, b, c = plain.span(i), first.span(i), again.span(i)
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.tokens, c.tokens)
        want = _expected_docs(plain.doc_order, lengths, i * 16, i * 16 + 17)
        assert a.docs.tolist() == b.docs.tolist() == c.docs.tolist() == want


def test_a_cache_of_other_data_is_recomputed_and_an_unwritable_one_skipped(ds, tmp_path, caplog):
    dataset, _ = ds
    plain = GptSamples(dataset, 16, None, seed=3)
    cache = tmp_path / "samples"
    GptSamples(dataset, 16, None, seed=3, cache_dir=cache)
    (path,) = cache.iterdir()
    np.save(path, np.zeros((2, 25), np.int64))  # same name, wrong content (ends at 0 tokens)
    s = GptSamples(dataset, 16, None, seed=3, cache_dir=cache)
    assert "does not match the dataset" in caplog.text
    assert all(np.array_equal(s.tokens(i), plain.tokens(i)) for i in range(len(s)))
    assert np.load(path)[1, -1] == dataset.num_tokens  # rewritten
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    s = GptSamples(dataset, 16, None, seed=3, cache_dir=blocked / "samples")
    assert "could not write the sample order cache" in caplog.text
    assert all(np.array_equal(s.tokens(i), plain.tokens(i)) for i in range(len(s)))
