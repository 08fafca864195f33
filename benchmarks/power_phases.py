"""An engine layer's fwd+bwd, eager and replayed from CUDA graphs, and the dense baseline's (the fused-SwiGLU
MLP of the same active FLOPs, eager and graphed), alternated in phases of ``--seconds`` each (2 s apart), for
reading against a power and clock log taken beside it:

    nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -lms 100 > pw.csv & NP=$!
    python benchmarks/power_phases.py --shape olmoe-like --power-log pw.csv > phases.txt; kill $NP

Each phase prints ``PHASE name start end ms/step X`` (unix times), so the log's samples can be averaged per
phase. Short benchmark runs (``moe_layer.py``'s 200 ms) sit in whatever power state the previous variant
left; sustained phases show what the card's power cap allows each, and the ratio of a layer to its dense
baseline at the same sustained power is the one the issue's targets mean. With ``--power-log`` each phase line
also gets that log's mean power and SM clock over the phase (its first 0.5 s left out).
"""

import argparse
import json
import re
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.moe_layer import SHAPES, DenseSwiGLU, engine_train_step, environment, graphed_engine  # noqa: E402
from moe_engine.moe import cutlass_gemm, deepgemm_gemm, dispatch  # noqa: E402


def power_in(log: Path, t0: float, t1: float) -> str:
    """Mean power and SM clock of nvidia-smi's csv log (timestamp, power.draw, clocks.sm) within [t0, t1]."""
    watts, mhz = [], []
    for line in log.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            w, c = float(parts[1].split()[0]), float(parts[2].split()[0])
        except (ValueError, IndexError):
            continue
        if t0 + 0.5 <= t <= t1:
            watts.append(w)
            mhz.append(c)
    if not watts:
        return "no power samples"
    return f"{len(watts)} samples, power {statistics.mean(watts):.0f} W, SM clock {statistics.mean(mhz):.0f} MHz"


PHASE_RE = re.compile(r"PHASE (?P<shape>\S+) (?P<name>[a-z-]+?)(?P<round>\d+) (?P<t0>[\d.]+) (?P<t1>[\d.]+) "
                      r"ms/step (?P<ms>[\d.]+)(?:.*power (?P<w>\d+) W, SM clock (?P<mhz>\d+) MHz)?")


def records(lines, tokens: int | None = None) -> list[dict]:
    """The ``PHASE`` lines of this script's output as dicts (a ``T=N`` prefix sets the token count)."""
    out = []
    for line in lines:
        m = PHASE_RE.search(line)
        if not m:
            continue
        t = re.match(r"T=(\d+) ", line)
        out.append({"shape": m["shape"], "tokens": int(t[1]) if t else tokens, "variant": m["name"],
                    "round": int(m["round"]), "ms_per_step": float(m["ms"]),
                    "power_w": float(m["w"]) if m["w"] else None, "sm_mhz": float(m["mhz"]) if m["mhz"] else None})
    return out


