"""``moe-lab finetune``: LoRA, ESFT or full fine-tuning of a Hugging Face MoE checkpoint on task data."""

from __future__ import annotations

import argparse
from pathlib import Path


def run_finetune(args: argparse.Namespace) -> int:
    from moe_engine.config import load_section
    from moe_engine.finetune.config import FinetuneConfig
    from moe_engine.finetune.run import FinetuneResult, finetune
    from moe_engine.stages import sections

    config = load_section(FinetuneConfig, args.params, args.section, args.set,
                          known_sections=sections() if args.params is not None else None)
    result = finetune(args.base, args.data, args.out, method=args.method or None, config=config,
                      tokenizer=args.tokenizer, retention=args.retention, stage=args.section)
    results = {result.method: result} if isinstance(result, FinetuneResult) else result
    if all(r.model_dir is None for r in results.values()):
        return 0  # not rank 0
    table = Path(args.out) / "compare.md"
    print(table.read_text())
    for method, r in results.items():
        m = r.metrics
        line = (f"{method}: trained {m['trainable_params']:,} of {m['total_params']:,} parameters, "
                f"train loss {m['train_loss_first']:.3f} -> {m['train_loss_last']:.3f}; model {r.model_dir}")
        if r.adapter_dir:
            line += f"; adapter {r.adapter_dir}"
        if "experts_trained" in m:
            line += f"; experts trained per layer {list(m['experts_trained'].values())}"
        print(line)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="LoRA, expert-selective (ESFT) or full fine-tuning on (prompt, response) data",
        description="Fine-tune a Hugging Face MoE checkpoint (the pretrain stage's model/, or any supported stock "
        "checkpoint) on task records with prompt and response fields. Writes model/ (merged), adapter/ (LoRA, peft "
        "format), experts.json (ESFT), metrics.json and compare.md (before/after). Several --method flags compare "
        "the methods side by side in <out>/compare.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--base", type=Path, required=True, help="Hugging Face model directory to start from")
    p.add_argument("--data", type=Path, required=True,
                   help="task data: a .json/.jsonl/.parquet file (.xz/.gz ok) or a folder with train.* and test.*")
    p.add_argument("--method", action="append", choices=["lora", "esft", "full"],
                   help="lora | esft | full (repeat to compare; default: the params section's method)")
    p.add_argument("--out", type=Path, default=Path("outputs/finetune"), help="folder to write")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the base model's)")
    p.add_argument("--retention", type=Path,
                   help="a `moe-lab data prepare` folder: general-domain loss on its val/ood shards before and after")
    p.add_argument("--params", type=Path, help="params.yaml to read")
    p.add_argument("--section", default="finetune", help="params.yaml section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable), e.g. --set lora.r=8 --set steps=50")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_finetune)
