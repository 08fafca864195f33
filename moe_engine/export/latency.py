"""In-process latency of an ONNX graph on onnxruntime against the same model in torch eager.

The two are timed in turn (A B A B ...) after warm-up, so drift of a shared machine hits both alike;
each figure is the median of the repeats, and the ratio is taken pair by pair (its median is quoted).
"""

from __future__ import annotations

import statistics
import time

import torch


def paired(fn_a, fn_b, repeats: int = 10, warmup: int = 2) -> dict:
    """Median seconds of ``fn_a`` and ``fn_b`` and the median of the per-pair ratios a/b."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    a, b = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        fn_a()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        fn_b()
        b.append(time.perf_counter() - t)
    return {"a_s": statistics.median(a), "b_s": statistics.median(b),
            "ratio": statistics.median(x / y for x, y in zip(a, b)),
            "a_min_s": min(a), "a_max_s": max(a), "b_min_s": min(b), "b_max_s": max(b)}


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
    r = paired(lambda: run(sess, feed, ["logits"]), lambda: model(**kwargs, use_cache=False), repeats, warmup)
    tokens = batch * length
    return {"batch": batch, "length": length, "onnx_ms": r["a_s"] * 1e3, "torch_ms": r["b_s"] * 1e3,
            "onnx_over_torch": r["ratio"], "onnx_tokens_per_s": tokens / r["a_s"], "torch_tokens_per_s": tokens / r["b_s"],
            "onnx_ms_range": [r["a_min_s"] * 1e3, r["a_max_s"] * 1e3], "torch_ms_range": [r["b_min_s"] * 1e3, r["b_max_s"] * 1e3]}
