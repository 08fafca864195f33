"""Pretraining throughput of the real trainer (DeepSpeed engine, bf16, ZeRO-1) on GPUs.

One process per GPU; launch with torchrun for several GPUs. Each run writes one JSON row; ``--merge``
combines rows into the committed result with the ratios the issue asks for:

    python benchmarks/pretrain_throughput.py --data D --label moe-1gpu --out rows/a.json
    python benchmarks/pretrain_throughput.py --data D --label dense-active-1gpu --dense active --out rows/b.json
    torchrun --nproc_per_node 2 benchmarks/pretrain_throughput.py --data D --label moe-ep2 --ep-size 2 --out rows/c.json
    python benchmarks/pretrain_throughput.py --merge rows/*.json --out benchmarks/results/pretrain_h100.json

tokens/s is measured over the last ``--measure`` steps (after warm-up), so compilation and cache
warm-up stay out of it. MFU uses PaLM's 6N + 12LDS FLOPs per token (``training/flops.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(args) -> int:
    import torch
    import torch.distributed as dist

    from benchmarks.moe_layer import environment
    from moe_engine.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            data=args.data, out_dir=tmp, arch=args.arch, preset=args.preset, steps=args.steps,
            micro_batch_size=args.micro_batch_size, grad_accum=args.grad_accum, ep_size=args.ep_size, zero_stage=1, precision="auto",
            log_every=args.measure, save_every=0, eval_batches=0, warmup_steps=5, lr=3e-4,
            dense_baseline=args.dense, router={"aux_loss_coef": 0.01},
        )
        result = trainer.fit()
    world = dist.get_world_size()
    if dist.get_rank() == 0:
        m = result.metrics
        row = {
            "label": args.label, "arch": args.arch, "preset": args.preset, "dense_baseline": args.dense,
            "world_size": world, "ep_size": args.ep_size, "micro_batch_size": args.micro_batch_size,
            "grad_accum": args.grad_accum,
            "seq_len": json.loads((Path(args.data) / "manifest.json").read_text())["seq_len"],
            "tokens_per_s": m["tokens_per_s"], "tokens_per_s_per_gpu": m["tokens_per_s"] / world,
            "mfu": m.get("mfu"), "tflops_per_s_per_gpu": m["tflops_per_s"] / world,
            "usd_per_million_tokens": m.get("usd_per_million_tokens"),
            "loss_first": result.losses[0], "loss_last": result.losses[-1],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "env": environment(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        }
        row["step_time_s"] = args.micro_batch_size * args.grad_accum * row["seq_len"] / row["tokens_per_s_per_gpu"]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(row, indent=2))
        print(json.dumps({k: v for k, v in row.items() if k != "env"}))
    return 0


def merge(files: list[str], out: str) -> int:
    rows = {r["label"]: r for r in (json.loads(Path(f).read_text()) for f in files)}
    summary = {}
    if "moe-1gpu" in rows and "dense-active-1gpu" in rows:
        summary["moe_step_time_vs_dense_active"] = rows["moe-1gpu"]["step_time_s"] / rows["dense-active-1gpu"]["step_time_s"]
    if "moe-1gpu" in rows and "moe-ep2" in rows:
        summary["ep2_tokens_per_s_per_gpu_vs_1gpu"] = rows["moe-ep2"]["tokens_per_s_per_gpu"] / rows["moe-1gpu"]["tokens_per_s_per_gpu"]
    if "moe-1gpu" in rows and "moe-dp2" in rows:
        summary["dp2_tokens_per_s_per_gpu_vs_1gpu"] = rows["moe-dp2"]["tokens_per_s_per_gpu"] / rows["moe-1gpu"]["tokens_per_s_per_gpu"]
    Path(out).write_text(json.dumps({"summary": summary, "runs": rows}, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a prepared data dir (moe-lab data prepare)")
    ap.add_argument("--label", default="moe-1gpu")
    ap.add_argument("--arch", default="mixtral")
    ap.add_argument("--preset", default="mixtral-0.8b")
    ap.add_argument("--dense", default="", choices=["", "active", "total"])
    ap.add_argument("--ep-size", type=int, default=1)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--measure", type=int, default=20, help="steps timed at the end")
    ap.add_argument("--merge", nargs="*", help="row files to merge into --out")
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
