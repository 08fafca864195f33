"""Typed configs of the data stage; field names equal the keys of params.yaml.

params.yaml layout (one section per component, under a `data` section by default):

    data:
      ingest:     {text_field: text, delimiter: "<|endoftext|>", domain_by: source, ood_domains: [milton]}
      tokenizer:  {vocab_size: 8192, min_frequency: 2}
      shards:     {seq_len: 256, val_fraction: 0.05, seed: 0}
      validation: {max_duplicate_share: 0.01}

Built on the shared config system (``moe_engine.config``): unknown keys and wrong types raise
`ConfigError` naming the dotted key, so a typo in params.yaml fails loudly instead of silently
using a default.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_engine.config import Config, load_section
from moe_engine.errors import ConfigError


class _Section(Config):
    def _require(self, ok: bool, key: str, rule: str) -> None:
        self.require(ok, key, rule)


@dataclass
class IngestConfig(_Section):
    section: typing.ClassVar[str] = "ingest"
    text_field: str = "text"  # jsonl/parquet field holding the document text
    domain_field: str | None = None  # jsonl/parquet field with a per-row domain label
    # A line equal to this separates documents in text files; a file without it is one
    # document, so this default also serves folders of one-document-per-file texts.
    delimiter: str = "<|endoftext|>"
    # "source": one domain per path given (file stem or folder name); "file": per file stem.
    domain_by: str = "source"
    # Domains kept out of tokenizer training and train/val: they form the "ood" split.
    ood_domains: list[str] = field(default_factory=lambda: ["milton"])

    def check(self) -> None:
        self._require(self.domain_by in ("source", "file"), "domain_by", "'source' or 'file'")
        self._require(bool(self.text_field), "text_field", "a non-empty field name")


@dataclass
class TokenizerConfig(_Section):
    section: typing.ClassVar[str] = "tokenizer"
    vocab_size: int = 8192  # target size of a trained byte-level BPE (incl. special tokens)
    min_frequency: int = 2  # a merge must occur this often in the training text
    pretrained: str | None = None  # an HF tokenizer directory to use instead of training
    eos_token: str = "<|endoftext|>"  # appended after every document
    pad_token: str = "<|pad|>"

    def check(self) -> None:
        # 256 byte symbols + the special tokens are the floor of a byte-level BPE.
        self._require(self.vocab_size >= 260, "vocab_size", ">= 260 (256 bytes + specials)")
        self._require(self.min_frequency >= 1, "min_frequency", ">= 1")


@dataclass
class ShardsConfig(_Section):
    section: typing.ClassVar[str] = "shards"
    seq_len: int = 256  # tokens per training sequence (row of a shard)
    val_fraction: float = 0.05  # expected share of chunks held out for validation
    seed: int = 0  # salts the split hash: another seed holds out other chunks
    # Documents are cut at paragraph breaks into chunks of about this many characters;
    # the split is decided per chunk, by a hash of its text (independent of the tokenizer).
    chunk_chars: int = 4096
    tokens_per_shard: int = 16_777_216  # 32 MiB per uint16 shard

    def check(self) -> None:
        self._require(self.seq_len >= 2, "seq_len", ">= 2")
        self._require(0.0 <= self.val_fraction < 1.0, "val_fraction", "in [0, 1)")
        self._require(self.chunk_chars >= 64, "chunk_chars", ">= 64")
        self._require(self.tokens_per_shard >= self.seq_len, "tokens_per_shard", ">= seq_len")


@dataclass
class ValidationConfig(_Section):
    section: typing.ClassVar[str] = "validation"
    min_documents: int = 1
    min_chars: int = 1  # length bounds of a non-empty document (after stripping)
    max_chars: int = 5_000_000
    max_empty_share: float = 0.0  # empty (whitespace-only) documents
    max_duplicate_share: float = 0.01  # exact duplicates (by sha1 of the text)
    max_non_utf8_share: float = 0.0  # documents with invalid UTF-8 byte sequences
    # Share of control characters (not \t \n \r \v \f) allowed in a document: text has ~0,
    # binary data ~0.1 and more.
    max_control_share: float = 0.001
    data_docs: bool = True  # write a Great Expectations Data Docs HTML report

    def check(self) -> None:
        for key in ("max_empty_share", "max_duplicate_share", "max_non_utf8_share", "max_control_share"):
            self._require(0.0 <= getattr(self, key) <= 1.0, key, "in [0, 1]")
        self._require(0 <= self.min_chars <= self.max_chars, "min_chars", "in [0, max_chars]")


@dataclass
class DataConfig(Config):
    """All sections of the data stage."""

    section: typing.ClassVar[str] = "data"
    ingest: IngestConfig = field(default_factory=IngestConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def override(self, assignments, where: str | None = None) -> "DataConfig":
        """A copy with dotted keys replaced, e.g. {"shards.seq_len": 128} (CLI --set)."""
        items = assignments if isinstance(assignments, dict) else None
        for key in (items or {}):
            if "." not in key:
                raise ConfigError(f"--set {key}: expected SECTION.KEY with SECTION in {', '.join(self.to_dict())}")
        return super().override(assignments, where)


def load_params(path: str | Path | None, section: str = "data") -> DataConfig:
    """Read the data sections from a params.yaml; `section` is a dotted path ('' = top level)."""
    if not section:
        from moe_engine.config import read_params

        return DataConfig.from_dict(read_params(path) if path is not None else {}, "params")
    return load_section(DataConfig, path, section)
