"""Decode with int8 / int4 quantized experts against the unquantized model, on the GPU (or CPU).

For each variant (the unquantized engine model in --dtype, then `me.quantize(bits=...)` copies of it):
resident weight bytes, greedy decode latency per token after a prompt (batch 1 and 8, KV cache), and
quality against the unquantized model: relative logits error of the prompt and top-1 agreement over
the decode steps (every variant is fed the unquantized model's tokens, so steps compare like with like).
Variants are timed in turn within each round; figures are medians over rounds.

The quantized experts are dequantised on the fly behind the engine's expert_weights seam (no fused
dequant-GEMM kernel): this measures what that path costs, to decide whether a fused kernel pays.

    python benchmarks/quantized_decode.py --preset mixtral-0.8b --bits 8,4 --out benchmarks/results/quantized_decode_h200.json
    python benchmarks/quantized_decode.py --smoke       # CPU, tiny preset, seconds
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_steps(model, prompt, steps, forced=None):
    """Greedy decode; with ``forced`` [B, steps], feed those tokens instead of the argmax. Returns
    (prompt logits, fed tokens [B, steps], per-step argmax [B, steps], per-step seconds)."""
    device = prompt.device
    out = model(input_ids=prompt, use_cache=True)
    cache, logits = out.past_key_values, out.logits
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    fed, picks, times = [], [], []
    for i in range(steps):
        feed = nxt if forced is None else forced[:, i:i + 1]
        fed.append(feed)
        _sync(device)
        t = time.perf_counter()
        out = model(input_ids=feed, past_key_values=cache, use_cache=True)
        _sync(device)
        times.append(time.perf_counter() - t)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        picks.append(nxt)
    return logits.float(), torch.cat(fed, 1), torch.cat(picks, 1), times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mixtral")
    p.add_argument("--preset", default="mixtral-0.8b")
    p.add_argument("--bits", default="8,4")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--out", type=Path)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, float32, few steps")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.dtype, args.batches, args.prompt, args.steps, args.rounds, args.group_size = \
            "tiny", "float32", "1,2", 8, 4, 1, 32
    import moe_engine as me
    from moe_engine.quantize.quantize import state_bytes

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = getattr(torch, args.dtype)
    base = me.build_model(args.arch, args.preset, seed=0, dtype=dtype).to(device).eval()
    variants = {"unquantized": base}
    for bits in (int(b) for b in args.bits.split(",")):
        variants[f"int{bits}"] = me.quantize(copy.deepcopy(base), bits=bits, group_size=args.group_size).to(device)
    rows = []
    g = torch.Generator().manual_seed(0)
    for batch in (int(b) for b in args.batches.split(",")):
        prompt = torch.randint(0, base.config.vocab_size, (batch, args.prompt), generator=g).to(device)
        ref_logits, ref_fed, ref_picks, _ = decode_steps(base, prompt, args.steps)
        times = {k: [] for k in variants}
        quality = {}
        for _ in range(args.rounds):
            for name, model in variants.items():
                # every variant is fed the unquantized model's tokens: its next-token choices compare like with like
                logits, _, picks, ts = decode_steps(model, prompt, args.steps, forced=ref_fed)
                times[name] += ts[1:]  # the first step after the prompt includes one-time work
                quality[name] = {"prompt_logits_rel": ((logits - ref_logits).norm() / ref_logits.norm()).item(),
                                 "top1_agreement": (picks == ref_picks).float().mean().item()}
        base_ms = statistics.median(times["unquantized"]) * 1e3
        for name in variants:
            ms = statistics.median(times[name]) * 1e3
            rows.append({"variant": name, "batch": batch, "ms_per_step": round(ms, 3), "vs_unquantized": round(ms / base_ms, 3),
                         "tokens_per_s": round(batch / ms * 1e3, 1), **quality[name]})
        print(json.dumps(rows[-len(variants):], indent=1), flush=True)
    result = {"benchmark": "quantized_decode", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "versions": {k: version(k) for k in ("torch", "transformers")},
              "settings": {k: getattr(args, k) for k in ("arch", "preset", "bits", "group_size", "prompt", "steps", "rounds", "dtype")},
              "baseline": "the unquantized engine model in the same dtype, timed in the same rounds",
              "resident_bytes": {k: state_bytes(m) for k, m in variants.items()}, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
