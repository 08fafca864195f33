"""Read raw corpora into documents.

A *source* is a file or a folder (searched recursively), optionally labelled `DOMAIN=PATH`:
- text files: documents separated by a line equal to `ingest.delimiter`; a file without that
  line is one document, so a folder of plain .txt files gives one document per file;
- jsonl (`.jsonl`, `.ndjson`): one JSON object per line, text in `ingest.text_field`;
- parquet (`.parquet`): a string (or binary) column `ingest.text_field`.
Any of them may be compressed as .xz, .gz or .bz2. Bytes are decoded as UTF-8 with invalid
sequences replaced and *counted*: whether a share of bad documents is acceptable is a
validation rule (validate.py), not the reader's call. Structural problems the reader cannot
work around (a jsonl row without the text field, a corrupt archive) raise `IngestError`.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from moe_engine.data.config import IngestConfig
from moe_engine.data.errors import IngestError

COMPRESSED = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
JSONL = {".jsonl", ".ndjson"}
PARQUET = {".parquet", ".pq"}
TEXT = {".txt", ".text", ".md", ".rst", ".py"}  # only stripped when naming a domain


@dataclass(frozen=True)
class Source:
    path: Path
    domain: str | None = None  # None: derived from the path (see IngestConfig.domain_by)

    @classmethod
    def parse(cls, spec: str | Path | Source) -> Source:
        """'PATH' or 'DOMAIN=PATH' (an existing path containing '=' is taken as a path)."""
        if isinstance(spec, Source):
            return spec
        text = str(spec)
        domain, sep, path = text.partition("=")
        if sep and domain and "/" not in domain and not Path(text).exists():
            return cls(Path(path), domain)
        return cls(Path(text))


@dataclass
class Document:
    text: str  # decoded, surrounding whitespace stripped
    source: str  # the file it came from
    index: int  # position within that file (row for jsonl/parquet)
    domain: str
    n_bytes: int  # raw size before decoding
    invalid_utf8: int  # invalid UTF-8 sequences, replaced by U+FFFD


def stem(path: Path) -> str:
    """'milton.txt.xz' -> 'milton': the name without compression and format suffixes."""
    name = path.name
    for suffixes in (COMPRESSED, JSONL | PARQUET | TEXT):
        base, dot, ext = name.rpartition(".")
        if dot and base and "." + ext.lower() in suffixes:
            name = base
    return name


def format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    last = suffixes[-1] if suffixes else ""
    return "jsonl" if last in JSONL else "parquet" if last in PARQUET else "text"


def list_files(source: Source) -> list[Path]:
    path = source.path
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
        if not files:
            raise IngestError(f"{path}: folder contains no files")
        return files
    raise IngestError(f"{path}: source not found")


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def read_bytes(path: Path) -> bytes:
    opener = COMPRESSED.get(path.suffix.lower())
    try:
        if opener is None:
            return path.read_bytes()
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise IngestError(f"{path}: cannot read ({exc})") from None


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """(text, number of invalid UTF-8 sequences); invalid ones become U+FFFD."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD already present in the input is not an error; only count new ones.
        return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def split_text(raw: bytes, delimiter: str) -> list[bytes]:
    """Split on lines equal to the delimiter; a final delimiter terminates, not separates."""
    if not delimiter:
        return [raw]
    line = re.compile(rb"^[ \t]*" + re.escape(delimiter.encode()) + rb"[ \t]*\r?$", re.M)
    parts = line.split(raw)
    if len(parts) > 1 and not parts[-1].strip():
        parts.pop()
    return parts


def _text_documents(path: Path, raw: bytes, domain: str, cfg: IngestConfig) -> Iterator[Document]:
    for i, part in enumerate(split_text(raw, cfg.delimiter)):
        text, bad = decode_utf8(part)
        yield Document(text.strip(), str(path), i, domain, len(part), bad)


