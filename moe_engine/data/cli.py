"""`moe-lab data ...`: the data stage commands (each one a DVC stage).

    moe-lab data tokenizer [SOURCE ...] --out DIR [--vocab-size N | --pretrained DIR]
    moe-lab data shards    [SOURCE ...] --tokenizer DIR --out DIR [--seq-len N]
    moe-lab data prepare   [SOURCE ...] [--out DIR]          # tokenizer + shards in one go
    moe-lab data validate  PATH ... [--report DIR] [--metrics FILE]

SOURCE: a file or folder (text, jsonl, parquet; plain, .xz, .gz, .bz2), or DOMAIN=PATH;
none = the committed demo corpus. Every command takes `--params params.yaml` (sections
`data.ingest|tokenizer|shards|validation`, see config.py) and `--set SECTION.KEY=VALUE`.
A data problem prints its message (rule, count, files, examples) and exits 2.

The lead wires it into moe_engine/cli.py with `add_parser(subparsers)`; `main()` runs it alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from moe_engine.data.config import DataConfig, load_params
from moe_engine.errors import ConfigError, UserError

SOURCES_HELP = "files/folders to read (text, jsonl, parquet; .xz/.gz/.bz2), or DOMAIN=PATH; default: data/demo"


def _config(args: argparse.Namespace) -> DataConfig:
    from moe_engine.config import parse_sets

    overrides: dict[str, Any] = parse_sets(args.set)  # "128" -> 128, "[a, b]" -> list, "1e-3" -> 0.001
    for flag, key in (("vocab_size", "tokenizer.vocab_size"), ("pretrained", "tokenizer.pretrained"),
                      ("seq_len", "shards.seq_len")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    return load_params(args.params, args.section).override(overrides)


def _tokenizer(args: argparse.Namespace) -> None:
    from moe_engine.data.pipeline import make_tokenizer
    from moe_engine.data.tokenizer import load_tokenizer, tokenizer_hash

    out = make_tokenizer(args.sources, args.out, _config(args), progress=not args.quiet)
    print(f"tokenizer: {out} (vocab {len(load_tokenizer(out))}, sha256 {tokenizer_hash(out)[:12]})")


def _shards(args: argparse.Namespace) -> None:
    from moe_engine.data.pipeline import prepare
    from moe_engine.data.shards import read_manifest

    out = prepare(args.sources, args.out, _config(args), tokenizer=args.tokenizer, progress=not args.quiet)
    manifest = read_manifest(out)
    splits = ", ".join(f"{s} {v['sequences']}" for s, v in manifest["splits"].items())
    print(f"shards: {out} ({manifest['documents']} documents, {manifest['tokens']:,} tokens;"
          f" sequences of {manifest['seq_len']}: {splits})")
    print(f"report: {out / manifest['validation']['report']}")
    from moe_engine.tracking.lineage import stage_run  # a no-op unless MLFLOW_TRACKING_URI is set

    stage_run("data", params=manifest.get("config", {}), metrics={"documents": manifest["documents"], "tokens": manifest["tokens"]},
              artifacts=[out / "manifest.json"])


def _validate(args: argparse.Namespace) -> None:
    from moe_engine.data.pipeline import validate_data

    summary = validate_data(args.paths, _config(args), args.report)
    if args.metrics:  # atomically, with a readable error for a folder that cannot be made
        from moe_engine.io import write_json

        write_json(args.metrics, summary)
    print(f"valid: {summary['documents']} documents"
          + (f", {summary['tokens']:,} tokens in shards" if "tokens" in summary else "")
          + (f"; report: {summary['report']}" if "report" in summary else ""))


def _guarded(command: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    """Data problems end as one readable message and exit code 2; bugs keep tracebacks."""
    def run(args: argparse.Namespace) -> int:
        try:
            command(args)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=Path, help="params.yaml to read the data sections from")
    p.add_argument("--section", default="data", help="dotted key of the data sections in --params (default: data)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set shards.seq_len=128 (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `data` with its sub-commands on an argparse subparsers object."""
    data = subparsers.add_parser("data", help="raw text -> tokenizer -> validated token shards",
                                 description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = data.add_subparsers(dest="data_command", required=True, metavar="<command>")

    p = sub.add_parser("tokenizer", help="train a byte-level BPE (or adopt an HF tokenizer dir)",
                       description="Train a byte-level BPE on the sources (out-of-domain sources excluded), or copy"
                                   " --pretrained; writes an HF tokenizer directory that AutoTokenizer loads.")
    p.add_argument("sources", nargs="*", help=SOURCES_HELP)
    p.add_argument("--out", required=True, type=Path, help="tokenizer directory to write")
    p.add_argument("--vocab-size", type=int, help="vocabulary size of the trained BPE (tokenizer.vocab_size)")
    p.add_argument("--pretrained", help="HF tokenizer directory to use instead of training")
    _common(p)
    p.set_defaults(func=_guarded(_tokenizer))

    for name, summary in (("shards", "tokenize sources with --tokenizer into validated shards"),
                          ("prepare", "tokenizer + shards in one call (trains the tokenizer unless --tokenizer)")):
        p = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] +
                           ". Output: manifest.json, {train,val,ood}_NNNNN.npy, tokenizer/, documents.parquet,"
                           " validation/index.html; written to a temporary name and renamed when all checks pass.")
        p.add_argument("sources", nargs="*", help=SOURCES_HELP)
        p.add_argument("--tokenizer", type=Path, required=name == "shards", help="HF tokenizer directory")
        p.add_argument("--out", type=Path, required=name == "shards", default=Path("outputs/data"),
                       help="shards directory to write (default for prepare: outputs/data)")
        p.add_argument("--seq-len", type=int, help="tokens per sequence (shards.seq_len)")
        if name == "prepare":
            p.add_argument("--vocab-size", type=int, help="vocabulary size of the trained BPE")
        _common(p)
        p.set_defaults(func=_guarded(_shards))

    p = sub.add_parser("validate", help="check a shards directory or raw sources",
                       description="Check a shards directory (manifest, sha256, sizes, token ids, document table)"
                                   " or raw sources (document table) with pandera and Great Expectations.")
    p.add_argument("paths", nargs="*", help="a shards directory, or sources as for `prepare`")
    p.add_argument("--report", type=Path, help="write Great Expectations Data Docs (HTML) here")
    p.add_argument("--metrics", type=Path, help="write summary metrics as JSON here (DVC metrics)")
    _common(p)
    p.set_defaults(func=_guarded(_validate))
    return data

