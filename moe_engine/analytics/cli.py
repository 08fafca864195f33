"""``moe-lab analyze``: router analytics of one or more checkpoints over a dataset.

    moe-lab analyze ckpt/step100 ckpt/step400 --data data/demo --tokenizer tok/ --out out/analysis \
        [--seq-len 128] [--batch-size 8] [--max-tokens 16384] [--max-bytes 200000] [--min-token-count 8] \
        [--device cpu] [--mlflow-uri URI] [--mlflow-experiment router-analytics]

``add_parser(subparsers)`` registers the subcommand on the ``moe-lab`` parser (``moe_engine/cli.py``;
``python -m moe_engine.cli analyze ...`` without the console script). Input problems print one line and
exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze",
        help="router analytics of checkpoints: PNG plots and an HTML report",
        description="Run checkpoints (save_pretrained directories, in training order; the last is the "
        "reference) over a dataset and write router analytics: plots, tables and report.html.",
    )
    p.add_argument("checkpoints", nargs="+", type=Path, help="model directories, oldest first")
    p.add_argument("--data", required=True, type=Path,
                   help="a text file, a folder with one file per domain (.txt/.xz/.gz/.bz2), or .pt/.npy token ids")
    p.add_argument("--tokenizer", type=Path, help="Hugging Face tokenizer directory (needed for text)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16_384, help="tokens per domain")
    p.add_argument("--max-bytes", type=int, default=200_000, help="bytes read per text file")
    p.add_argument("--min-token-count", type=int, default=8, help="token specialisation: ignore rarer token ids")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="also log the outputs as artifacts of an MLflow run at this tracking URI "
                   "(default: $MLFLOW_TRACKING_URI, so pipeline runs log it)")
    p.add_argument("--mlflow-experiment", default="router-analytics")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from moe_engine.analytics.analyze import AnalyzeConfig, analyze
    from moe_engine.analytics.data import AnalyticsError

    for name in ("seq_len", "batch_size", "max_tokens", "max_bytes", "min_token_count"):
        if getattr(args, name) <= 0:
            print(f"moe-lab analyze: error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    cfg = AnalyzeConfig(seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                        max_bytes=args.max_bytes, min_token_count=args.min_token_count, device=args.device)
    try:
        result = analyze(args.checkpoints, args.data, args.out, args.tokenizer, cfg)
        if args.mlflow_uri:
            from moe_engine.tracking.analytics_artifacts import log_analysis

            run_id = log_analysis(result.out_dir, args.mlflow_uri, args.mlflow_experiment, metrics=result.metrics)
            print(f"logged to MLflow run {run_id}")
    except (AnalyticsError, OSError, ValueError) as exc:  # FileNotFoundError is an OSError
        print(f"moe-lab analyze: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.report}")
    return 0

