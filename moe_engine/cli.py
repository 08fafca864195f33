"""``moe-lab``: one subcommand per pipeline stage. Each stage module registers its own parser
(``add_parser(subparsers)``) and stays importable without the heavy libraries, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# stage modules, in pipeline order
STAGES = (
    "moe_engine.data.cli",
    "moe_engine.training.cli",
    "moe_engine.evaluation.cli",
    "moe_engine.analytics.cli",
    "moe_engine.gate.cli",
    "moe_engine.tracking.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lab",
        description="Open MoE Trainer Lab: train, evaluate, analyse and export Mixture-of-Experts models. "
        "Each subcommand is one pipeline stage (the DVC stages in dvc.yaml call them).",
    )
    # the deepspeed launcher puts --local_rank=N right after the program, before the subcommand
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for name in STAGES:
        try:
            module = import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a stage not present in this build
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
