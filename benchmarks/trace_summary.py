"""Where a profiled window's time went, from a torch.profiler Chrome trace (``.json`` or ``.json.gz``).

GPU side: busy time (the union of kernel, copy and memset intervals), idle time, the kernels by
category and the top kernels by name. CPU side: the CUDA runtime calls that took longest in total
(``cudaStreamSynchronize``, ``cudaMemcpy`` and ``cudaMalloc`` stall the launch queue), and the CPU
ops running during the longest GPU idle gaps. Per step when ``--steps`` names the profiled count.

    python benchmarks/trace_summary.py out/profile/trace_rank0.json.gz --steps 3
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

CATEGORIES = [  # first match wins
    ("nccl", r"nccl"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    ("grouped gemm", r"grouped|cutlass.*Group|GroupProblem|ptr_array"),
    ("gemm", r"gemm|nvjet|cutlass|sm90_xmma|cublas|Kernel2|sgemm|s16816|wgmma"),
    ("moe dispatch (triton)", r"gather_sum|combine_bwd|permute|swiglu|^fwd$|^bwd$|route|router"),
    ("sort/topk/scan", r"sort|topk|radix|scan|searchsorted|cub::"),
    ("norm/softmax/loss", r"norm|softmax|cross_entropy|nll|logsumexp|log_softmax"),
    ("copy/cast", r"copy|Memcpy|memcpy|Memset|memset|cat_|CatArray|fill|to_copy|direct_copy"),
    ("reduce", r"reduce|Reduce|sum_|amax|max_"),
    ("elementwise", r"elementwise|vectorized|unrolled|Elementwise"),
]


def category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return cat
    return "other"


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def union_length(intervals: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """(covered length, idle gaps between covered stretches) of [start, end) intervals."""
    total, gaps, end = 0.0, [], None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                gaps.append((end, s))
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total, gaps


def summarise(events: list[dict], steps: int, top: int) -> dict:
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"]
    cpu_ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    if not gpu:
        raise SystemExit("no GPU events in this trace: was it profiled with ProfilerActivity.CUDA?")
    intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in gpu]
    span = max(e for _, e in intervals) - min(s for s, _ in intervals)
    busy, gaps = union_length(intervals)
    by_cat, by_name, count_name = defaultdict(float), defaultdict(float), defaultdict(int)
    for e in gpu:
        name = e["name"]
        by_cat[category(name)] += float(e["dur"])
        by_name[name] += float(e["dur"])
        count_name[name] += 1
    rt, rt_n = defaultdict(float), defaultdict(int)
    for e in runtime:
        rt[e["name"]] += float(e["dur"])
        rt_n[e["name"]] += 1
    per = 1e3 * steps  # us -> ms per step
    long_gaps = sorted(gaps, key=lambda g: g[0] - g[1])[:top]
    gap_rows = []
    for s, e in long_gaps:  # the innermost CPU op running when the GPU went idle
        running = [o for o in cpu_ops if float(o["ts"]) <= s <= float(o["ts"]) + float(o["dur"])]
        inner = min(running, key=lambda o: float(o["dur"]), default=None)
        outer = max(running, key=lambda o: float(o["dur"]), default=None)
        gap_rows.append({"idle_us": round(e - s, 1), "cpu_op": inner["name"] if inner else None,
                         "within": outer["name"] if outer else None})
    return {
        "steps": steps,
        "gpu_span_ms_per_step": span / per,
        "gpu_busy_ms_per_step": busy / per,
        "gpu_idle_ms_per_step": (span - busy) / per,
        "kernels_per_step": len([e for e in gpu if e.get("cat") == "kernel"]) / steps,
        "by_category_ms_per_step": {k: round(v / per, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"ms_per_step": round(by_name[n] / per, 3), "calls_per_step": count_name[n] / steps,
                         "category": category(n), "name": n[:160]}
                        for n in sorted(by_name, key=lambda n: -by_name[n])[:top]],
        "cuda_runtime_ms_per_step": {n[:80]: {"ms": round(rt[n] / per, 3), "calls": rt_n[n] / steps}
                                     for n in sorted(rt, key=lambda n: -rt[n])[:12]},
        "longest_idle_gaps": gap_rows,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path, help="a torch.profiler Chrome trace, .json or .json.gz")
    ap.add_argument("--steps", type=int, default=1, help="how many steps the window holds (figures are per step)")
    ap.add_argument("--top", type=int, default=25, help="rows of the kernel and gap tables")
    ap.add_argument("--out", type=Path, help="write the summary JSON here")
    args = ap.parse_args(argv)
    if not args.trace.is_file():
        print(f"error: no trace file at {args.trace}", file=sys.stderr)
        return 2
    summary = summarise(load(args.trace), args.steps, args.top)
    text = json.dumps(summary, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
