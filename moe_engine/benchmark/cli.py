"""``moe-lab benchmark``: lm-eval multiple-choice tasks on any Hugging Face model directories, side by side."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_models(items: list[str]) -> dict[str, Path]:
    from moe_engine.errors import ConfigError

    models: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not _NAME.match(name) or not path:
            raise ConfigError(f"--model {item!r}: expected NAME=DIR, e.g. --model moe=outputs/pretrain/model "
                              "(NAME: letters, digits, '_', '.', '-')")
        if name in models:
            raise ConfigError(f"--model {item!r}: the name {name!r} is given twice")
        models[name] = Path(path)
    return models


def run_benchmark(args: argparse.Namespace) -> int:
    from moe_engine.benchmark.config import BenchmarkConfig
    from moe_engine.benchmark.run import run
    from moe_engine.config import load_section, parse_sets
    from moe_engine.stages import sections

    models = parse_models(args.model)
    sets = parse_sets(args.set)
    for flag in ("limit", "device", "batch_size"):  # the flags win over params.yaml and --set
        if getattr(args, flag) is not None:
            sets[flag] = getattr(args, flag)
    if args.tasks is not None:
        sets["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    config = load_section(BenchmarkConfig, args.params, args.section, sets,
                          known_sections=sections() if args.params is not None else None)
    metrics = run(config, models, args.data, args.out)
    from moe_engine.tracking.lineage import stage_run  # a no-op unless MLFLOW_TRACKING_URI is set

    params = {**config.to_dict(), "models": {k: str(v) for k, v in models.items()}, "data": str(args.data)}
    stage_run("benchmark", params, metrics, [args.out / "metrics.json", args.out / "compare.md", args.out / "results"])
    print((args.out / "compare.md").read_text())
    print(f"metrics: {args.out / 'metrics.json'}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark", help="lm-eval multiple-choice benchmarks, MoE vs dense baselines (accuracy ± stderr)",
        description="Score Hugging Face model directories (MoE checkpoints get the engine's layers) on lm-eval tasks: "
        "WordNet gloss -> word, chatterbot topic and answer, stdlib docstring -> function (data/tasks/benchmark) and "
        "next-passage choice on the held-out val and ood shards of --data. Settings: the params.yaml 'benchmark' "
        "section (moe_engine.benchmark.config.BenchmarkConfig), then --set, then the flags. Writes metrics.json, "
        "compare.md and results/<model>.json to --out.",
    )
    p.add_argument("--model", action="append", default=[], required=True, metavar="NAME=DIR",
                   help="a model directory to score, named in the outputs (repeat; the first is compared with the rest)")
    p.add_argument("--data", type=Path, help="directory made by `moe-lab data prepare` (for the passage_val/ood tasks)")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmark"), help="output folder (replaced on success)")
    p.add_argument("--params", type=Path, help="params.yaml to read (default: built-in settings)")
    p.add_argument("--section", default="benchmark", help="params.yaml section (default: benchmark)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set limit=100 or --set tasks=[wordnet_gloss]")
    p.add_argument("--tasks", help="comma-separated task names (overrides benchmark.tasks)")
    p.add_argument("--limit", type=int, help="items per task, 0 = all (overrides benchmark.limit)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="overrides benchmark.batch_size")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides benchmark.device)")
    p.set_defaults(func=run_benchmark)
