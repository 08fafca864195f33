import bz2
import gzip
import json
import lzma
from pathlib import Path

import pytest

from moe_engine.data.config import IngestConfig
from moe_engine.data.errors import IngestError
from moe_engine.data.ingest import Source, decode_utf8, read_documents, split_text, stem

CORPUS = "first document\n\n<|endoftext|>\n\nsecond\ndocument\n\n<|endoftext|>\n\n"


def test_split_text_treats_final_delimiter_as_terminator():
    assert [p.strip() for p in split_text(CORPUS.encode(), "<|endoftext|>")] == [b"first document", b"second\ndocument"]
    assert split_text(b"no delimiter here", "<|endoftext|>") == [b"no delimiter here"]
    # Only a whole line is a delimiter, not the token inside a sentence.
    assert len(split_text(b"a <|endoftext|> b", "<|endoftext|>")) == 1


@pytest.mark.parametrize("suffix, compress", [
    ("", lambda b: b), (".xz", lzma.compress), (".gz", gzip.compress), (".bz2", bz2.compress),
])
def test_text_files_plain_and_compressed(tmp_path: Path, suffix, compress):
    path = tmp_path / f"poems.txt{suffix}"
    path.write_bytes(compress(CORPUS.encode()))
    docs = read_documents([path])
    assert [d.text for d in docs] == ["first document", "second\ndocument"]
    assert {d.domain for d in docs} == {"poems"}  # the stem without .txt and compression
    assert [d.index for d in docs] == [0, 1]


def test_folder_one_document_per_file_and_domain_labels(tmp_path: Path):
    folder = tmp_path / "letters"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("Dear A")
    (folder / "sub" / "b.txt").write_text("Dear B")
    (folder / ".hidden").write_text("ignored")
    docs = read_documents([folder])
    assert [(d.text, d.domain) for d in docs] == [("Dear A", "letters"), ("Dear B", "letters")]
    per_file = read_documents([folder], IngestConfig(domain_by="file"))
    assert [d.domain for d in per_file] == ["a", "b"]
    labelled = read_documents([f"mail={folder}"])
    assert {d.domain for d in labelled} == {"mail"}


def test_jsonl_with_text_and_domain_fields(tmp_path: Path):
    rows = [{"body": "one", "topic": "x"}, {"body": "two"}, {"body": "three", "topic": "y"}]
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(map(json.dumps, rows)).encode() + b"\n\n"))
    docs = read_documents([path], IngestConfig(text_field="body", domain_field="topic"))
    assert [(d.text, d.domain) for d in docs] == [("one", "x"), ("two", "rows"), ("three", "y")]


def test_jsonl_rows_missing_the_text_field_name_the_lines(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "wrong field"}\n{"text": null}\n{"text": 3}\n[1]\nnot json\n')
    with pytest.raises(IngestError) as err:
        read_documents([path])
    message = str(err.value)
    assert "rows.jsonl" in message
    assert "2 of 6 rows have no text field 'text' (lines 2, 3)" in message
    assert "non-string 'text' (line 4)" in message
    assert "not JSON objects (line 5)" in message and "not valid JSON (line 6)" in message


def test_parquet_column_and_missing_column(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["alpha", "beta"], "n": [1, 2]}), path)
    docs = read_documents([path], IngestConfig(text_field="content"))
    assert [d.text for d in docs] == ["alpha", "beta"]
    with pytest.raises(IngestError, match=r"no column 'text' \(columns: content, n\)"):
        read_documents([path])
    pq.write_table(pa.table({"text": ["a", None]}), path)
    with pytest.raises(IngestError, match="1 of 2 rows have a null 'text' \\(row 1\\)"):
        read_documents([path])


def test_invalid_utf8_is_counted_not_fatal(tmp_path: Path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café naïve".encode("latin-1"))
    (doc,) = read_documents([path])
    assert doc.invalid_utf8 == 2 and "\ufffd" in doc.text
    assert decode_utf8("already \ufffd here".encode()) == ("already \ufffd here", 0)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.txt", "source not found"),
    (lambda p: (p / "empty_dir").mkdir() or p / "empty_dir", "folder contains no files"),
    (lambda p: (p / "bad.txt.xz").write_bytes(b"not xz at all") and p / "bad.txt.xz", "cannot read"),
])
def test_unreadable_sources(tmp_path: Path, make, message):
    with pytest.raises(IngestError, match=message):
        read_documents([make(tmp_path)])


def test_source_parse_and_stem(tmp_path: Path):
    assert Source.parse("code=a/b.py") == Source(Path("a/b.py"), "code")
    assert Source.parse("a/b=c.txt") == Source(Path("a/b=c.txt"))  # '/' before '=': a path
    weird = tmp_path / "x=y.txt"
    weird.write_text("t")
    assert Source.parse(str(weird)).domain is None  # an existing path wins
    assert stem(Path("milton.txt.xz")) == "milton" and stem(Path("rows.jsonl.gz")) == "rows"
    assert stem(Path("v1.2.data")) == "v1.2.data"
