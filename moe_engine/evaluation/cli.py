"""``moe-lab evaluate``: perplexity in/out of domain, loss per domain, MoE vs dense table."""

from __future__ import annotations

import argparse
from pathlib import Path


def run_evaluate(args: argparse.Namespace) -> int:
    from moe_engine.config import load_section
    from moe_engine.evaluation.config import EvaluateConfig
    from moe_engine.evaluation.evaluate import run
    from moe_engine.stages import sections

    flags = {k: v for k, v in (("batch_size", args.batch_size), ("max_sequences", args.max_sequences)) if v is not None}
    config = load_section(EvaluateConfig, args.params, args.section, [*args.set, *(f"{k}={v}" for k, v in flags.items())],
                          known_sections=sections() if args.params is not None else None)
    metrics = run(args.data, args.moe, args.out, args.dense, config.batch_size, config.max_sequences)
    from moe_engine.tracking.lineage import stage_run  # a no-op unless MLFLOW_TRACKING_URI is set

    stage_run("evaluate", config.to_dict(), metrics, [Path(args.out) / "metrics.json", Path(args.out) / "compare.md"])
    print((Path(args.out) / "compare.md").read_text())
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="validation/OOD perplexity, loss per domain, MoE vs dense baseline",
        description="Evaluate a pretrain run (and optionally its dense baseline) on the held-out shards. "
        "Writes metrics.json (DVC metrics), domain_loss.csv (DVC plots) and compare.md to --out. "
        "Settings: the params.yaml section, then --set, then the flags below (the command line wins).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=Path, required=True, help="directory made by `moe-lab data prepare`")
    p.add_argument("--moe", type=Path, required=True, help="--out directory of the MoE `moe-lab pretrain` run")
    p.add_argument("--dense", type=Path, help="--out directory of the dense-baseline run")
    p.add_argument("--out", type=Path, default=Path("outputs/evaluate"), help="folder to write")
    p.add_argument("--params", type=Path, help="params.yaml to read")
    p.add_argument("--section", default="evaluate", help="params.yaml section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument("--batch-size", type=int, help="sequences per forward (default: params, else 16)")
    p.add_argument("--max-sequences", type=int, help="cap per split, spread evenly over domains (default: params, else 0 = all)")
    p.set_defaults(func=run_evaluate)
