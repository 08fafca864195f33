"""Typed configs of the data stage; field names equal the keys of params.yaml.

params.yaml layout (one section per component, under a `data` section by default):

    data:
      ingest:     {text_field: text, delimiter: "<|endoftext|>", domain_by: source, ood_domains: [milton]}
      tokenizer:  {vocab_size: 8192, min_frequency: 2}
      shards:     {seq_len: 256, val_fraction: 0.05, seed: 0}
      validation: {max_duplicate_share: 0.01}

Unknown keys and wrong types raise `ConfigError` naming the key, so a typo in params.yaml
fails loudly instead of silently using a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from moe_engine.data.errors import ConfigError

T = TypeVar("T")


def _check_value(name: str, value: Any, hint: Any) -> Any:
    """Return `value` if it matches the type hint (ints accepted as floats), else raise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_value(name, value, option)
            except ConfigError:
                pass
    elif hint is type(None):
        if value is None:
            return None
    elif origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            return [_check_value(name, v, item) for v in value]
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{name}: expected {_hint_name(hint)}, got {value!r}")


def _hint_name(hint: Any) -> str:
    if typing.get_origin(hint) is None and hasattr(hint, "__name__"):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


class _Section:
    """Mixin: `from_dict` with unknown-key and type checks, `to_dict` for manifests."""

    section: typing.ClassVar[str]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, where: str | None = None) -> T:
        where = where or cls.section  # type: ignore[attr-defined]
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown key(s) in params section '{where}': {', '.join(unknown)}"
                f" (known: {', '.join(known)})"
            )
        values = {k: _check_value(f"{where}.{k}", v, hints[k]) for k, v in data.items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def _require(self, ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{self.section}.{key} = {getattr(self, key)!r}: must be {rule}")


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

    def __post_init__(self) -> None:
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

    def __post_init__(self) -> None:
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

    def __post_init__(self) -> None:
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

    def __post_init__(self) -> None:
        for key in ("max_empty_share", "max_duplicate_share", "max_non_utf8_share", "max_control_share"):
            self._require(0.0 <= getattr(self, key) <= 1.0, key, "in [0, 1]")
        self._require(0 <= self.min_chars <= self.max_chars, "min_chars", "in [0, max_chars]")


@dataclass
class DataConfig:
    """All sections of the data stage."""

    ingest: IngestConfig = field(default_factory=IngestConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "data") -> "DataConfig":
        data = dict(data or {})
        kinds = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(kinds))
        if unknown:
            raise ConfigError(
                f"unknown section(s) in '{where}': {', '.join(unknown)} (known: {', '.join(kinds)})"
            )
        parts = {}
        for name, value in data.items():
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"'{where}.{name}' must be a mapping, got {value!r}")
            parts[name] = kinds[name].from_dict(value, f"{where}.{name}")
        return cls(**parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def override(self, assignments: dict[str, Any]) -> "DataConfig":
        """A copy with dotted keys replaced, e.g. {"shards.seq_len": 128} (CLI --set)."""
        data = self.to_dict()
        for key, value in assignments.items():
            section, _, name = key.partition(".")
            if section not in data or not name:
                raise ConfigError(f"--set {key}: expected SECTION.KEY with SECTION in {', '.join(data)}")
            data[section][name] = value
        return DataConfig.from_dict(data)


def load_params(path: str | Path | None, section: str = "data") -> DataConfig:
    """Read the data sections from a params.yaml; `section` is a dotted path ('' = top level)."""
    if path is None:
        return DataConfig()
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read params file {path}: {exc}") from None
    for part in [p for p in section.split(".") if p]:
        if not isinstance(data, dict) or part not in data:
            raise ConfigError(f"params file {path} has no section '{section}'")
        data = data[part]
    if not isinstance(data, dict):
        raise ConfigError(f"section '{section}' of {path} must be a mapping")
    return DataConfig.from_dict(data, section or "params")
