"""Where does the expert grouped GEMM lose to the dense GEMM of the same FLOPs: the groups or the kernel?

``grouped_gemm_tiles.py`` found ``F.grouped_mm`` 1.04-1.54x slower than one dense GEMM of the same FLOPs on
the six GEMMs of a fwd+bwd (switch-like worst: 32 groups of ~512 rows). This benchmark separates the causes,
for each shape of ``moe_layer.py`` and each of the six GEMMs, all in one process on one GPU:
  - ``dense``: one ``torch.mm`` of the dense-active MLP (the ceiling the issue compares against);
  - ``one group``: ``F.grouped_mm`` over a single group holding every row, against ``torch.mm`` of that exact
    problem (``mm same problem``): the grouped kernel against cuBLAS, with no grouping at all;
  - ``equal groups``: every expert gets exactly tokens*k/E rows (a multiple of 128 on every shape here):
    what grouping costs without partial tiles;
  - ``routed``: the groups of a random top-k routing (what the layer sees), and the same sizes rounded up
    to 128 rows per group (``rows padded``: the share of a 128-row tile schedule's rows that are padding);
  - ``per-expert mm``: the routed groups as one ``torch.mm`` (cuBLAS) per expert on sizes the host knows
    (Megatron-Core's GroupedMLP reads the counts to the host once per layer); ``+ sync`` also reads the
    offsets from the device in every call, the worst case of that host sync.
Variants are timed round-robin, several rounds of ~100 ms each, and the median taken: at the card's power
cap a single short run lands in whatever power state the variant before left (NOTES.md, eighth session).

    python benchmarks/grouped_gemm_groups.py --out results.json
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.grouped_gemm_tiles import operands  # noqa: E402
from benchmarks.moe_layer import SHAPES, environment  # noqa: E402


def bench(fn, rep_ms: float) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=rep_ms, return_mode="median")


def round_robin(variants: dict, rounds: int, rep_ms: float) -> dict[str, list[float]]:
    """ms of each variant in each of ``rounds`` round-robin rounds (every variant sees every power state)."""
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(bench(fn, rep_ms))
    return times


def offsets_for(sizes_E: list[int], dev) -> torch.Tensor:
    return torch.tensor(sizes_E, device=dev, dtype=torch.int64).cumsum(0).to(torch.int32)


def bounds_of(offs_E: torch.Tensor) -> list[tuple[int, int]]:
    """Each expert's [start, end) rows, read to the host."""
    ends = offs_E.tolist()
    return list(zip([0] + ends[:-1], ends))


