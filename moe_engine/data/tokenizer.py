"""Tokenizer: train a byte-level BPE or adopt any Hugging Face tokenizer directory.

Either way the result is saved as an HF tokenizer directory (tokenizer.json +
tokenizer_config.json) that `transformers.AutoTokenizer.from_pretrained(dir)` loads, so the
trainer, generation and export use the exact same tokenizer. Byte-level BPE (as GPT-2)
never produces unknown tokens: any byte string is representable.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from moe_engine.data.config import TokenizerConfig
from moe_engine.data.errors import TokenizerError


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig, progress: bool = False) -> Any:
    """Train a byte-level BPE on `texts`; returns an HF fast tokenizer (not yet saved)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.eos_token, cfg.pad_token],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=progress and sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=cfg.eos_token, pad_token=cfg.pad_token)


def load_tokenizer(path: str | Path) -> Any:
    """AutoTokenizer from a directory, offline; errors become `TokenizerError`."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: tokenizer directory not found")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds (OSError, ValueError, ...)
        raise TokenizerError(f"{path}: cannot load tokenizer ({type(exc).__name__}: {exc})") from None


def build_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: str | Path,
                    progress: bool = False) -> Path:
    """Train (or copy `cfg.pretrained`) and save an HF tokenizer directory at `out_dir`.

    Writes in place; callers that need all-or-nothing output write to a temporary directory
    (see pipeline.atomic_dir)."""
    tok = load_tokenizer(cfg.pretrained) if cfg.pretrained else train_bpe(texts, cfg, progress)
    if tok.eos_token_id is None:
        raise TokenizerError(
            f"{cfg.pretrained}: tokenizer has no eos token, which is needed to separate documents"
        )
    out_dir = Path(out_dir)
    tok.save_pretrained(str(out_dir))
    return out_dir


def tokenizer_hash(path: str | Path) -> str:
    """sha256 over the files of a tokenizer directory (names and contents, sorted)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype for ids in [0, vocab_size): uint16 halves shard size for vocabs <= 65535."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


class Encoder:
    """Batch encoding through the Rust backend (parallel over texts), without special tokens."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.vocab_size = len(tok)  # includes added special tokens
        self.eos_id = tok.eos_token_id
        self.backend = getattr(tok, "backend_tokenizer", None)
        if self.eos_id is None:
            raise TokenizerError("tokenizer has no eos token, which is needed to separate documents")

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """[len(texts)] arrays of int64 ids, shape [n_tokens_i]."""
        if self.backend is not None:
            encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        ids = self.tok(list(texts), add_special_tokens=False)["input_ids"]
        return [np.asarray(x, dtype=np.int64) for x in ids]
