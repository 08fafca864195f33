"""DeepGEMM's bf16 grouped GEMMs against ``F.grouped_mm`` on the six expert GEMMs of a fwd+bwd.

The ninth session (NOTES.md) found the CUTLASS kernel behind ``F.grouped_mm`` 5-24% slower than cuBLAS on the
same problems and named DeepGEMM's layout as the untried candidate: every expert's rows contiguous and padded to
the kernel's M block (``get_mk_alignment_for_contiguous_layout()``), one int per row naming its expert (-1 on
padding), the weights as one [E, N, K] tensor. Forward and input gradients are its m-grouped kernels (``nt`` and
``nn``); the weight gradients its k-grouped kernel, which on sm90 needs each expert's row count on the host and
accumulates into a float32 [E, M, N] (``D = C + A^T B``, as Megatron's fp32 main gradients do).

For each shape of ``moe_layer.py`` (random top-k routing, as ``grouped_gemm_groups.py``), in one process on one
GPU, round-robin rounds of ~100 ms per variant, the median kept:
  - ``dense``: the dense-active GEMM of the same FLOPs (``torch.mm``);
  - ``grouped_mm``: ``F.grouped_mm`` on the routed, unpadded rows, exactly as the engine calls it;
  - ``deepgemm``: DeepGEMM on the same rows in its padded layout (the padding rows are computed, and counted);
  - ``deepgemm psum`` (forward and input gradients): as the engine calls it (``moe/deepgemm_gemm.py``): the same
    padded rows in a buffer of the fixed size ``A + E * 127 + 1`` whatever the routing, each expert's end row
    given ("psum" layout), so the unused tail is not computed;
and each DeepGEMM output against ``F.grouped_mm``'s on the real rows (max |diff| relative to the largest value).
DeepGEMM is not on the GPU image: ``--deepgemm DIR`` is a source tree built beside it (NOTES.md says how).

    python benchmarks/deepgemm_groups.py --deepgemm /tmp/dg/DeepGEMM --out results.json
    python benchmarks/deepgemm_groups.py --deepgemm /tmp/dg/DeepGEMM --compile-only --shapes olmoe-like
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.grouped_gemm_groups import bounds_of, round_robin  # noqa: E402
from benchmarks.grouped_gemm_tiles import operands  # noqa: E402
from benchmarks.moe_layer import SHAPES, environment  # noqa: E402


def padded_layout(sizes_E: list[int], align: int, dev):
    """(row index of each real row in the padded layout [A], expert of each padded row [Mp] (-1: padding),
    padded size of each expert)."""
    aligned = [-(-n // align) * align for n in sizes_E]
    layout = torch.full((sum(aligned),), -1, dtype=torch.int32, device=dev)
    rows, start = [], 0
    for e, (n, m) in enumerate(zip(sizes_E, aligned)):
        layout[start:start + n] = e
        rows.append(torch.arange(start, start + n, device=dev))
        start += m
    return torch.cat(rows), layout, aligned


def run_shape(dg, name, dims, tokens, rounds, rep_ms, compile_only, log) -> dict:
    D, Fe, E, K, _ = dims
    dev, dt = "cuda", torch.bfloat16
    ops = operands(dims, tokens)
    sizes = [j - i for i, j in bounds_of(ops.offs)]
    align = max(dg.get_mk_alignment_for_contiguous_layout(), 128)  # sm90's k-grouped kernel wants multiples of 128
    real_A, layout_M, aligned = padded_layout(sizes, align, dev)
    Mp, A = layout_M.numel(), tokens * K

    def pad(t_AX):  # the rows in DeepGEMM's layout, zeros between experts
        out = torch.zeros(Mp, t_AX.shape[1], dtype=t_AX.dtype, device=dev)
        out[real_A] = t_AX
        return out

    x, h, hf, g = pad(ops.x_AD), pad(ops.h_AH), pad(ops.h_AF), pad(ops.g_AD)
    w_in, w_out = ops.w_in, ops.w_out  # [E, 2F, D], [E, D, F]: [E, N, K] for nt, [E, K, N] for nn
    ks_tensor = torch.tensor(aligned, dtype=torch.int32, device=dev)
    outs = {"fwd_in": torch.empty(Mp, 2 * Fe, dtype=dt, device=dev), "fwd_out": torch.empty(Mp, D, dtype=dt, device=dev),
            "dgrad_out": torch.empty(Mp, Fe, dtype=dt, device=dev), "dgrad_in": torch.empty(Mp, D, dtype=dt, device=dev),
            "wgrad_in": torch.zeros(E, 2 * Fe, D, dtype=torch.float32, device=dev),
            "wgrad_out": torch.zeros(E, D, Fe, dtype=torch.float32, device=dev)}
    calls = {
        "fwd_in": lambda: dg.m_grouped_bf16_gemm_nt_contiguous(x, w_in, outs["fwd_in"], layout_M),
        "fwd_out": lambda: dg.m_grouped_bf16_gemm_nt_contiguous(hf, w_out, outs["fwd_out"], layout_M),
        "dgrad_out": lambda: dg.m_grouped_bf16_gemm_nn_contiguous(g, w_out, outs["dgrad_out"], layout_M),
        "dgrad_in": lambda: dg.m_grouped_bf16_gemm_nn_contiguous(h, w_in, outs["dgrad_in"], layout_M),
        "wgrad_in": lambda: dg.k_grouped_bf16_gemm_tn_contiguous(h, x, outs["wgrad_in"], aligned, ks_tensor, outs["wgrad_in"]),
        "wgrad_out": lambda: dg.k_grouped_bf16_gemm_tn_contiguous(g, hf, outs["wgrad_out"], aligned, ks_tensor, outs["wgrad_out"]),
    }
    rows = A + E * (align - 1) + 1  # the engine's fixed buffer (dispatch.py, aligned groups)
    starts = torch.tensor([0] + aligned[:-1], device=dev).cumsum(0)
    ends_E = (starts + torch.tensor(sizes, device=dev)).to(torch.int32)

    def tail(t_MX):
        return torch.cat([t_MX, torch.zeros(rows - Mp, t_MX.shape[1], dtype=t_MX.dtype, device=dev)])

    xb, hb, hfb, gb = tail(x), tail(h), tail(hf), tail(g)
    big = {k: torch.empty(rows, outs[k].shape[1], dtype=dt, device=dev) for k in ("fwd_in", "fwd_out", "dgrad_out", "dgrad_in")}
    psum = {
        "fwd_in": lambda: dg.m_grouped_bf16_gemm_nt_contiguous(xb, w_in, big["fwd_in"], ends_E, use_psum_layout=True),
        "fwd_out": lambda: dg.m_grouped_bf16_gemm_nt_contiguous(hfb, w_out, big["fwd_out"], ends_E, use_psum_layout=True),
        "dgrad_out": lambda: dg.m_grouped_bf16_gemm_nn_contiguous(gb, w_out, big["dgrad_out"], ends_E, use_psum_layout=True),
        "dgrad_in": lambda: dg.m_grouped_bf16_gemm_nn_contiguous(hb, w_in, big["dgrad_in"], ends_E, use_psum_layout=True),
    }
    res = {"dims": {"D": D, "F": Fe, "E": E, "K": K, "tokens": tokens}, "alignment": align, "engine_buffer_rows": rows,
           "padding_rows_share": (Mp - A) / Mp, "gemms": {}}
    log(f"{name}: D {D} F {Fe} E {E} k {K}; DeepGEMM alignment {align}, {100 * (Mp - A) / Mp:.1f}% padding rows")
    for label, call in calls.items():
        if label.startswith("wgrad"):
            outs[label].zero_()
        call()  # the first call compiles the kernel (nvcc, cached in DG_JIT_CACHE_DIR)
        if label in psum:
            psum[label]()
        if compile_only:
            continue
        want = ops.grouped[label](ops.offs).float()
        got = outs[label].float() if label.startswith("wgrad") else outs[label][real_A].float()
        err = float((got - want).abs().max() / want.abs().max())
        variants = {"dense": lambda: torch.mm(*ops.dense[label]), "grouped_mm": lambda: ops.grouped[label](ops.offs),
                    "deepgemm": call}
        if label in psum:
            variants["deepgemm psum"] = psum[label]
        times = round_robin(variants, rounds, rep_ms)
        row = {k: statistics.median(v) for k, v in times.items()}
        row["spread"] = {k: [min(v), max(v)] for k, v in times.items()}
        row["deepgemm_vs_grouped_mm_rel_diff"] = err
        if label in psum:
            row["deepgemm_psum_vs_grouped_mm_rel_diff"] = float((big[label][real_A].float() - want).abs().max() / want.abs().max())
        res["gemms"][label] = row
        log(f"  {label:9s} " + "  ".join(f"{k} {row[k]:.3f}" for k in variants) + f"  (rel diff {err:.1e})")
    if not compile_only:
        res["totals_ms"] = {k: sum(r[k] for r in res["gemms"].values()) for k in ("dense", "grouped_mm", "deepgemm")}
        # what the engine runs with DeepGEMM enabled: its m-grouped kernels in the psum layout, F.grouped_mm's weight gradients
        res["totals_ms"]["engine on deepgemm"] = sum(r.get("deepgemm psum", r["grouped_mm"]) for r in res["gemms"].values())
        log("  six GEMMs: " + ", ".join(f"{k} {v:.3f}" for k, v in res["totals_ms"].items()))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deepgemm", type=Path, required=True, help="a DeepGEMM source tree with its _C extension built")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--compile-only", action="store_true", help="run each GEMM once (fills the JIT cache), no timing")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/deepgemm_groups.py needs an sm90 GPU")
    sys.path.insert(0, str(args.deepgemm))
    import deep_gemm

    report = {"env": environment(torch.device("cuda")), "deepgemm": getattr(deep_gemm, "__version__", "?"),
              "tokens": args.tokens, "rounds": args.rounds, "rep_ms": args.rep_ms,
              "note": __doc__.split("\n\n")[0], "shapes": {}}
    for name in args.shapes:
        report["shapes"][name] = run_shape(deep_gemm, name, SHAPES[name], args.tokens, args.rounds, args.rep_ms,
                                           args.compile_only, print)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
