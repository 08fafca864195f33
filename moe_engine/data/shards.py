"""Token shards: fixed-length sequences in memory-mapped .npy files, plus a manifest.

Layout of a shards directory:
    manifest.json          counts per split and domain, sha256 of each shard, tokenizer hash
    train_00000.npy ...    [sequences, seq_len] uint16 (vocab <= 65535) or uint32
    val_00000.npy ...      held-out chunks of the same domains
    ood_00000.npy ...      whole documents of `ingest.ood_domains` (e.g. Milton), never trained on
    tokenizer/             the HF tokenizer directory the ids belong to
    documents.parquet      per-document statistics (the table validate.py checks)

Split: each document is cut at paragraph breaks into chunks of ~`chunk_chars` characters and
a chunk goes to "val" when sha256(seed, chunk text) falls below `val_fraction`. The decision
depends only on the chunk's text and the seed, so it is stable across runs, machines, corpus
order and tokenizers (DATA.md asks for exactly this).

Packing: chunks are tokenized, an eos id follows each document's last chunk, and each
(split, domain) stream is cut into rows of `seq_len`; rows never mix domains, so every row
has one domain label (`sequence_domains`) for routing-specialisation analysis. The tail of
each stream shorter than one row is dropped and counted in the manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moe_engine.data.config import ShardsConfig
from moe_engine.data.errors import RuleFailure, ShardIntegrityError
from moe_engine.data.ingest import Document
from moe_engine.data.tokenizer import Encoder, token_dtype

MANIFEST = "manifest.json"
FORMAT = "moe-lab-shards/1"
SPLITS = ("train", "val", "ood")
ENCODE_BATCH_CHARS = 1 << 20  # text handed to the tokenizer per call: enough for 2 threads


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Cut `text` into pieces of chunk_chars/2..chunk_chars, preferring paragraph, then line
    breaks; the pieces concatenate back to `text` exactly."""
    chunks, start = [], 0
    while len(text) - start > chunk_chars:
        lo, hi = start + chunk_chars // 2, start + chunk_chars
        cut = text.rfind("\n\n", lo, hi)
        if cut >= 0:
            cut += 2
        else:
            cut = text.rfind("\n", lo, hi)
            cut = hi if cut < 0 else cut + 1
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


