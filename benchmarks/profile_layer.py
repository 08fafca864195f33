"""Where the engine layer's time goes, against the dense-active MLP, per shape of ``moe_layer.py``.

For each shape and module (engine, dense with the fused SwiGLU): the eager fwd+bwd time, the same
step replayed from a CUDA graph (what is left when no kernel waits on the CPU to launch it: eager
minus graph is launch overhead), and a torch.profiler window summarised by ``trace_summary.py``
(GPU busy time, kernels by category, top kernels).

    python benchmarks/profile_layer.py --shapes olmoe-like switch-like --out profile.json
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.moe_layer import SHAPES, DenseSwiGLU, engine_layer, environment  # noqa: E402
from benchmarks.trace_summary import load, summarise  # noqa: E402


def graph_time(step, bench) -> float | str:
    """ms per replay of ``step`` captured in a CUDA graph, or why it could not be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        return bench(graph.replay)
    except Exception as exc:  # a capture failure is a finding too (a host sync inside the step)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def profile_module(module, x, g, fwd_only: bool, reps: int, top: int) -> dict:
    import triton.testing

    def step():
        if fwd_only:
            with torch.no_grad():
                module(x)
        else:  # grads set to None as in training, so no accumulation kernels are counted
            for p in list(module.parameters()) + [x]:
                p.grad = None
            module(x).backward(g)

    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")  # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    row = {"eager_ms": bench(step)}
    acts = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        row["profile"] = summarise(load(trace), 5, top)
    row["graph_ms"] = graph_time(step, bench)  # last: a failed capture can leave the stream unusable
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=sorted(SHAPES), choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--top", type=int, default=15, help="rows of the top-kernel table")
    ap.add_argument("--reps", type=int, default=200, help="ms of timed repetitions")
    ap.add_argument("--fwd-only", action="store_true", help="inference: forward under no_grad")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args()
    report = {"env": environment(torch.device("cuda")), "tokens": args.tokens, "fwd_only": args.fwd_only, "shapes": {}}
    for shape in args.shapes:
        D, F_, E, K, norm = SHAPES[shape]
        x = torch.randn(1, args.tokens, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        rows = {}
        for name, make in (("engine", lambda: engine_layer(D, F_, E, K, norm)), ("dense", lambda: DenseSwiGLU(D, K * F_, fused=True))):
            module = make().to("cuda", torch.bfloat16)
            rows[name] = profile_module(module, x, g, args.fwd_only, args.reps, args.top)
            p = rows[name]["profile"]
            print(f"== {shape} {name}: eager {rows[name]['eager_ms']:.3f} ms, graph {rows[name]['graph_ms']}, "
                  f"GPU busy {p['gpu_busy_ms_per_step']:.3f} ms, {p['kernels_per_step']:.0f} kernels", flush=True)
            print("   " + json.dumps(p["by_category_ms_per_step"]), flush=True)
            del module
            torch.cuda.empty_cache()
        report["shapes"][shape] = rows
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
