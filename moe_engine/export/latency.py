"""In-process latency of ONNX graphs on onnxruntime against the same model in torch eager.

The candidates are timed in turn (A B C A B C ...) after warm-up, so drift of a shared machine hits
them alike; each figure is the median of the rounds, and a ratio to the baseline is the median of the
per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2,
                baseline: str | None = None) -> dict[str, dict]:
    """``{name: {"median_s", "min_s", "max_s", "ratio"}}``; ``ratio`` is to ``baseline`` (default: the first)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = times[baseline or next(iter(fns))]
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                   "ratio": statistics.median(t / b for t, b in zip(ts, base))} for name, ts in times.items()}


@torch.no_grad()
def onnx_vs_torch(model, sess, batch: int, length: int, repeats: int = 10, warmup: int = 2, seed: int = 0) -> dict:
    """Full forward of ``[batch, length]`` tokens: ``model.onnx`` on ``sess`` vs ``model`` in torch eager."""
    from moe_engine.export.runtime import run

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        feed["decoder_input_ids"] = ids.numpy()
        kwargs["decoder_input_ids"] = ids
    r = interleaved({"onnx": lambda: run(sess, feed, ["logits"]), "torch": lambda: model(**kwargs, use_cache=False)},
                    repeats, warmup, baseline="torch")
    tokens = batch * length
    o, t = r["onnx"], r["torch"]
    return {"batch": batch, "length": length, "onnx_ms": o["median_s"] * 1e3, "torch_ms": t["median_s"] * 1e3,
            "onnx_over_torch": o["ratio"], "onnx_tokens_per_s": tokens / o["median_s"],
            "torch_tokens_per_s": tokens / t["median_s"], "onnx_ms_range": [o["min_s"] * 1e3, o["max_s"] * 1e3],
            "torch_ms_range": [t["min_s"] * 1e3, t["max_s"] * 1e3]}