def split_of(chunk: str, val_fraction: float, seed: int) -> str:
    """'val' for a `val_fraction` share of chunks, chosen by a hash of (seed, text)."""
    digest = hashlib.sha256(f"{seed}\0{chunk}".encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2.0**64 else "train"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class _SplitWriter:
    """Packs the token streams of one split into shards of [rows, seq_len]."""

    def __init__(self, out_dir: Path, split: str, cfg: ShardsConfig, dtype: np.dtype):
        self.out_dir, self.split, self.seq_len = out_dir, split, cfg.seq_len
        self.rows_BL = np.empty((max(1, cfg.tokens_per_shard // cfg.seq_len), cfg.seq_len), dtype)
        self.filled = 0
        self.runs: list[list[Any]] = []  # [domain, first row, end row] within the open shard
        self.pending: dict[str, np.ndarray] = {}  # per domain: tokens not yet a full row
        self.shards: list[dict[str, Any]] = []
        self.domains: dict[str, dict[str, int]] = {}

    def add(self, domain: str, ids: np.ndarray) -> None:
        stats = self.domains.setdefault(domain, {"chunks": 0, "tokens": 0, "sequences": 0})
        stats["chunks"] += 1
        stats["tokens"] += len(ids)
        stream = np.concatenate([self.pending.get(domain, ids[:0]), ids])
        n_rows = len(stream) // self.seq_len
        self.pending[domain] = stream[n_rows * self.seq_len:]
        stats["sequences"] += n_rows
        rows = stream[: n_rows * self.seq_len].reshape(n_rows, self.seq_len)
        while len(rows):
            take = min(len(rows), len(self.rows_BL) - self.filled)
            # ids >= vocab would wrap here; validation rejects them before anything is published.
            self.rows_BL[self.filled : self.filled + take] = rows[:take]
            if self.runs and self.runs[-1][0] == domain and self.runs[-1][2] == self.filled:
                self.runs[-1][2] += take
            else:
                self.runs.append([domain, self.filled, self.filled + take])
            self.filled += take
            rows = rows[take:]
            if self.filled == len(self.rows_BL):
                self._flush()

    def _flush(self) -> None:
        path = self.out_dir / f"{self.split}_{len(self.shards):05d}.npy"
        np.save(path, self.rows_BL[: self.filled])
        self.shards.append({"file": path.name, "sequences": self.filled,
                            "sha256": file_sha256(path), "domain_runs": self.runs})
        self.filled, self.runs = 0, []

    def finish(self) -> dict[str, Any]:
        if self.filled:
            self._flush()
        for domain, rest in self.pending.items():
            self.domains[domain]["dropped_tokens"] = len(rest)
        n = sum(s["sequences"] for s in self.shards)
        return {"sequences": n, "tokens": n * self.seq_len, "domains": self.domains, "shards": self.shards}


def write_shards(docs: Sequence[Document], encoder: Encoder, cfg: ShardsConfig,
                 ood_domains: Sequence[str], out_dir: Path, progress: bool = False,
                 ) -> tuple[dict[str, Any], np.ndarray]:
    """Tokenize, split and pack `docs` into shards in `out_dir`.

    Returns (splits summary for the manifest, per-document token stats [len(docs), 3] int64
    with columns n_tokens, min_token_id, max_token_id)."""
    from tqdm.auto import tqdm

    dtype = token_dtype(encoder.vocab_size)
    writers = {s: _SplitWriter(out_dir, s, cfg, dtype) for s in SPLITS}
    stats_D3 = np.zeros((len(docs), 3), dtype=np.int64)
    eos = np.array([encoder.eos_id], dtype=np.int64)
    batch: list[tuple[int, str, bool]] = []  # (doc index, chunk text, last chunk of doc)

    def run(batch: list[tuple[int, str, bool]]) -> None:
        for (d, chunk, last), ids in zip(batch, encoder.encode([c for _, c, _ in batch])):
            doc = docs[d]
            if last:
                ids = np.concatenate([ids, eos])
            if len(ids):
                n, lo, hi = stats_D3[d]
                stats_D3[d] = (n + len(ids), min(lo, ids.min()) if n else ids.min(), max(hi, ids.max()))
            ood = doc.domain in ood_domains
            split = "ood" if ood else split_of(chunk, cfg.val_fraction, cfg.seed)
            writers[split].add(doc.domain, ids)

    size = 0
    bar = tqdm(total=sum(len(d.text) for d in docs), desc="tokenize", unit="char",
               unit_scale=True, disable=None if progress else True)
    for d, doc in enumerate(docs):
        chunks = chunk_text(doc.text, cfg.chunk_chars)
        batch += [(d, c, i == len(chunks) - 1) for i, c in enumerate(chunks)]
        size += len(doc.text)
        if size >= ENCODE_BATCH_CHARS:
            run(batch)
            bar.update(size)
            batch, size = [], 0
    run(batch)
    bar.update(size)
    bar.close()
    splits = {s: w.finish() for s, w in writers.items() if w.domains}
    return splits, stats_D3


# ---------------------------------------------------------------- manifest and integrity


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")


def read_manifest(path: str | Path) -> dict[str, Any]:
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise _integrity("missing_manifest", f"{MANIFEST} exists (a complete shards directory)", file)
    except (OSError, ValueError) as exc:
        raise _integrity("unreadable_manifest", f"{MANIFEST} is valid JSON ({exc})", file)
    if manifest.get("format") != FORMAT:
        raise _integrity("manifest_format", f"format == {FORMAT!r}", file, f"got {manifest.get('format')!r}")
    return manifest


def _integrity(rule: str, description: str, file: Path, *examples: str) -> ShardIntegrityError:
    return ShardIntegrityError([RuleFailure(rule, description, 1, (str(file),), examples)])


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from an .npy header, without trusting the file size."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        return shape, dtype, f.tell()


def shard_problem(path: Path, shard: dict[str, Any], manifest: dict[str, Any]) -> tuple[str, str, str] | None:
    """(rule, description, example) if a shard file's structure does not match its manifest
    entry (missing, unreadable header, shape/dtype, truncated); None if it does. Cheap: reads
    only the header."""
    file = path / shard["file"]
    if not file.is_file():
        return "missing_shard", "every shard in the manifest exists", f"{file.name} not found"
    try:
        shape, dtype, offset = _header(file)
    except (ValueError, OSError) as exc:
        return "unreadable_shard", "shard has a valid .npy header", f"{file.name}: {exc}"
    want = (shard["sequences"], manifest["seq_len"])
    if tuple(shape) != want or dtype != np.dtype(manifest["dtype"]):
        return ("shape_mismatch", f"shape == [sequences, {manifest['seq_len']}] and dtype == {manifest['dtype']}",
                f"{file.name}: shape {list(shape)} {dtype}, manifest {list(want)}")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    size = file.stat().st_size
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        return ("truncated_shard", "file size == header + sequences * seq_len * itemsize",
                f"{file.name} {what}: {size} bytes, expected {expected}")
    return None


def verify_shards(path: str | Path, check_hash: bool = True, check_ids: bool = True) -> dict[str, Any]:
    """Check every shard against the manifest; raise ShardIntegrityError listing all problems.

    Rules: shard present, not truncated, shape/dtype as recorded, sha256 as recorded, token
    ids < vocab_size, tokenizer directory hash as recorded. Returns the manifest."""
    from moe_engine.data.tokenizer import tokenizer_hash

    path = Path(path)
    manifest = read_manifest(path)
    vocab = manifest["vocab_size"]
    found: dict[str, tuple[str, list[str], list[str]]] = {}  # rule -> (description, files, examples)

    def fail(rule: str, description: str, file: str, example: str) -> None:
        entry = found.setdefault(rule, (description, [], []))
        entry[1].append(file)
        entry[2].append(example)

    for info in manifest["splits"].values():
        for shard in info["shards"]:
            file = path / shard["file"]
            problem = shard_problem(path, shard, manifest)
            if problem:
                fail(problem[0], problem[1], str(file), problem[2])
                continue
            if check_hash and (digest := file_sha256(file)) != shard["sha256"]:
                fail("sha256_mismatch", "sha256 of the shard equals the manifest's", str(file),
                     f"{file.name}: sha256 {digest[:12]}..., manifest {shard['sha256'][:12]}...")
            if check_ids:
                ids_NL = np.load(file, mmap_mode="r")
                bad = np.argwhere(ids_NL >= vocab)  # [n_bad, 2] (row, col)
                if len(bad):
                    row, col = bad[0]
                    fail("token_id_out_of_range", f"token ids < vocab_size {vocab}", str(file),
                         f"{file.name}: {len(bad)} ids >= {vocab}, first {int(ids_NL[row, col])} at row {row}, col {col}")
    tok_dir = path / "tokenizer"
    if tok_dir.is_dir() and (digest := tokenizer_hash(tok_dir)) != manifest["tokenizer"]["sha256"]:
        fail("tokenizer_hash_mismatch", "tokenizer directory hash equals the manifest's", str(tok_dir),
             f"sha256 {digest[:12]}..., manifest {manifest['tokenizer']['sha256'][:12]}...")
    if found:
        raise ShardIntegrityError([
            RuleFailure(rule, desc, len(files), tuple(dict.fromkeys(files)), tuple(examples[:3]))
            for rule, (desc, files, examples) in found.items()
        ])
    return manifest


def sequence_domains(manifest: dict[str, Any], split: str = "train") -> tuple[list[str], np.ndarray]:
    """(domain names, [sequences] int32 index into names) for the rows of a split, in order."""
    info = manifest["splits"][split]
    names = sorted(info["domains"])
    ids = np.empty(info["sequences"], dtype=np.int32)
    offset = 0
    for shard in info["shards"]:
        for domain, start, stop in shard["domain_runs"]:
            ids[offset + start : offset + stop] = names.index(domain)
        offset += shard["sequences"]
    return names, ids
