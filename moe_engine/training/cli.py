"""``moe-lab pretrain``: train an MoE (or its dense baseline) on prepared token shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _load_section(params: Path | None, section: str) -> dict:
    if params is None:
        return {}
    import yaml

    if not params.exists():
        raise FileNotFoundError(f"params file {params} does not exist")
    values = yaml.safe_load(params.read_text()) or {}
    return dict(values.get(section) or {})


def _parse_set(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_pretrain(args: argparse.Namespace) -> int:
    from moe_engine.training.checkpoint import CheckpointError
    from moe_engine.training.trainer import Trainer, TrainingDiverged

    try:
        config = {**_load_section(args.params, args.section), **_parse_set(args.set)}
        if args.fresh:  # a pipeline stage starts from scratch: never resume another config's checkpoints
            import shutil

            shutil.rmtree(Path(args.out) / "checkpoints", ignore_errors=True)
        trainer = Trainer(data=args.data, config=config, out_dir=args.out, stage=args.section)
        result = trainer.fit()
    except (ValueError, FileNotFoundError, CheckpointError, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.model_dir is not None:  # rank 0
        first, last = result.losses[:1], result.losses[-1:]
        print(f"loss {first[0] if first else float('nan'):.3f} -> {last[0] if last else float('nan'):.3f}; "
              f"val {result.val_loss}; ood {result.ood_loss}; {result.tokens_per_s:,.0f} tokens/s")
        for layer, counts in result.tokens_per_expert.items():
            total = max(sum(counts), 1)
            bars = " ".join(f"{c / total:5.1%}" for c in counts)
            print(f"tokens per expert  {layer:28s} {bars}")
        print(f"model: {result.model_dir}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="train an MoE (or dense baseline) on token shards with DeepSpeed",
        description="Pretrain on DeepSpeed's engine. Settings come from the params.yaml 'pretrain' section "
        "(see moe_engine.training.config.PretrainConfig), then --set overrides. Resumes from "
        "<out>/checkpoints/latest when present. Multi-GPU: deepspeed --num_gpus N $(which moe-lab) pretrain ...",
    )
    p.add_argument("--data", type=Path, required=True, help="directory made by `moe-lab data prepare`")
    p.add_argument("--out", type=Path, default=Path("outputs/pretrain"), help="checkpoints, model/, metrics.json")
    p.add_argument("--params", type=Path, help="params.yaml to read")
    p.add_argument("--section", default="pretrain", help="params.yaml section (default: pretrain)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting, e.g. --set steps=50")
    p.add_argument("--fresh", action="store_true", help="delete <out>/checkpoints first instead of resuming")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    p.set_defaults(func=run_pretrain)
