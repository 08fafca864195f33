"""``moe-lab pretrain``: train an MoE (or its dense baseline) on prepared token shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run_pretrain(args: argparse.Namespace) -> int:
    from moe_engine.config import load_section
    from moe_engine.stages import sections
    from moe_engine.training.config import PretrainConfig
    from moe_engine.training.trainer import Trainer

    config = load_section(PretrainConfig, args.params, args.section, args.set,
                          known_sections=sections() if args.params is not None else None)
    result = Trainer(data=args.data, config=config, out_dir=args.out, stage=args.section, fresh=args.fresh).fit()
    if result.model_dir is None or result.skipped:  # not rank 0, or nothing to do (already said)
        return 0
    first, last = result.losses[:1], result.losses[-1:]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"loss {fmt(first[0] if first else None)} -> {fmt(last[0] if last else None)}; val {fmt(result.val_loss)}; "
          f"ood {fmt(result.ood_loss)}; {result.tokens_per_s:,.0f} tokens/s")
    for layer, counts in result.tokens_per_expert.items():
        total = max(sum(counts), 1)
        bars = " ".join(f"{c / total:5.1%}" for c in counts)
        print(f"tokens per expert  {layer:28s} {bars}")
    print(f"model: {result.model_dir}")
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="train an MoE (or dense baseline) on token shards with DeepSpeed",
        description="Pretrain on DeepSpeed's engine. Settings come from the params.yaml section (see "
        "moe_engine.training.config.PretrainConfig), then --set overrides (dotted keys, e.g. --set router.top_k=1). "
        "Resumes from <out>/checkpoints when present; re-running a finished run does nothing. "
        "Multi-GPU: deepspeed --num_gpus N $(which moe-lab) pretrain ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=Path, required=True, help="directory made by `moe-lab data prepare`")
    p.add_argument("--out", type=Path, default=Path("outputs/pretrain"), help="checkpoints, model/, metrics.json")
    p.add_argument("--params", type=Path, help="params.yaml to read (default: built-in defaults)")
    p.add_argument("--section", default="pretrain", help="params.yaml section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable), e.g. --set steps=50 --set router.aux_loss_coef=0")
    p.add_argument("--fresh", action="store_true",
                   help="ignore <out>/checkpoints and train from step 0 (old checkpoints go once the first new one exists)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    p.set_defaults(func=run_pretrain)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(__import__("moe_engine.cli").cli.main(["pretrain", *sys.argv[1:]]))
