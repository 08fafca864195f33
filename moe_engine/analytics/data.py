"""A small, general loader for router analysis: token ids per domain, as ``{domain: ids_NS}``.

Accepted inputs:
- a text file, or a folder with one file per domain (domain = file name without suffixes), read
  as UTF-8 (``.xz``, ``.gz``, ``.bz2`` decompressed on the fly; only the first ``max_bytes``) and
  tokenised with any Hugging Face tokenizer directory (``AutoTokenizer``, offline);
- pre-tokenised ids: ``.pt`` (a tensor, or a dict domain -> tensor, via ``torch.load``) or
  ``.npy`` (an integer array), or a folder of such files (one domain per file).
Each domain's ids are cut into rows of ``seq_len`` tokens, at most ``max_tokens`` per domain.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path

import numpy as np
import torch

from moe_engine.errors import UserError

OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
TOKEN_FILES = {".pt", ".npy"}


def load_heldout_shards(path: Path, max_tokens: int) -> dict[str, torch.Tensor]:
    """``{domain: ids_NS}`` from the val and ood splits of a ``moe-lab data prepare`` directory: text
    the model never trained on (the in-domain held-out chunks and the out-of-domain documents), at most
    ``max_tokens`` per domain, rows as the shards store them."""
    from moe_engine.data.loader import ShardDataset
    from moe_engine.data.shards import read_manifest, sequence_domains

    manifest = read_manifest(path)
    out: dict[str, torch.Tensor] = {}
    for split in ("val", "ood"):
        if manifest["splits"].get(split, {}).get("sequences", 0) == 0:
            continue
        names, ids_N = sequence_domains(manifest, split)
        reader = ShardDataset(path, split=split, batch_size=1, shuffle=False, epochs=1, drop_last=False)
        rows = max(1, max_tokens // manifest["seq_len"])
        for i, name in enumerate(names):
            index = np.flatnonzero(ids_N == i)[:rows]
            if len(index):
                out[name] = torch.from_numpy(reader.read(index))
    if not out:
        raise AnalyticsError(f"{path}: no held-out (val/ood) sequences to analyse")
    return out


class AnalyticsError(UserError, ValueError):
    """A problem with the user's input that a message can explain (the CLI prints it, exit code 2)."""


def domain_name(path: Path) -> str:
    """'kjv_bible.txt.xz' -> 'kjv_bible': without a compression suffix and one format suffix."""
    name = path.name
    for strip in (lambda ext: "." + ext.lower() in OPENERS, lambda ext: True):
        base, dot, ext = name.rpartition(".")
        if dot and base and strip(ext):
            name = base
    return name


def _is_tokens(path: Path) -> bool:
    return path.suffix.lower() in TOKEN_FILES


def read_text(path: Path, max_bytes: int) -> str:
    opener = OPENERS.get(path.suffix.lower(), open)
    try:
        with opener(path, "rb") as f:
            raw = f.read(max_bytes)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise AnalyticsError(f"{path}: cannot read ({exc})") from None
    return raw.decode("utf-8", errors="replace")  # a cut may split the last character: replaced


def read_token_ids(path: Path) -> dict[str, torch.Tensor]:
    """``{domain: ids}`` (1-D or 2-D long) from a .pt or .npy file."""
    try:
        if path.suffix.lower() == ".npy":
            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load and np.load raise many kinds
        raise AnalyticsError(f"{path}: cannot load token ids ({type(exc).__name__}: {exc})") from None
    items = obj.items() if isinstance(obj, dict) else [(domain_name(path), obj)]
    out = {}
    for domain, ids in items:
        if not torch.is_tensor(ids) or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() not in (1, 2):
            raise AnalyticsError(f"{path}: {domain!r} is not a 1-D or 2-D integer tensor of token ids")
        out[str(domain)] = ids.long()
    return out


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise AnalyticsError(f"{path}: tokenizer directory not found")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, ...
        raise AnalyticsError(f"{path}: cannot load tokenizer ({type(exc).__name__}: {exc})") from None


def _rows(ids: torch.Tensor, seq_len: int, max_tokens: int, domain: str) -> torch.Tensor:
    flat = ids.reshape(-1)[:max_tokens]
    if flat.numel() < seq_len:
        if flat.numel() == 0:
            raise AnalyticsError(f"domain {domain!r} has no tokens")
        return flat[None, :]  # a short domain is one shorter row
    return flat[: flat.numel() // seq_len * seq_len].view(-1, seq_len)


def load_dataset(
    path: Path | str,
    tokenizer: Path | str | None = None,
    *,
    seq_len: int = 128,
    max_tokens: int = 16_384,
    max_bytes: int = 200_000,
) -> dict[str, torch.Tensor]:
    """``{domain: ids_NS}`` from a file or folder; see the module docstring. ``tokenizer`` is a
    tokenizer directory or an already loaded tokenizer."""
    path = Path(path)
    if not path.exists():
        raise AnalyticsError(f"{path}: no such file or folder")
    if (path / "manifest.json").is_file():  # a prepared shards directory: its held-out sequences
        return load_heldout_shards(path, max_tokens)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    if not files:
        raise AnalyticsError(f"{path}: folder has no files")
    texts = {f: read_text(f, max_bytes) for f in files if not _is_tokens(f)}  # file errors before tokenizer errors
    tok = None
    if texts:
        if tokenizer is None:
            raise AnalyticsError(
                f"{next(iter(texts))} is text: pass a tokenizer directory (--tokenizer) or pre-tokenised .pt/.npy ids"
            )
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    ids: dict[str, torch.Tensor] = {}
    for f in files:
        found = {domain_name(f): _encode(tok, texts[f])} if f in texts else read_token_ids(f)
        for domain in found:
            if domain in ids:
                raise AnalyticsError(f"{f}: domain {domain!r} appears twice in {path}")
        ids.update(found)
    return {d: _rows(x, seq_len, max_tokens, d) for d, x in ids.items()}


def _encode(tok, text: str) -> torch.Tensor:
    backend = getattr(tok, "backend_tokenizer", None)  # fast path: the Rust tokenizer, no length warnings
    if backend is not None:
        return torch.tensor(backend.encode(text, add_special_tokens=False).ids, dtype=torch.long)
    ids = tok.encode(text, add_special_tokens=False)
    return torch.tensor(ids, dtype=torch.long)
