"""``moe-lab``: one subcommand per pipeline stage. Each stage module registers its own parser
(``add_parser(subparsers)``) and stays importable without the heavy libraries, so ``--help`` is fast.

Exit codes: 0 success; 2 a user's mistake (bad setting, missing or malformed input), printed as one
readable message without a traceback (:class:`moe_engine.errors.UserError`); 1 a bug (traceback);
a gate regression is reported by ``moe-lab gate`` with 1. SIGTERM cleans up like Ctrl-C: a stopped
run leaves the previous outputs intact.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from moe_engine.stages import COMMANDS as STAGES  # the one registry of commands and stages


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lab",
        description="Open MoE Trainer Lab: train, evaluate, analyse and export Mixture-of-Experts models. "
        "Each subcommand is one pipeline stage (the DVC stages in dvc.yaml call them).",
    )
    # the deepspeed launcher puts --local_rank=N right after the program, before the subcommand
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    from moe_engine import __version__

    parser.add_argument("--version", action="version", version=f"moe-lab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name in STAGES:
        try:
            module = import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a stage not present in this build
                continue
            raise
        module.add_parser(sub)
    _show_defaults(parser)
    return parser


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help when it has a real default its text does not state
    already (no ``(default: None)``, no default said twice)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, [], "") or default is argparse.SUPPRESS
                or action.option_strings == [] or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every command and subcommand lists its options' defaults in --help (one style at every level)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if child.formatter_class in (argparse.HelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
                    child.formatter_class = DefaultsHelpFormatter
                _show_defaults(child)


def main(argv: list[str] | None = None) -> int:
    from moe_engine.errors import UserError
    from moe_engine.io import terminate_as_exit

    args = build_parser().parse_args(argv)
    with terminate_as_exit():
        try:
            return int(args.func(args) or 0)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("interrupted: outputs of this run were not published; the previous ones are intact", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