def run_shape(name, dims, tokens, rounds, rep_ms, log) -> dict:
    D, Fe, E, K, _ = dims
    dev = "cuda"
    A = tokens * K
    if A % E:
        raise SystemExit(f"{name}: tokens*k = {A} is not a multiple of E = {E}")
    ops = operands(dims, tokens)
    w_in, w_out, routed, x_AD, h_AH, h_AF, g_AD = ops.w_in, ops.w_out, ops.offs, ops.x_AD, ops.h_AH, ops.h_AF, ops.g_AD
    groups = {"routed": routed, "equal groups": offsets_for([A // E] * E, dev)}
    bounds = bounds_of(routed)
    sizes = [j - i for i, j in bounds]
    padded = sum(-(-n // 128) * 128 for n in sizes)
    one = torch.tensor([A], device=dev, dtype=torch.int32)
    w1_in, w1_out = w_in[:1].contiguous(), w_out[:1].contiguous()

    def per_expert(case, b_of):  # one cuBLAS mm per expert over its rows, sizes from the host
        def run(sync=False):
            bnds = bounds_of(routed) if sync else bounds
            if case == "wgrad":
                return [torch.mm(b_of[0][:, i:j], b_of[1][i:j]) for i, j in bnds]
            return [torch.mm(b_of[0][i:j], b_of[1](e)) for e, (i, j) in enumerate(bnds)]
        return run

    per = {"fwd_in": per_expert("fwd", (x_AD, lambda e: w_in[e].t())),
           "fwd_out": per_expert("fwd", (h_AF, lambda e: w_out[e].t())),
           "dgrad_out": per_expert("fwd", (g_AD, lambda e: w_out[e])),
           "dgrad_in": per_expert("fwd", (h_AH, lambda e: w_in[e])),
           "wgrad_in": per_expert("wgrad", (h_AH.t(), x_AD)),
           "wgrad_out": per_expert("wgrad", (g_AD.t(), h_AF))}
    # label: (one-group call, torch.mm of the one-group problem)
    cases = {
        "fwd_in": (lambda: F.grouped_mm(x_AD, w1_in.transpose(-2, -1), offs=one), (x_AD, w1_in[0].t())),
        "fwd_out": (lambda: F.grouped_mm(h_AF, w1_out.transpose(-2, -1), offs=one), (h_AF, w1_out[0].t())),
        "dgrad_out": (lambda: F.grouped_mm(g_AD, w1_out, offs=one), (g_AD, w1_out[0])),
        "dgrad_in": (lambda: F.grouped_mm(h_AH, w1_in, offs=one), (h_AH, w1_in[0])),
        "wgrad_in": (lambda: F.grouped_mm(h_AH.t(), x_AD, offs=one), (h_AH.t(), x_AD)),
        "wgrad_out": (lambda: F.grouped_mm(g_AD.t(), h_AF, offs=one), (g_AD.t(), h_AF)),
    }
    res = {"dims": {"D": D, "F": Fe, "E": E, "K": K, "tokens": tokens},
           "routed_rows_per_expert": {"min": min(sizes), "max": max(sizes), "mean": A / E},
           "rows_padded_to_128": (padded - A) / padded, "gemms": {}}
    log(f"{name}: D {D} F {Fe} E {E} k {K}; routed rows/expert {min(sizes)}-{max(sizes)}, "
        f"{100 * (padded - A) / padded:.1f}% of a 128-row schedule is padding")
    for label, (one_group, mm_ab) in cases.items():
        dense_ab, grouped = ops.dense[label], ops.grouped[label]
        ref = one_group()
        if label.startswith("wgrad"):
            ref = ref[0]
        err = float((ref.float() - torch.mm(*mm_ab).float()).abs().max())
        variants = {"dense": lambda: torch.mm(*dense_ab), "mm same problem": lambda: torch.mm(*mm_ab),
                    "one group": one_group}
        variants.update({k: (lambda o=o: grouped(o)) for k, o in groups.items()})
        variants["per-expert mm"] = per[label]
        variants["per-expert mm + sync"] = lambda f=per[label]: f(sync=True)
        got, want = per[label](), grouped(routed)
        per_err = float((torch.stack(got) if label.startswith("wgrad") else torch.cat(got)).float()
                        .sub(want.float()).abs().max())
        times = round_robin(variants, rounds, rep_ms)
        row = {k: statistics.median(v) for k, v in times.items()}
        row["spread"] = {k: [min(v), max(v)] for k, v in times.items()}
        row["one_group_vs_mm_max_abs_diff"] = err
        row["per_expert_vs_grouped_max_abs_diff"] = per_err
        res["gemms"][label] = row
        log(f"  {label:9s} " + "  ".join(f"{k} {row[k]:.3f}" for k in variants)
            + f"  (one group vs mm: max |diff| {err:.2e}; per-expert vs grouped {per_err:.2e})")
    tot = {k: sum(res["gemms"][g][k] for g in cases) for k in ("dense", "mm same problem", "one group",
                                                                 "equal groups", "routed", "per-expert mm",
                                                                 "per-expert mm + sync")}
    res["totals_ms"] = tot
    log("  six GEMMs: " + ", ".join(f"{k} {v:.3f}" for k, v in tot.items()))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=5, help="round-robin rounds over the variants (median kept)")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="timed milliseconds per variant and round")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/grouped_gemm_groups.py needs a CUDA GPU (F.grouped_mm runs on sm90+)")
    report = {"env": environment(torch.device("cuda")), "tokens": args.tokens, "rounds": args.rounds,
              "rep_ms": args.rep_ms, "note": __doc__.split("\n\n")[0], "shapes": {}}
    for name in args.shapes:
        report["shapes"][name] = run_shape(name, SHAPES[name], args.tokens, args.rounds, args.rep_ms, print)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
