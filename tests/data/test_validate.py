from pathlib import Path

import numpy as np
import pytest

from moe_engine.data.config import ValidationConfig
from moe_engine.data.errors import DataValidationError
from moe_engine.data.ingest import read_documents
from moe_engine.data.validate import document_table, great_expectations_report, pandera_failures, validate_documents


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.txt"
    path.write_text("\n<|endoftext|>\n".join(f"document number {i} with some words" for i in range(20)))
    return path


def failures_for(tmp_path: Path, good: Path, name: str, content: bytes, **cfg) -> dict:
    bad = tmp_path / name
    bad.write_bytes(content)
    table = document_table(read_documents([good, bad]))
    return {f.rule: f for f in pandera_failures(table, ValidationConfig(**cfg))}


def test_good_corpus_passes(good: Path):
    table = document_table(read_documents([good]))
    summary = validate_documents(table, ValidationConfig())
    assert summary["documents"] == 20 and summary["duplicate_share"] == 0.0


def test_empty_file(tmp_path: Path, good: Path):
    failures = failures_for(tmp_path, good, "empty.txt", b"")
    assert list(failures) == ["empty_documents"]
    assert failures["empty_documents"].files == (str(tmp_path / "empty.txt"),)
    assert "empty.txt#0: empty document" in failures["empty_documents"].examples[0]


def test_binary_garbage(tmp_path: Path, good: Path):
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    failures = failures_for(tmp_path, good, "image.bin", garbage)
    assert {"binary_content", "non_utf8_share"} <= set(failures)
    assert "control characters (binary data?)" in failures["binary_content"].examples[0]


def test_invalid_utf8(tmp_path: Path, good: Path):
    failures = failures_for(tmp_path, good, "latin1.txt", "Grüße aus Köln".encode("latin-1"))
    assert list(failures) == ["non_utf8_share"]
    assert "latin1.txt#0: 3 invalid UTF-8 sequence(s)" in failures["non_utf8_share"].examples[0]
    # A tolerated share passes.
    assert failures_for(tmp_path, good, "latin1.txt", "Grüße".encode("latin-1"), max_non_utf8_share=0.1) == {}


def test_file_of_exact_duplicates(tmp_path: Path, good: Path):
    failures = failures_for(tmp_path, good, "dups.txt", b"\n<|endoftext|>\n".join([b"same words again"] * 6))
    dup = failures["duplicate_share"]
    assert list(failures) == ["duplicate_share"] and dup.count == 5
    assert dup.examples[0].endswith("dups.txt#1: same text as " + str(tmp_path / "dups.txt") + "#0")


def test_length_bounds(tmp_path: Path, good: Path):
    failures = failures_for(tmp_path, good, "long.txt", b"word " * 100, max_chars=200)
    assert list(failures) == ["length_bounds"] and "499 characters" in failures["length_bounds"].examples[0]


def test_token_ids_at_or_above_vocab(good: Path):
    docs = read_documents([good])
    stats_D3 = np.array([[5, 0, 99]] * len(docs))
    stats_D3[4] = [5, 0, 100]
    failures = pandera_failures(document_table(docs, stats_D3), ValidationConfig(), vocab_size=100)
    assert [f.rule for f in failures] == ["token_id_below_vocab"]
    assert failures[0].examples == (f"{good}#4: max token id 100",)


def test_error_message_is_readable(tmp_path: Path, good: Path):
    (tmp_path / "empty.txt").write_bytes(b"")
    table = document_table(read_documents([good, tmp_path / "empty.txt"]))
    with pytest.raises(DataValidationError) as err:
        validate_documents(table, ValidationConfig(min_documents=50))
    message = str(err.value)
    assert message.startswith("data validation failed: 2 rule(s) broken")
    assert "empty_documents: 1 failing (share of empty documents <= 0.0; observed 0.0476)" in message
    assert "min_documents" in message and "found 21" in message


def test_great_expectations_writes_data_docs_and_agrees(tmp_path: Path, good: Path):
    (tmp_path / "dups.txt").write_bytes(b"\n<|endoftext|>\n".join([b"same words again"] * 6))
    table = document_table(read_documents([good, tmp_path / "dups.txt"]))
    failures, index = great_expectations_report(table, ValidationConfig(), None, tmp_path / "report")
    assert index.is_file() and "<html" in index.read_text().lower()
    assert [f.rule for f in failures] == ["duplicate_share"]
    # A clean table: the suite passes and the report still exists.
    clean = document_table(read_documents([good]))
    failures, index = great_expectations_report(clean, ValidationConfig(), None, tmp_path / "report2")
    assert failures == [] and index.is_file()
    assert list(tmp_path.glob("gx")) == []  # ephemeral: no GX project created in cwd or here
