"""``moe-lab analyze``: router analytics of one or more checkpoints over a dataset.

    moe-lab analyze ckpt/step100 ckpt/step400 --data outputs/data --out out/analysis [--params params.yaml]

``--data`` is a prepared shards directory (its held-out val and out-of-domain sequences: text the
model never trained on), a text file or folder of files (one domain each; needs ``--tokenizer``), or
pre-tokenised ``.pt``/``.npy`` ids. Input problems exit with code 2 and one readable line.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze",
        help="router analytics of checkpoints: PNG plots and an HTML report",
        description="Run checkpoints (save_pretrained directories, in training order; the last is the reference) over "
        "a dataset and write router analytics: plots, tables and report.html. Settings: the params.yaml section, then "
        "--set, then the flags (the command line wins).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", type=Path, help="model directories, oldest first")
    p.add_argument("--data", required=True, type=Path,
                   help="a shards directory (held-out splits), a text file or folder (one domain per file), or .pt/.npy ids")
    p.add_argument("--tokenizer", type=Path, help="Hugging Face tokenizer directory (needed for text input)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--params", type=Path, help="params.yaml to read")
    p.add_argument("--section", default="analyze", help="params.yaml section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting (repeatable)")
    for flag, help_ in (("--seq-len", "tokens per row of text input"), ("--batch-size", "sequences per forward"),
                        ("--max-tokens", "tokens per domain"), ("--max-bytes", "bytes read per text file"),
                        ("--min-token-count", "token specialisation: ignore rarer token ids")):
        p.add_argument(flag, type=int, help=f"{help_} (default: params, else built-in)")
    p.add_argument("--device", help="cpu or cuda (default: params, else cpu)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from moe_engine.analytics.analyze import AnalyzeConfig, analyze
    from moe_engine.config import load_section
    from moe_engine.stages import sections
    from moe_engine.tracking.lineage import stage_run

    flags = [f"{k}={getattr(args, k)}" for k in ("seq_len", "batch_size", "max_tokens", "max_bytes", "min_token_count", "device")
             if getattr(args, k) is not None]
    cfg = load_section(AnalyzeConfig, args.params, args.section, [*args.set, *flags],
                       known_sections=sections() if args.params is not None else None)
    result = analyze(args.checkpoints, args.data, args.out, args.tokenizer, cfg)
    run_id = stage_run("analyze", cfg.to_dict(), result.metrics, [result.report, *result.pngs.values()])  # no-op without tracking
    print(f"wrote {result.report}" + (f"; MLflow run {run_id}" if run_id else ""))
    return 0
