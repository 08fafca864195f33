"""The data stage end to end: raw corpus -> documents -> tokenizer -> validated shards.

    prepare(sources=None, out_dir="outputs/data", config=None, tokenizer=None) -> Path
    make_tokenizer(sources, out_dir, config=None) -> Path
    validate_data(path_or_sources, config=None, report_dir=None) -> dict

Outputs are built in a hidden sibling directory and renamed into place only after every
check passed, so a directory with a manifest.json is complete and valid; a failed or
interrupted run leaves the previous output untouched (and no temporary behind) and, when
Great Expectations ran, its report in `<out>.validation-failed/`.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

from moe_engine.data.config import DataConfig
from moe_engine.data.errors import ConfigError, DataValidationError
from moe_engine.data.ingest import Document, Source, read_documents
from moe_engine.data.shards import FORMAT, MANIFEST, verify_shards, write_manifest, write_shards
from moe_engine.data.tokenizer import Encoder, build_tokenizer, load_tokenizer, token_dtype, tokenizer_hash
from moe_engine.data.validate import document_table, validate_documents
from moe_engine.io import atomic_output

DEMO_DIR = Path(__file__).resolve().parents[2] / "data" / "demo"
SourceLike = Union[str, Path, Source]


def demo_sources() -> list[Source]:
    """The committed demo corpus: one source (= one domain) per file of data/demo."""
    files = sorted(DEMO_DIR.glob("*.xz")) if DEMO_DIR.is_dir() else []
    if not files:
        raise ConfigError(f"no sources given and the demo corpus {DEMO_DIR} is missing")
    # Relative to the working directory when inside it, so manifests do not name the machine.
    cwd = Path.cwd()
    return [Source(p.relative_to(cwd) if p.is_relative_to(cwd) else p) for p in files]


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` only if the block succeeds; on any failure
    (a bad input, Ctrl-C, SIGTERM through moe-lab) the previous `out` is left as it was."""
    out = Path(out)
    if out.exists():
        ours = (out / MANIFEST).exists() or (out / "tokenizer_config.json").exists() or \
            (out.is_dir() and not any(out.iterdir()))
        if not ours:
            raise ConfigError(f"{out} exists and is not a moe-lab data output; refusing to replace it")
    with atomic_output(out) as tmp:
        yield tmp


def ingest(sources: Sequence[SourceLike] | None, config: DataConfig, progress: bool = False) -> list[Document]:
    """Read and check the raw documents (pandera only: fast, and stops before any training)."""
    docs = read_documents(sources or demo_sources(), config.ingest, progress)
    validate_documents(document_table(docs), config.validation)
    return docs


def _training_texts(docs: Sequence[Document], config: DataConfig) -> Iterator[str]:
    # Out-of-domain text must stay unseen, by the tokenizer too.
    return (d.text for d in docs if d.domain not in config.ingest.ood_domains)


def make_tokenizer(sources: Sequence[SourceLike] | None, out_dir: str | Path,
                   config: DataConfig | None = None, progress: bool = False) -> Path:
    """Train (or adopt `tokenizer.pretrained`) and save an HF tokenizer directory."""
    config = config or DataConfig()
    docs = [] if config.tokenizer.pretrained else ingest(sources, config, progress)
    with atomic_dir(out_dir) as tmp:
        build_tokenizer(_training_texts(docs, config), config.tokenizer, tmp, progress)
    return Path(out_dir)


def prepare(sources: Sequence[SourceLike] | None = None, out_dir: str | Path = "outputs/data",
            config: DataConfig | None = None, tokenizer: str | Path | None = None,
            progress: bool = False) -> Path:
    """Raw corpus -> validated shards directory (with its tokenizer); returns `out_dir`.

    sources: files/folders, optionally 'DOMAIN=PATH'; None = the committed demo corpus.
    tokenizer: an existing HF tokenizer directory to use as is; None = build one from
    `config.tokenizer` (train a BPE, or copy `tokenizer.pretrained`)."""
    config = config or DataConfig()
    out_dir = Path(out_dir)
    sources = [Source.parse(s) for s in (sources or demo_sources())]
    docs = ingest(sources, config, progress)
    with atomic_dir(out_dir) as tmp:
        tok_dir = tmp / "tokenizer"
        if tokenizer is not None:
            load_tokenizer(tokenizer)  # fail early and readably if it is not one
            shutil.copytree(tokenizer, tok_dir)
        else:
            build_tokenizer(_training_texts(docs, config), config.tokenizer, tok_dir, progress)
        _write_shards(sources, docs, tok_dir, tmp, out_dir, config, progress)
    return out_dir


def _write_shards(sources: Sequence[Source], docs: Sequence[Document], tok_dir: Path, tmp: Path, out_dir: Path,
                  config: DataConfig, progress: bool) -> None:
    encoder = Encoder(load_tokenizer(tok_dir))
    splits, token_stats_D3 = write_shards(docs, encoder, config.shards, config.ingest.ood_domains, tmp, progress)
    table = document_table(docs, token_stats_D3)
    table.to_parquet(tmp / "documents.parquet", index=False)
    try:
        summary = validate_documents(table, config.validation, encoder.vocab_size, tmp / "validation")
    except DataValidationError as exc:
        if exc.report is None:
            raise
        failed = out_dir.parent / f"{out_dir.name}.validation-failed"
        shutil.rmtree(failed, ignore_errors=True)
        shutil.move(str(tmp / "validation"), failed)
        raise exc.with_report(str(failed / "index.html")) from None
    summary["report"] = "validation/index.html"
    domains = table.groupby("domain").agg(documents=("n_chars", "size"), chars=("n_chars", "sum"))
    write_manifest(tmp, {
        "format": FORMAT,
        "seq_len": config.shards.seq_len,
        "dtype": token_dtype(encoder.vocab_size).name,
        "vocab_size": encoder.vocab_size,
        "eos_id": encoder.eos_id,
        "tokenizer": {"dir": "tokenizer", "sha256": tokenizer_hash(tok_dir)},
        "sources": [f"{s.domain}={s.path}" if s.domain else str(s.path) for s in sources],
        "documents": len(docs),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "domains": {name: {"documents": int(row.documents), "chars": int(row.chars),
                           "ood": name in config.ingest.ood_domains} for name, row in domains.iterrows()},
        "splits": splits,
        "validation": summary,
        "config": config.to_dict(),
    })
    # Read back what was written before publishing it: hashes, sizes, ids < vocab.
    verify_shards(tmp)


def validate_data(path_or_sources: Sequence[SourceLike], config: DataConfig | None = None,
                  report_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate a shards directory (integrity + its document table) or raw sources.

    Raises DataValidationError / ShardIntegrityError; returns summary metrics."""
    import pandas as pd

    config = config or DataConfig()
    items = list(path_or_sources)
    if len(items) == 1 and (Path(str(items[0])) / MANIFEST).exists():
        path = Path(str(items[0]))
        manifest = verify_shards(path)
        table = pd.read_parquet(path / "documents.parquet")
        summary = validate_documents(table, config.validation, manifest["vocab_size"], report_dir)
        summary |= {"tokens": manifest["tokens"],
                    "sequences": {s: v["sequences"] for s, v in manifest["splits"].items()}}
        return summary
    docs = read_documents(items or demo_sources(), config.ingest)
    return validate_documents(document_table(docs), config.validation, None, report_dir)
