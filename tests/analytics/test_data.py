"""The analysis data loader: text folders with a tokenizer, pre-tokenised ids, readable errors."""

import lzma
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_engine.analytics.data import AnalyticsError, domain_name, load_dataset


@pytest.mark.parametrize(
    "name, domain",
    [("kjv_bible.txt.xz", "kjv_bible"), ("notes.md", "notes"), ("my.domain.txt", "my.domain"), ("plain", "plain")],
)
def test_domain_is_the_file_stem(name, domain):
    assert domain_name(Path(name)) == domain


def test_real_text_folder_with_gpt2_tokenizer(tmp_path, corpus_dir, gpt2_dir):
    for name in ("kjv_bible", "python_stdlib_code"):
        with lzma.open(corpus_dir / f"{name}.txt.xz", "rb") as f:
            (tmp_path / f"{name}.txt").write_bytes(f.read(20_000))
    (tmp_path / ".hidden").write_text("ignored")
    ds = load_dataset(tmp_path, gpt2_dir, seq_len=32, max_tokens=256, max_bytes=10_000)
    assert sorted(ds) == ["kjv_bible", "python_stdlib_code"]
    assert all(ids.shape == (8, 32) and ids.dtype == torch.long for ids in ds.values())
    from transformers import AutoTokenizer

    text = (tmp_path / "kjv_bible.txt").read_bytes()[:10_000].decode("utf-8", errors="replace")
    expected = AutoTokenizer.from_pretrained(str(gpt2_dir)).encode(text)[:256]
    assert ds["kjv_bible"].reshape(-1).tolist() == expected


def test_compressed_text_is_read_up_to_max_bytes(tmp_path, gpt2_dir):
    with lzma.open(tmp_path / "verse.txt.xz", "wb") as f:
        f.write(("Hello world " * 1000).encode())
    ds = load_dataset(tmp_path / "verse.txt.xz", gpt2_dir, seq_len=4, max_bytes=11)  # "Hello world"
    assert ds["verse"].tolist() == [[15496, 995]]  # a domain shorter than seq_len is one short row


def test_pretokenised_pt_npy_and_dict(tmp_path):
    torch.save(torch.arange(10), tmp_path / "code.pt")
    np.save(tmp_path / "verse.npy", np.arange(6, dtype=np.int32).reshape(2, 3))
    ds = load_dataset(tmp_path, seq_len=4)
    assert ds["code"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # remainder dropped
    assert ds["verse"].tolist() == [[0, 1, 2, 3]]
    torch.save({"a": torch.ones(8, dtype=torch.int64), "b": torch.zeros(4, dtype=torch.int64)}, tmp_path / "both.pt")
    assert set(load_dataset(tmp_path / "both.pt", seq_len=4)) == {"a", "b"}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "no such file"),
        (lambda d: (d / "t.txt").write_text("words") and d / "t.txt", "pass a tokenizer directory"),
        (lambda d: torch.save(torch.rand(4), d / "f.pt") or d / "f.pt", "integer tensor of token ids"),
        (lambda d: (d / "bad.pt").write_bytes(b"not a tensor") and d / "bad.pt", "cannot load token ids"),
        (lambda d: (d / "e.txt.xz").write_bytes(b"not xz") and d / "e.txt.xz", "cannot read"),
    ],
)
def test_errors_are_readable(tmp_path, make, message):
    with pytest.raises(AnalyticsError, match=message):
        load_dataset(make(tmp_path))


def test_missing_tokenizer_dir(tmp_path):
    (tmp_path / "t.txt").write_text("words")
    with pytest.raises(AnalyticsError, match="tokenizer directory not found"):
        load_dataset(tmp_path, tmp_path / "nope")