def _jsonl_documents(path: Path, raw: bytes, domain: str, cfg: IngestConfig) -> Iterator[Document]:
    rows: list[tuple[int, dict, int, int]] = []  # (line number, row, bytes, invalid utf8)
    problems: dict[str, list[int]] = {}
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        text, bad = decode_utf8(line)
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            problems.setdefault("are not valid JSON", []).append(number)
            continue
        if not isinstance(row, dict):
            problems.setdefault("are not JSON objects", []).append(number)
        elif row.get(cfg.text_field) is None:
            problems.setdefault(f"have no text field '{cfg.text_field}'", []).append(number)
        elif not isinstance(row[cfg.text_field], str):
            problems.setdefault(f"have a non-string '{cfg.text_field}'", []).append(number)
        else:
            rows.append((number, row, len(line), bad))
    if problems:
        total = len(rows) + sum(len(v) for v in problems.values())
        raise IngestError(f"{path}: " + "; ".join(
            f"{len(lines)} of {total} rows {what} ({_few(lines, 'line')})" for what, lines in problems.items()
        ))
    for i, (_, row, n_bytes, bad) in enumerate(rows):
        text = row[cfg.text_field]
        # JSON escapes can carry lone surrogates, which are not encodable text either.
        bad += sum(1 for ch in text if "\ud800" <= ch <= "\udfff")
        if bad:
            text = text.encode("utf-8", errors="replace").decode("utf-8")
        yield Document(text.strip(), str(path), i, _row_domain(row, domain, cfg), n_bytes, bad)


def _parquet_documents(path: Path, raw: bytes, domain: str, cfg: IngestConfig) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"{path}: not a readable parquet file ({exc})") from None
    if cfg.text_field not in table.column_names:
        raise IngestError(
            f"{path}: no column '{cfg.text_field}' (columns: {', '.join(table.column_names)})"
        )
    kind = table.schema.field(cfg.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind) or pa.types.is_null(kind)):
        raise IngestError(f"{path}: column '{cfg.text_field}' holds {kind}, not text; point ingest.text_field at the "
                          f"column with the documents (columns: {', '.join(table.column_names)})")
    columns = [cfg.text_field] + ([cfg.domain_field] if cfg.domain_field in table.column_names else [])
    rows = table.select(columns).to_pylist()
    missing = [i for i, row in enumerate(rows) if row[cfg.text_field] is None]
    if missing:
        raise IngestError(
            f"{path}: {len(missing)} of {len(rows)} rows have a null '{cfg.text_field}' ({_few(missing, 'row')})"
        )
    for i, row in enumerate(rows):
        value = row[cfg.text_field]
        raw_text = value if isinstance(value, bytes) else value.encode("utf-8")
        text, bad = decode_utf8(raw_text)
        yield Document(text.strip(), str(path), i, _row_domain(row, domain, cfg), len(raw_text), bad)


def _row_domain(row: dict, default: str, cfg: IngestConfig) -> str:
    value = row.get(cfg.domain_field) if cfg.domain_field else None
    return str(value) if value not in (None, "") else default


def _few(items: list[int], noun: str, n: int = 5) -> str:
    """'line 4' / 'lines 2, 3, ...': where the problems are, without flooding the message."""
    listed = ", ".join(map(str, items[:n])) + (", ..." if len(items) > n else "")
    return f"{noun}{'s' if len(items) > 1 else ''} {listed}"


READERS = {"text": _text_documents, "jsonl": _jsonl_documents, "parquet": _parquet_documents}


def iter_documents(sources: Iterable[str | Path | Source], cfg: IngestConfig | None = None,
                   progress: bool = False) -> Iterator[Document]:
    """Documents of all sources, in order (sources as given, files sorted within folders)."""
    from tqdm.auto import tqdm

    cfg = cfg or IngestConfig()
    jobs = []
    for source in map(Source.parse, sources):
        for path in list_files(source):
            default = stem(path) if cfg.domain_by == "file" else stem(source.path)
            jobs.append((path, source.domain or default))
    for path, domain in tqdm(jobs, desc="read", unit="file", disable=None if progress else True):
        yield from READERS[format_of(path)](path, read_bytes(path), domain, cfg)


def read_documents(sources: Iterable[str | Path | Source], cfg: IngestConfig | None = None,
                   progress: bool = False) -> list[Document]:
    sources = list(sources)
    docs = list(iter_documents(sources, cfg, progress))
    if not docs:
        raise IngestError("no documents found in: " + ", ".join(map(str, sources)))
    return docs
