"""The expert GEMMs of one MoE layer at 16,384 tokens: torch's grouped GEMM (cutlass) on a gathered
copy against the Triton kernels of ``gather_gemm_kernels.py``, which read rows through the index instead.

For each shape of ``moe_layer.py`` and each of the six GEMMs of a fwd+bwd (the two forwards, the two
input gradients, the two weight gradients), it times, in one process on one GPU:
  - ``cutlass``: ``F.grouped_mm`` on operands already in expert order (the GEMM alone);
  - ``gather+cutlass``: the ``index_select`` the dispatch pays today, then the same GEMM;
  - ``triton``: the gather-fused kernel at each tile setting of the sweep (best one reported),
    and the same kernel without a gather where the GEMM has none.
Results are checked against the cutlass output (max abs error relative to its max).

    python benchmarks/gather_gemm.py --out results.json [--shapes olmoe-like] [--gemms fwd_in wgrad_in]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.moe_layer import SHAPES, environment  # noqa: E402
from benchmarks import gather_gemm_kernels as gather_gemm  # noqa: E402
from moe_engine.moe import dispatch  # noqa: E402

MM_SWEEP = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
]
WGRAD_SWEEP = [
    dict(BLOCK_N=128, BLOCK_K=128, BLOCK_R=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_K=256, BLOCK_R=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_K=128, BLOCK_R=32, num_warps=4, num_stages=4),
    dict(BLOCK_N=128, BLOCK_K=128, BLOCK_R=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=256, BLOCK_K=128, BLOCK_R=64, num_warps=8, num_stages=3),
]


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def rel_err(out, ref, rows) -> float:
    a, b = out[:rows].float(), ref[:rows].float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def sweep(label, run_triton, configs, ref, rows, log) -> dict:
    best = None
    tried = []
    for cfg in configs:
        try:
            out = run_triton(cfg)
            err = rel_err(out, ref, rows)
            ms = bench(lambda: run_triton(cfg))
        except Exception as exc:  # a tile setting that does not fit (shared memory) is a finding, not a stop
            tried.append({"config": cfg, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            continue
        tried.append({"config": cfg, "ms": ms, "rel_err": err})
        if best is None or ms < best["ms"]:
            best = {"config": cfg, "ms": ms, "rel_err": err}
    log(f"    {label}: best {best['ms']:.3f} ms" if best else f"    {label}: no config ran")
    return {"best": best, "tried": tried}


GEMMS = ("fwd_in", "fwd_out", "dgrad_out", "dgrad_in", "wgrad_in", "wgrad_out", "wgrad_in_nogather")


def run_shape(name, dims, tokens, log, only=GEMMS) -> dict:
    D, Fe, E, K, _ = dims
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x_TD = torch.randn(tokens, D, device=dev, dtype=dt, generator=g)
    w_in = torch.randn(E, 2 * Fe, D, device=dev, dtype=dt, generator=g) * 0.02
    w_out = torch.randn(E, D, Fe, device=dev, dtype=dt, generator=g) * 0.02
    expert_TK = torch.randn(tokens, E, device=dev, generator=g).topk(K, dim=-1).indices
    p = dispatch.plan(expert_TK.reshape(-1), E, may_drop=False)
    A = tokens * K
    tok_A = (p.order_A // K).to(torch.int32)
    x_AD = x_TD.index_select(0, tok_A)
    h_AH = torch.randn(A, 2 * Fe, device=dev, dtype=dt, generator=g)
    h_AF = torch.randn(A, Fe, device=dev, dtype=dt, generator=g)
    g_TD = torch.randn(tokens, D, device=dev, dtype=dt, generator=g)
    g_AD = g_TD.index_select(0, tok_A)
    offs = p.offsets_E
    res = {"dims": {"D": D, "F": Fe, "E": E, "K": K, "tokens": tokens}}
    log(f"{name}: D {D} F {Fe} E {E} k {K}")

    def gemm(label, cutlass, gathered_cutlass, triton_fn, configs, ref_rows=A):
        if label not in only:
            return
        ref = cutlass()
        row = {"cutlass_ms": bench(cutlass)}
        if gathered_cutlass is not None:
            row["gather+cutlass_ms"] = bench(gathered_cutlass)
        row["triton"] = sweep(label, triton_fn, configs, ref, ref_rows, log)
        log(f"    {label}: cutlass {row['cutlass_ms']:.3f} ms" + (f", gather+cutlass {row['gather+cutlass_ms']:.3f}" if gathered_cutlass else ""))
        res[label] = row

    # forward: gate_up (gathers x), down (no gather)
    gemm("fwd_in", lambda: F.grouped_mm(x_AD, w_in.transpose(-2, -1), offs=offs),
         lambda: F.grouped_mm(x_TD.index_select(0, tok_A), w_in.transpose(-2, -1), offs=offs),
         lambda cfg: gather_gemm.gather_mm(x_TD, tok_A, w_in, offs, True, config=cfg), MM_SWEEP)
    gemm("fwd_out", lambda: F.grouped_mm(h_AF, w_out.transpose(-2, -1), offs=offs), None,
         lambda cfg: gather_gemm.gather_mm(h_AF, None, w_out, offs, True, config=cfg), MM_SWEEP)
    # input gradients: of down (gathers grad_TD when the combine weight is applied before it), of gate_up
    gemm("dgrad_out", lambda: F.grouped_mm(g_AD, w_out, offs=offs),
         lambda: F.grouped_mm(g_TD.index_select(0, tok_A), w_out, offs=offs),
         lambda cfg: gather_gemm.gather_mm(g_TD, tok_A, w_out, offs, False, config=cfg), MM_SWEEP)
    gemm("dgrad_in", lambda: F.grouped_mm(h_AH, w_in, offs=offs), None,
         lambda cfg: gather_gemm.gather_mm(h_AH, None, w_in, offs, False, config=cfg), MM_SWEEP)
    # weight gradients: gate_up's reads x (gathered), down's reads grad_TD (gathered)
    gemm("wgrad_in", lambda: F.grouped_mm(h_AH.t(), x_AD, offs=offs),
         lambda: F.grouped_mm(h_AH.t(), x_TD.index_select(0, tok_A), offs=offs),
         lambda cfg: gather_gemm.gather_wgrad(h_AH, None, x_TD, tok_A, offs, config=cfg), WGRAD_SWEEP, ref_rows=E)
    gemm("wgrad_out", lambda: F.grouped_mm(g_AD.t(), h_AF, offs=offs),
         lambda: F.grouped_mm(g_TD.index_select(0, tok_A).t(), h_AF, offs=offs),
         lambda cfg: gather_gemm.gather_wgrad(g_TD, tok_A, h_AF, None, offs, config=cfg), WGRAD_SWEEP, ref_rows=E)
    # the weight-gradient kernel without a gather: is the gather or the kernel the cost?
    gemm("wgrad_in_nogather", lambda: F.grouped_mm(h_AH.t(), x_AD, offs=offs), None,
         lambda cfg: gather_gemm.gather_wgrad(h_AH, None, x_AD, None, offs, config=cfg), WGRAD_SWEEP, ref_rows=E)
    if any(label not in res for label in GEMMS[:6]):
        return res
    tot = {k: 0.0 for k in ("cutlass", "cutlass_with_gathers", "triton_best")}
    for label in ("fwd_in", "fwd_out", "dgrad_out", "dgrad_in", "wgrad_in", "wgrad_out"):
        r = res[label]
        tot["cutlass"] += r["cutlass_ms"]
        tot["cutlass_with_gathers"] += r.get("gather+cutlass_ms", r["cutlass_ms"])
        tot["triton_best"] += r["triton"]["best"]["ms"] if r["triton"]["best"] else float("nan")
    res["totals_ms"] = tot
    log(f"  totals: {tot}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help="subset of moe_layer.py's shape names")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--gemms", nargs="*", default=list(GEMMS), choices=GEMMS, help="which GEMMs to time")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gather_gemm.py needs a CUDA GPU")
    report = {"env": environment(torch.device("cuda")), "tokens": args.tokens, "note": __doc__.split("\n\n")[0], "shapes": {}}
    for name in args.shapes:
        report["shapes"][name] = run_shape(name, SHAPES[name], args.tokens, print, args.gemms)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
