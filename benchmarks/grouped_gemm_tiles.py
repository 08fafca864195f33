"""Tile configurations of the expert grouped GEMM: does another CUTLASS tile beat the one torch picks?

``F.grouped_mm`` on an H100/H200 runs one CUTLASS 3 kernel for groups of more than 128 rows: cooperative
schedule, 128x256x64 tiles, 2x1 clusters, rasterised along M without swizzle. This benchmark builds the
same kernel family from ``moe_engine/moe/grouped_gemm_sm90.cu`` at other tiles, clusters and schedules
(``moe_engine/moe/cutlass_gemm.py``: one shared library each, built by nvcc on first use), and times, for
each shape of ``moe_layer.py`` and each of the six GEMMs of a fwd+bwd, in one process on one GPU:
  - ``torch``: ``F.grouped_mm`` exactly as the engine calls it (the baseline);
  - each configuration, at two rasterisations and two swizzles (runtime arguments of the same kernel);
  - ``dense``: one ``torch.mm`` of the same FLOPs (the dense-active MLP's GEMM: the ceiling).
Every output is compared with torch's (max abs difference relative to its max).

    python benchmarks/grouped_gemm_tiles.py --cutlass PATH/TO/cutlass --out results.json
"""

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.moe_layer import SHAPES, environment  # noqa: E402
from moe_engine.moe import cutlass_gemm, dispatch  # noqa: E402
from moe_engine.moe.cutlass_gemm import CONFIGS, DGRAD, FWD, SCHEDULES, WGRAD  # noqa: E402


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def rel_err(out, ref) -> float:
    a, b = out.float(), ref.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def operands(dims, tokens) -> SimpleNamespace:
    """The expert GEMMs' operands of one shape on the GPU: weights as the engine holds them, the offsets of a
    random top-k routing, random activations and gradients, the dense-active GEMM of the same FLOPs for each of
    the six GEMMs (``dense``), and ``grouped[label](offs)``: ``F.grouped_mm`` exactly as the engine calls it."""
    D, Fe, E, K, _ = dims
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    w_in = torch.randn(E, 2 * Fe, D, device=dev, dtype=dt, generator=g) * 0.02  # [E, O, I] as the engine holds them
    w_out = torch.randn(E, D, Fe, device=dev, dtype=dt, generator=g) * 0.02
    expert_TK = torch.randn(tokens, E, device=dev, generator=g).topk(K, dim=-1).indices
    p = dispatch.plan(expert_TK.reshape(-1), E, may_drop=False)
    A = tokens * K
    x_AD = torch.randn(A, D, device=dev, dtype=dt, generator=g)
    h_AH = torch.randn(A, 2 * Fe, device=dev, dtype=dt, generator=g)
    h_AF = torch.randn(A, Fe, device=dev, dtype=dt, generator=g)
    g_AD = torch.randn(A, D, device=dev, dtype=dt, generator=g)
    offs = p.offsets_E.to(torch.int32).contiguous()
    H, Ka = 2 * Fe, K  # the dense-active MLP has K times the expert width
    dense = {  # one GEMM of the same FLOPs as each grouped one
        "fwd_in": (torch.randn(tokens, D, device=dev, dtype=dt), torch.randn(D, Ka * H, device=dev, dtype=dt)),
        "fwd_out": (torch.randn(tokens, Ka * Fe, device=dev, dtype=dt), torch.randn(Ka * Fe, D, device=dev, dtype=dt)),
        "dgrad_out": (torch.randn(tokens, D, device=dev, dtype=dt), torch.randn(D, Ka * Fe, device=dev, dtype=dt)),
        "dgrad_in": (torch.randn(tokens, Ka * H, device=dev, dtype=dt), torch.randn(Ka * H, D, device=dev, dtype=dt)),
        "wgrad_in": (torch.randn(tokens, Ka * H, device=dev, dtype=dt).t(), torch.randn(tokens, D, device=dev, dtype=dt)),
        "wgrad_out": (torch.randn(tokens, D, device=dev, dtype=dt).t(), torch.randn(tokens, Ka * Fe, device=dev, dtype=dt)),
    }
    grouped = {
        "fwd_in": lambda o: F.grouped_mm(x_AD, w_in.transpose(-2, -1), offs=o),
        "fwd_out": lambda o: F.grouped_mm(h_AF, w_out.transpose(-2, -1), offs=o),
        "dgrad_out": lambda o: F.grouped_mm(g_AD, w_out, offs=o),
        "dgrad_in": lambda o: F.grouped_mm(h_AH, w_in, offs=o),
        "wgrad_in": lambda o: F.grouped_mm(h_AH.t(), x_AD, offs=o),
        "wgrad_out": lambda o: F.grouped_mm(g_AD.t(), h_AF, offs=o),
    }
    return SimpleNamespace(w_in=w_in, w_out=w_out, offs=offs, x_AD=x_AD, h_AH=h_AH, h_AF=h_AF, g_AD=g_AD,
                           dense=dense, grouped=grouped)


