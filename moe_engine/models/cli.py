"""``moe-lab presets``: the architectures and their named shapes, with total and active parameters."""

from __future__ import annotations

import argparse
import json


def run_presets(args: argparse.Namespace) -> int:
    import torch

    from moe_engine.models.build import build_model
    from moe_engine.models.presets import ARCH_ALIASES, PRESETS
    from moe_engine.training.flops import count_params

    rows = []
    for arch, presets in PRESETS.items():
        if args.arch and arch != ARCH_ALIASES.get(args.arch.lower(), args.arch):
            continue
        for name in presets:
            with torch.device("meta"):  # shapes only: no memory, no weights
                model = build_model(arch, name, device="meta")
            counts = count_params(model)
            layer = next(iter(m for m in model.modules() if type(m).__name__ == "MoELayer"))
            rows.append({"arch": arch, "preset": name, "experts": layer.num_experts, "top_k": layer.top_k,
                         "params_total": counts.total, "params_active": counts.active})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    aliases = {}
    for alias, arch in ARCH_ALIASES.items():
        aliases.setdefault(arch, []).append(alias)
    print(f"{'architecture':20s} {'preset':20s} {'experts':>7s} {'top-k':>5s} {'total params':>14s} {'active':>12s}")
    for r in rows:
        print(f"{r['arch']:20s} {r['preset']:20s} {r['experts']:7d} {r['top_k']:5d} {_human(r['params_total']):>14s} "
              f"{_human(r['params_active']):>12s}")
    print("\narchitecture names accepted: " + "; ".join(f"{a}: {', '.join(sorted(n))}" for a, n in aliases.items()))
    return 0


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("presets", help="list architectures and presets with total and active parameters",
                              description="Every architecture and its named shapes (tiny debug sizes, benchmark "
                              "scales, published models), built on the meta device to count parameters.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", help="only this architecture (e.g. mixtral)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_presets)
