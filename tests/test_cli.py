"""moe-lab's --help at every level: defaults shown once, in one style, never "(default: None)"."""

import argparse
import re

import pytest

from moe_engine.cli import build_parser


def _commands(parser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, (*path, name))


COMMANDS = list(_commands(build_parser()))


@pytest.mark.parametrize("path, parser", COMMANDS, ids=[" ".join(p) or "moe-lab" for p, _ in COMMANDS])
def test_help_states_each_default_once(path, parser):
    text = parser.format_help()
    assert "(default: None)" not in text and "%(default)" not in text
    for block in re.split(r"\n  (?=-)", text):  # one option's help
        assert len(re.findall(r"\(default", block)) <= 1, block


def test_every_stage_command_shows_some_default():
    shown = {" ".join(p) for p, parser in COMMANDS if "(default: " in parser.format_help()}
    for stage in ("pretrain", "finetune", "evaluate", "benchmark", "quantize", "export", "analyze"):
        assert stage in shown, stage
