"""The token-dispatch passes of one MoE layer's fwd+bwd, each alone, and the two ways of the forward permute.

The layer moves [A, D] rows (A = tokens x k) four times besides its GEMMs (``moe/dispatch.py``):
  - ``permute``: ``x_TD.index_select(0, order_A // k)`` -> ``x_AD`` (reads each token row k times: with
    k = 8 and T x D larger than L2 that is k reads from memory per row; the engine's way before the
    eleventh session, and still its way off CUDA);
  - ``combine``: the weighted gather-sum of the expert outputs back to tokens (``gather_sum``);
  - ``combine backward``: ``combine_backward`` (the [A, D] gradient rows and the routing weights' gradient);
  - ``permute backward``: the gather-sum of the [A, D] input gradients back to tokens.
``scatter permute`` (``dispatch_kernels.scatter_rows``, the engine's forward permute on CUDA) writes the same
``x_AD`` from the token side: one program per token reads its row once and stores it at its k positions
(``inverse_A``), so the pass reads T x D instead of A x D. Every destination row is written once (no atomics): the output equals ``index_select``'s bit for
bit, which this script checks before timing. Variants are timed round-robin, several rounds, the median,
on the four shapes of ``moe_layer.py`` at 16,384 tokens and a random top-k routing.

    python benchmarks/dispatch_passes.py --out benchmarks/results/dispatch_passes_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.grouped_gemm_groups import round_robin  # noqa: E402
from benchmarks.moe_layer import SHAPES, environment  # noqa: E402
from moe_engine.moe import dispatch, dispatch_kernels  # noqa: E402


def passes(shape, tokens: int, device="cuda", dtype=torch.bfloat16):
    """(variants: name -> zero-argument callable, check: the scatter permute equals index_select)."""
    D, _, E, K, _ = SHAPES[shape] if isinstance(shape, str) else shape
    g = torch.Generator(device=device).manual_seed(0)
    expert_TK = torch.randn(tokens, E, device=device, generator=g).topk(K, dim=-1).indices
    weight_TK = torch.rand(tokens, K, device=device, generator=g).to(dtype)
    p = dispatch.plan(expert_TK.reshape(-1), E, may_drop=False)
    x_TD = torch.randn(tokens, D, device=device, generator=g).to(dtype)
    y_AD = torch.randn(tokens * K, D, device=device, generator=g).to(dtype)
    g_TD = torch.randn(tokens, D, device=device, generator=g).to(dtype)
    source_A = p.order_A // K
    same = torch.equal(dispatch_kernels.scatter_rows(x_TD, p.inverse_A, K), x_TD.index_select(0, source_A))
    variants = {
        "permute (index_select)": lambda: x_TD.index_select(0, source_A),
        "scatter permute": lambda: dispatch_kernels.scatter_rows(x_TD, p.inverse_A, K),
        "combine": lambda: dispatch_kernels.gather_sum(y_AD, p.inverse_A, weight_TK, K),
        "combine backward": lambda: dispatch_kernels.combine_backward(g_TD, y_AD, p.inverse_A, weight_TK),
        "permute backward": lambda: dispatch_kernels.gather_sum(y_AD, p.inverse_A, None, K),
    }
    return variants, same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rep-ms", type=float, default=50.0, help="ms of timed repetitions per variant and round")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = []
    for shape in args.shapes:
        variants, same = passes(shape, args.tokens)
        if not same:
            raise SystemExit(f"{shape}: the scatter permute differs from index_select: not timing it")
        times = round_robin(variants, args.rounds, args.rep_ms)
        D, _, E, K, _ = SHAPES[shape]
        ms = {n: statistics.median(t) for n, t in times.items()}
        row = {"shape": shape, "tokens": args.tokens, "D": D, "experts": E, "top_k": K, "bitwise_equal": same, "ms": ms,
               "scatter_speedup": ms["permute (index_select)"] / ms["scatter permute"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"env": environment(torch.device("cuda")), "rounds": args.rounds, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
