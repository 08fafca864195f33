from pathlib import Path

import numpy as np
import pytest

from moe_engine.data.config import TokenizerConfig
from moe_engine.data.errors import TokenizerError
from moe_engine.data.tokenizer import Encoder, build_tokenizer, load_tokenizer, token_dtype, tokenizer_hash


@pytest.fixture(scope="module")
def texts(tiny_docs) -> list[str]:
    return [d for docs in tiny_docs.values() for d in docs]


def test_trained_bpe_is_an_hf_directory_autotokenizer_loads(tmp_path: Path, texts):
    from transformers import AutoTokenizer

    out = build_tokenizer(texts, TokenizerConfig(vocab_size=500), tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 500  # enough text to reach the requested size
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and tok.pad_token_id == 1
    sample = "def f(x):\n    return x  # naïve — 日本\n"
    assert tok.decode(tok(sample)["input_ids"]) == sample  # byte-level: lossless, no <unk>


def test_training_is_deterministic(tmp_path: Path, texts):
    a = build_tokenizer(texts, TokenizerConfig(vocab_size=400), tmp_path / "a")
    b = build_tokenizer(texts, TokenizerConfig(vocab_size=400), tmp_path / "b")
    assert tokenizer_hash(a) == tokenizer_hash(b)
    c = build_tokenizer(texts, TokenizerConfig(vocab_size=450), tmp_path / "c")
    assert tokenizer_hash(a) != tokenizer_hash(c)


def test_gpt2_directory_is_adopted(tmp_path: Path, gpt2_dir: Path):
    out = build_tokenizer([], TokenizerConfig(pretrained=str(gpt2_dir)), tmp_path / "gpt2")
    tok = load_tokenizer(out)
    assert tok("Hello world")["input_ids"] == [15496, 995]  # DATA.md's reference ids
    encoder = Encoder(tok)
    assert encoder.vocab_size == 50257 and encoder.eos_id == 50256
    (ids,) = encoder.encode(["Hello world"])
    assert ids.tolist() == [15496, 995] and ids.dtype == np.int64


def test_not_a_tokenizer_directory(tmp_path: Path):
    with pytest.raises(TokenizerError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path / "junk")


def test_token_dtype_by_vocab_size():
    assert token_dtype(8192) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(151_936) == np.uint32
