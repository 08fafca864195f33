"""``moe-lab evaluate``: perplexity in/out of domain, loss per domain, MoE vs dense table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run_evaluate(args: argparse.Namespace) -> int:
    from moe_engine.evaluation.evaluate import run

    try:
        settings = {"batch_size": args.batch_size, "max_sequences": args.max_sequences}
        if args.params is not None:
            from moe_engine.training.cli import _load_section

            section = _load_section(args.params, args.section)
            unknown = set(section) - set(settings)
            if unknown:
                raise ValueError(f"unknown evaluate setting(s) {sorted(unknown)} in {args.params}; valid: {sorted(settings)}")
            settings.update(section)
        metrics = run(args.data, args.moe, args.out, args.dense, settings["batch_size"], settings["max_sequences"])
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from moe_engine.tracking.lineage import stage_run  # a no-op unless MLFLOW_TRACKING_URI is set

    stage_run("evaluate", settings, metrics, [Path(args.out) / "metrics.json", Path(args.out) / "compare.md"])
    print((Path(args.out) / "compare.md").read_text())
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    return 0 if metrics else 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="validation/OOD perplexity, loss per domain, MoE vs dense baseline",
        description="Evaluate a pretrain run (and optionally its dense baseline) on the held-out shards. "
        "Writes metrics.json (DVC metrics), domain_loss.csv (DVC plots) and compare.md to --out.",
    )
    p.add_argument("--data", type=Path, required=True, help="directory made by `moe-lab data prepare`")
    p.add_argument("--moe", type=Path, required=True, help="--out directory of the MoE `moe-lab pretrain` run")
    p.add_argument("--dense", type=Path, help="--out directory of the dense-baseline run")
    p.add_argument("--out", type=Path, default=Path("outputs/evaluate"))
    p.add_argument("--params", type=Path, help="params.yaml; its --section overrides the flags below")
    p.add_argument("--section", default="evaluate")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-sequences", type=int, default=0, help="cap per split (0 = all)")
    p.set_defaults(func=run_evaluate)