def run_shape(name, dims, tokens, configs, log) -> dict:
    D, Fe, E, K, _ = dims
    dev, dt = "cuda", torch.bfloat16
    ops = operands(dims, tokens)
    w_in, w_out, offs, dense, grouped = ops.w_in, ops.w_out, ops.offs, ops.dense, ops.grouped
    x_AD, h_AH, h_AF, g_AD = ops.x_AD, ops.h_AH, ops.h_AF, ops.g_AD
    A, H = tokens * K, 2 * Fe
    # label: (case, a, b, out shape, the case's two dims: N and K, or M and N for a weight gradient), and in
    # front of them the torch call on the routed offsets
    cases = {
        "fwd_in": (FWD, x_AD, w_in, (A, H), H, D),
        "fwd_out": (FWD, h_AF, w_out, (A, D), D, Fe),
        "dgrad_out": (DGRAD, g_AD, w_out, (A, Fe), Fe, D),
        "dgrad_in": (DGRAD, h_AH, w_in, (A, D), D, H),
        "wgrad_in": (WGRAD, h_AH, x_AD, (E, H, D), H, D),
        "wgrad_out": (WGRAD, g_AD, h_AF, (E, D, Fe), D, Fe),
    }
    cases = {k: (lambda k=k: grouped[k](offs), *v) for k, v in cases.items()}
    res = {"dims": {"D": D, "F": Fe, "E": E, "K": K, "tokens": tokens}, "gemms": {}}
    log(f"{name}: D {D} F {Fe} E {E} k {K}")
    for label, (torch_fn, case, a, b, out_shape, d1, d2) in cases.items():
        ref = torch_fn()
        row = {"torch_ms": bench(torch_fn), "dense_ms": bench(lambda: torch.mm(*dense[label])), "configs": {}}
        out = torch.empty(out_shape, device=dev, dtype=dt)
        for cfg in configs:
            for raster, swizzle in SCHEDULES:
                def call():
                    cutlass_gemm.launch(cfg, case, a, b, out, offs, d1, d2, raster, swizzle)
                key = f"{cfg}/{'N' if raster else 'M'}{swizzle}"
                out.fill_(float("nan"))
                try:
                    call()
                except RuntimeError as exc:
                    row["configs"][key] = {"error": str(exc)}
                    continue
                torch.cuda.synchronize()
                row["configs"][key] = {"ms": bench(call), "rel_err": rel_err(out, ref), "bitwise": bool(torch.equal(out, ref))}
        ok = {k: v for k, v in row["configs"].items() if "ms" in v and v["rel_err"] < 1e-2}
        best = min(ok, key=lambda k: ok[k]["ms"]) if ok else None
        row["best"] = {"config": best, **ok[best]} if best else None
        log(f"  {label:10s} torch {row['torch_ms']:.3f}  dense {row['dense_ms']:.3f}  "
            + (f"best {best} {ok[best]['ms']:.3f} ({ok[best]['ms'] / row['torch_ms']:.3f}x torch)" if best else "no config"))
        res["gemms"][label] = row
    tot = {"torch": sum(r["torch_ms"] for r in res["gemms"].values()),
           "dense": sum(r["dense_ms"] for r in res["gemms"].values()),
           "best_per_gemm": sum((r["best"] or {"ms": r["torch_ms"]})["ms"] for r in res["gemms"].values())}
    for cfg in configs:  # one configuration for all six (a kernel per layer, not per GEMM)
        per = [min((v["ms"] for k, v in r["configs"].items() if k.startswith(cfg + "/") and "ms" in v
                    and v["rel_err"] < 1e-2), default=float("nan")) for r in res["gemms"].values()]
        tot[cfg] = sum(per)
    res["totals_ms"] = tot
    log("  totals: " + ", ".join(f"{k} {v:.3f}" for k, v in tot.items()))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cutlass", type=Path, required=True, help="a CUTLASS checkout (its include/ is used)")
    ap.add_argument("--build-dir", type=Path, default=Path(".cache/moe-lab-kernels"),
                    help="where the kernels are built (nvcc, one library per configuration) and kept")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help="subset of moe_layer.py's shape names")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/grouped_gemm_tiles.py needs a CUDA GPU (sm90)")
    configs = cutlass_gemm.enable(args.cutlass, args.build_dir, args.configs)
    report = {"env": environment(torch.device("cuda")), "tokens": args.tokens, "note": __doc__.split("\n\n")[0],
              "configs": {n: dict(zip(("tile_m", "tile_n", "tile_k", "cluster_m", "cluster_n", "pingpong"), CONFIGS[n]))
                          for n in configs}, "shapes": {}}
    for name in args.shapes:
        report["shapes"][name] = run_shape(name, SHAPES[name], args.tokens, configs, print)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
