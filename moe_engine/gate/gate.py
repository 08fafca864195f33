"""Benchmark gate.

A baseline file lists checks; each names a metric in one of the run's metric files by a dotted
path, its baseline value, whether lower or higher is better, and the change tolerated in the
bad direction, relative (``tolerance``) or absolute (``tolerance_abs``; the larger wins)::

    {"checks": [
      {"name": "validation loss", "source": "evaluate", "key": "moe.val_loss",
       "baseline": 6.2, "better": "lower", "tolerance": 0.05},
      {"name": "engine vs dense, mixtral-like", "source": "layer_bench",
       "key": "shapes.mixtral-like.train.engine.fwd_bwd_vs_best_dense",
       "baseline": 1.17, "better": "lower", "tolerance": 0.10}
    ]}

A check with ``"per": {"source": ..., "key": ...}`` gates the ratio of its metric to that one (e.g. the
MoE's tokens/s per dense tokens/s: a ratio measured on one machine travels better than either number).
``evaluate(...)`` returns rows and whether all passed; ``markdown(rows)`` is the diff table.

A baseline may record the settings it was measured with (``"params": {section: {key: value}}``, a
subset of params.yaml): a run made with other settings is not comparable (a 50-step experiment is not
a regression of the 300-step demo), so ``comparable(...)`` names what differs and the gate gives no
verdict instead of a false alarm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moe_engine.errors import UserError


class GateError(UserError, ValueError):
    """The baseline or a metrics file is malformed or missing a value."""


@dataclass
class CheckResult:
    name: str
    baseline: float
    current: float | None
    better: str
    tolerance: float
    passed: bool
    slack: float = 0.0  # the allowed change in the bad direction, in the metric's units

    @property
    def change(self) -> float | None:
        if self.current is None or self.baseline == 0:
            return None
        return (self.current - self.baseline) / abs(self.baseline)


def lookup(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def evaluate(baseline: dict, sources: dict[str, dict]) -> tuple[list[CheckResult], bool]:
    if not isinstance(baseline, dict) or not isinstance(baseline.get("checks"), list) or not baseline["checks"]:
        raise GateError("the baseline has no checks: it needs a non-empty 'checks' list (a gate that checks nothing "
                        "would always pass); see moe_engine/gate/gate.py for the format")
    rows = []
    for i, check in enumerate(baseline["checks"]):
        if not isinstance(check, dict):
            raise GateError(f"baseline check #{i} must be a mapping, got {check!r}")
        missing = {"name", "source", "key", "baseline", "better"} - set(check)
        if missing:
            raise GateError(f"baseline check #{i} lacks {sorted(missing)}")
        for key in ("baseline", "tolerance", "tolerance_abs"):
            if key in check and (isinstance(check[key], bool) or not isinstance(check[key], (int, float))):
                raise GateError(f"check {check['name']!r}: {key} must be a number, got {check[key]!r}")
        if check["better"] not in ("lower", "higher"):
            raise GateError(f"check {check['name']!r}: better must be 'lower' or 'higher'")
        if check["source"] not in sources:
            raise GateError(f"check {check['name']!r} reads source {check['source']!r}, which was not given (--metrics NAME=PATH)")
        value = lookup(sources[check["source"]], check["key"])
        if "per" in check:  # a ratio of two metrics (MoE / dense tokens/s): steadier across machines than either
            per = check["per"]
            if not isinstance(per, dict) or set(per) != {"source", "key"}:
                raise GateError(f"check {check['name']!r}: 'per' must be {{\"source\": NAME, \"key\": DOTTED.KEY}}")
            if per["source"] not in sources:
                raise GateError(f"check {check['name']!r} divides by source {per['source']!r}, which was not given "
                                "(--metrics NAME=PATH)")
            denominator = lookup(sources[per["source"]], per["key"])
            ok_number = isinstance(value, (int, float)) and isinstance(denominator, (int, float)) and denominator != 0
            value = value / denominator if ok_number else None
        tol = float(check.get("tolerance", 0.0))
        tol_abs = float(check.get("tolerance_abs", 0.0))
        base = float(check["baseline"])
        if not isinstance(value, (int, float)):
            rows.append(CheckResult(check["name"], base, None, check["better"], tol, False, max(abs(base) * tol, tol_abs)))
            continue
        slack = max(abs(base) * tol, tol_abs)
        ok = value <= base + slack if check["better"] == "lower" else value >= base - slack
        rows.append(CheckResult(check["name"], base, float(value), check["better"], tol, ok, slack))
    return rows, all(r.passed for r in rows)


def markdown(rows: list[CheckResult]) -> str:
    lines = ["| check | baseline | current | change | allowed | result |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        current = "missing" if r.current is None else f"{r.current:.4g}"
        change = "-" if r.change is None else f"{r.change:+.1%}"
        allowed = f"{'+' if r.better == 'lower' else '-'}{r.slack:.4g}"
        lines.append(f"| {r.name} | {r.baseline:.4g} | {current} | {change} | {allowed} | {'pass' if r.passed else '**REGRESSION**'} |")
    return "\n".join(lines) + "\n"


def load_sources(items: list[str]) -> dict[str, dict]:
    sources = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise GateError(f"--metrics expects NAME=PATH, got {item!r}")
        p = Path(path)
        if not p.exists():
            raise GateError(f"metrics file {p} (source {name!r}) does not exist")
        try:
            sources[name] = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise GateError(f"{p} is not valid JSON: {exc}") from None
    return sources


MISSING = object()  # a recorded setting the run's params do not have


def comparable(baseline: dict, params: dict) -> list[str]:
    """The dotted settings whose values differ between the baseline's recorded params and ``params``
    (empty: comparable, or the baseline records none)."""
    recorded = baseline.get("params") or {}
    if not isinstance(recorded, dict):
        raise GateError("the baseline's 'params' must map params.yaml sections to their settings")

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    want = flat(recorded)  # only what the baseline records is compared: it names the settings that matter
    have = flat({s: params.get(s) or {} for s in {key.split(".")[0] for key in want}})
    return sorted(k for k in want if want[k] != have.get(k, MISSING))
