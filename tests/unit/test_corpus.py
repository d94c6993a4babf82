import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retro_ray.config import CorpusConfig
from retro_ray.corpus import IngestStats, ingest, iter_raw_documents, normalize_text
from retro_ray.errors import RetroRayError


def _read(path):
    return pq.read_table(path).to_pylist()


def test_jsonl_normalise_drop_empty_and_duplicates(tmp_path):
    src = tmp_path / "c.jsonl"
    lines = [
        {"text": "Cafe\u0301 one", "title": "a"},  # decomposed é → NFC
        {"text": "   "},
        {"text": "Café one"},                         # duplicate after NFC
        {"text": None},
        {"text": "second\r\ndoc  "},
    ]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "docs.parquet"
    stats = ingest(CorpusConfig(path=str(src)), out, docs_per_block=2, progress=False)
    rows = _read(out)
    assert [r["text"] for r in rows] == ["Café one", "second\ndoc"]
    assert [r["doc_id"] for r in rows] == [0, 1]
    assert rows[0]["title"] == "a"
    assert (stats.documents_read, stats.documents_empty, stats.documents_duplicate, stats.documents_kept) == (5, 2, 1, 2)


def test_row_groups_are_blocks(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(7)))
    out = tmp_path / "d.parquet"
    ingest(CorpusConfig(path=str(src)), out, docs_per_block=3, progress=False)
    assert pq.ParquetFile(out).num_row_groups == 3


def test_gzip_jsonl_and_text_field(tmp_path):
    src = tmp_path / "c.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.write(json.dumps({"body": "hello there"}) + "\n")
    docs = list(iter_raw_documents(CorpusConfig(path=str(src), text_field="body"), IngestStats()))
    assert docs == [("", "hello there")]


def test_broken_line_names_the_line(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "ok"}\n{"text": "broken\n{"text": "ok"}\n')
    with pytest.raises(RetroRayError, match=r"c.jsonl:2: line 2 is not valid JSON"):
        ingest(CorpusConfig(path=str(src)), tmp_path / "d.parquet", 10, progress=False)
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".*tmp*"))


def test_missing_text_field_lists_fields(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    with pytest.raises(RetroRayError, match=r"no field 'text' \(this line has: body, id\); set corpus.text_field"):
        list(iter_raw_documents(CorpusConfig(path=str(src)), IngestStats()))


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_bytes(b'{"text": "caf\xe9 au lait \xff\xfe"}\n{"text": "fine"}\n')
    out = tmp_path / "d.parquet"
    stats = ingest(CorpusConfig(path=str(src)), out, 10, progress=False)
    assert stats.bad_utf8_sequences == 3
    assert _read(out)[0]["text"] == "caf\ufffd au lait \ufffd\ufffd"


def test_text_directory_one_document_per_file(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second")
    (d / "a.txt").write_text("first")
    (d / "sub" / "c.md").write_bytes(b"third \x80")
    (d / ".hidden").write_text("ignored")
    stats = IngestStats()
    docs = list(iter_raw_documents(CorpusConfig(path=str(d)), stats))
    assert docs == [("a", "first"), ("b", "second"), ("sub/c", "third \ufffd")]
    assert stats.bad_utf8_sequences == 1


def test_parquet_corpus(tmp_path):
    src = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["one", "two"], "name": ["A", "B"]}), src)
    docs = list(iter_raw_documents(CorpusConfig(path=str(src), text_field="content", title_field="name"), IngestStats()))
    assert docs == [("A", "one"), ("B", "two")]
    with pytest.raises(RetroRayError, match=r"no column 'text' \(columns: content, name\)"):
        list(iter_raw_documents(CorpusConfig(path=str(src)), IngestStats()))


def test_missing_path_and_empty_corpus(tmp_path):
    with pytest.raises(RetroRayError, match="does not exist"):
        list(iter_raw_documents(CorpusConfig(path=str(tmp_path / "nope.jsonl")), IngestStats()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetroRayError, match="holds no files"):
        list(iter_raw_documents(CorpusConfig(path=str(tmp_path / "empty")), IngestStats()))
    src = tmp_path / "blank.jsonl"
    src.write_text(json.dumps({"text": " "}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(RetroRayError, match="has no non-empty documents"):
        ingest(CorpusConfig(path=str(src)), tmp_path / "d.parquet", 10, progress=False)
    assert not (tmp_path / "d.parquet").exists()


def test_default_corpus_is_the_wiki_summaries():
    stats = IngestStats()
    docs = []
    for doc in iter_raw_documents(CorpusConfig(), stats):
        docs.append(doc)
    assert 9000 < len(docs) < 11000
    titles = {t for t, _ in docs}
    assert "2001: A Space Odyssey" in titles


def test_normalize_text():
    assert normalize_text("  A\r\nb\x00 ", "NFC") == "A\nb"
    assert normalize_text("ﬁ", "NFKC") == "fi"


def test_holdout_fraction_splits_documents_off_deterministically(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"title": f"t{i}", "text": f"document number {i}"}) + "\n" for i in range(2000)))
    cfg = CorpusConfig(path=str(src), holdout_fraction=0.05)
    stats = ingest(cfg, tmp_path / "docs.parquet", docs_per_block=500, progress=False, heldout_path=tmp_path / "h.jsonl")
    held = [json.loads(x) for x in (tmp_path / "h.jsonl").read_text().splitlines()]
    kept = _read(tmp_path / "docs.parquet")
    assert stats.documents_held_out == len(held) and 60 <= len(held) <= 140  # ~5 % of 2000
    assert stats.documents_kept == len(kept) == 2000 - len(held)
    assert not {h["text"] for h in held} & {k["text"] for k in kept}
    assert [r["doc_id"] for r in kept] == list(range(len(kept)))  # ids stay contiguous
    # the same documents in another order: the same ones are held out
    lines = (src.read_text().splitlines())[::-1]
    src2 = tmp_path / "c2.jsonl"
    src2.write_text("\n".join(lines) + "\n")
    ingest(CorpusConfig(path=str(src2), holdout_fraction=0.05), tmp_path / "d2.parquet", docs_per_block=500,
           progress=False, heldout_path=tmp_path / "h2.jsonl")
    held2 = [json.loads(x) for x in (tmp_path / "h2.jsonl").read_text().splitlines()]
    assert sorted(h["title"] for h in held2) == sorted(h["title"] for h in held)