def ratios(recs: list[dict]) -> dict:
    """Per shape and token count: each variant's median over rounds, and engine / dense with the best of each."""
    out = {}
    for key in sorted({(r["shape"], r["tokens"]) for r in recs}, key=str):
        ms = {}
        for r in recs:
            if (r["shape"], r["tokens"]) == key:
                ms.setdefault(r["variant"], []).append(r["ms_per_step"])
        med = {v: statistics.median(x) for v, x in ms.items()}
        if not any(v.startswith("dense") for v in med):
            out[f"{key[0]} T={key[1]}"] = {"ms": med}
            continue
        dense = min(med[v] for v in med if v.startswith("dense"))
        best = {"engine": min(med[v] for v in ("eager", "graph") if v in med)}
        if any(v.startswith("indexsel") for v in med):
            best["engine with the index_select permute"] = min(med[v] for v in med if v.startswith("indexsel"))
        if any(v.startswith("cutlass") for v in med):
            best["engine on tuned CUTLASS"] = min(med[v] for v in med if v.startswith("cutlass"))
        if any(v.startswith("deepgemm") for v in med):
            best["engine on DeepGEMM"] = min(med[v] for v in med if v.startswith("deepgemm"))
        out[f"{key[0]} T={key[1]}"] = {"ms": med, **{f"{k} vs dense": b / dense for k, b in best.items()}}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="olmoe-like", choices=list(SHAPES))
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-dense", action="store_true", help="only the engine's phases")
    ap.add_argument("--power-log", type=Path, help="nvidia-smi csv written beside this run (see above)")
    ap.add_argument("--cutlass", type=Path, help="a CUTLASS checkout: adds phases on the tuned CUTLASS expert GEMMs")
    ap.add_argument("--cutlass-build", type=Path, default=Path(".cache/moe-lab-kernels"))
    ap.add_argument("--deepgemm", type=Path, help="a DeepGEMM source tree: adds phases with the forward and input-gradient "
                    "GEMMs on DeepGEMM (aligned groups)")
    ap.add_argument("--index-select", action="store_true",
                    help="adds phases with the forward permute as an index_select (the before of dispatch_kernels.scatter_rows)")
    ap.add_argument("--out", type=Path, help="also write the phases, the environment and the ratios as JSON")
    args = ap.parse_args(argv)
    lines = []
    D, F_, _, K, _ = SHAPES[args.shape]
    if args.cutlass:
        cutlass_gemm.enable(args.cutlass, args.cutlass_build)
    cutlass_gemm.SWITCH["enabled"] = False
    if args.deepgemm:
        deepgemm_gemm.enable(args.deepgemm, args.cutlass_build)
    deepgemm_gemm.SWITCH["enabled"] = False
    eng, step = engine_train_step(args.shape, args.tokens)
    torch.manual_seed(0)
    dense = DenseSwiGLU(D, K * F_, fused=True).cuda().to(torch.bfloat16)
    x = torch.randn(1, args.tokens, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    dense_graphed = torch.cuda.make_graphed_callables(DenseSwiGLU(D, K * F_, fused=True).cuda().to(torch.bfloat16),
                                                      (x.detach().clone().requires_grad_(True),))

    def dense_step(module):
        def run():
            for p in module.parameters():
                p.grad = None
            x.grad = None
            module(x).backward(g)
        return run

    def phase(name, step):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0, n = time.time(), 0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        while time.time() - t0 < args.seconds:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
            n += 10
        end.record()
        end.synchronize()
        t1 = time.time()
        extra = f"  {power_in(args.power_log, t0, t1)}" if args.power_log else ""
        lines.append(f"PHASE {args.shape} {name} {t0:.3f} {t1:.3f} ms/step {start.elapsed_time(end) / n:.3f}{extra}")
        print(lines[-1], flush=True)
        time.sleep(2)

    def eager_and_graphed(name, i):  # the engine's step as the switches stand, eager then from CUDA graphs
        phase(f"{name}{i}", step)
        graphed_engine(eng, args.tokens, D, "cuda", torch.bfloat16)
        phase(f"{name}-graph{i}", step)
        eng.graphs.release()

    for i in range(1, args.rounds + 1):
        phase(f"eager{i}", step)
        if not args.no_dense:
            phase(f"dense{i}", dense_step(dense))
        graphed_engine(eng, args.tokens, D, "cuda", torch.bfloat16)
        phase(f"graph{i}", step)
        eng.graphs.release()
        if args.cutlass:  # the same layer with its expert GEMMs on the tuned CUTLASS kernels, eager and graphed
            cutlass_gemm.SWITCH["enabled"] = True
            eager_and_graphed("cutlass", i)
            cutlass_gemm.SWITCH["enabled"] = False
        if args.deepgemm:  # the same layer with its forward and input-gradient GEMMs on DeepGEMM
            deepgemm_gemm.SWITCH["enabled"] = True
            eager_and_graphed("deepgemm", i)
            deepgemm_gemm.SWITCH["enabled"] = False
        if args.index_select:  # the same layer before the scatter permute, eager and graphed
            dispatch.SCATTER["enabled"] = False
            eager_and_graphed("indexsel", i)
            dispatch.SCATTER["enabled"] = True
        if not args.no_dense:
            phase(f"dense-graph{i}", dense_step(dense_graphed))
    if args.out:
        recs = records(lines, args.tokens)
        args.out.write_text(json.dumps({"env": environment(torch.device("cuda")), "seconds": args.seconds,
                                        "phases": recs, "ratios": ratios(recs)}, indent=1))


if __name__ == "__main__":
    main()
