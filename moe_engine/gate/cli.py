"""``moe-lab gate``: fail (exit 1) when a run's metrics regress against the committed baseline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run_gate(args: argparse.Namespace) -> int:
    from moe_engine.gate.gate import GateError, comparable, evaluate, load_sources, markdown

    if not args.baseline.exists():
        raise GateError(f"baseline {args.baseline} does not exist")
    try:
        baseline = json.loads(args.baseline.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # a folder, unreadable, not UTF-8, not JSON
        raise GateError(f"baseline {args.baseline} cannot be read as a JSON file: {exc}") from None
    rows, passed = evaluate(baseline, load_sources(args.metrics))
    differs = []
    if args.params is not None:
        from moe_engine.config import read_params

        differs = comparable(baseline, read_params(args.params))
    report = markdown(rows)
    if differs:
        passed = None
        report = (f"**No verdict: this run's settings differ from the baseline's** ({', '.join(differs[:12])}"
                  f"{', ...' if len(differs) > 12 else ''}); the table below is for information only. Record a baseline "
                  f"for these settings to gate them.\n\n" + report)
    print(report)
    if args.out:
        from moe_engine.io import write_json, write_text

        write_text(args.out, report)
        write_json(args.out.with_suffix(".json"), {"passed": passed, "not_comparable": differs,
                                                   "checks": [r.__dict__ for r in rows]})
    if passed is None:
        print("gate: NO VERDICT (other settings than the baseline's)")
        return 0
    print("gate: PASSED" if passed else "gate: FAILED (regressions above)")
    return 0 if passed else 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "gate", help="compare metrics with a committed baseline; exit 1 on regression",
        description="Benchmark gate. Each check in --baseline names a source, a dotted key, the baseline value, "
        "which direction is better and the tolerated relative change. Prints a markdown diff.",
    )
    p.add_argument("--baseline", type=Path, required=True, help="JSON with a 'checks' list (see moe_engine/gate/gate.py)")
    p.add_argument("--metrics", action="append", default=[], metavar="NAME=PATH", help="a metrics JSON, named as in the checks")
    p.add_argument("--out", type=Path, help="also write the markdown report here (and a .json beside it)")
    p.add_argument("--params", type=Path,
                   help="params.yaml of the run: when the baseline records other settings, the gate gives no verdict")
    p.set_defaults(func=run_gate)
