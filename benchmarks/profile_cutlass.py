"""The engine layer's fwd+bwd with the expert GEMMs on F.grouped_mm and on the tuned CUTLASS kernels
(``moe/cutlass_gemm.py``), in one process: wall time over 20 steps (alternating twice), then the GPU kernels
of 5 profiled steps of each, by self time. Needs an sm90 GPU, nvcc and a CUTLASS checkout.

    python benchmarks/profile_cutlass.py --cutlass PATH/TO/cutlass olmoe-like mixtral-like
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.moe_layer import SHAPES, engine_train_step  # noqa: E402
from moe_engine.moe import cutlass_gemm  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="+", choices=list(SHAPES))
    ap.add_argument("--cutlass", type=Path, required=True, help="a CUTLASS checkout")
    ap.add_argument("--build-dir", type=Path, default=Path(".cache/moe-lab-kernels"))
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    cutlass_gemm.enable(args.cutlass, args.build_dir)
    for shape in args.shapes:
        _, step = engine_train_step(shape, args.tokens)
        for use in (False, True, False, True):
            cutlass_gemm.SWITCH["enabled"] = use
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                step()
            end.record()
            end.synchronize()
            print(shape, "cutlass" if use else "torch", "fwd+bwd ms", round(start.elapsed_time(end) / 20, 3), flush=True)
        for use in (False, True):
            cutlass_gemm.SWITCH["enabled"] = use
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            rows = sorted((ev for ev in prof.key_averages() if ev.device_type.name == "CUDA"),
                          key=lambda ev: -ev.self_device_time_total)
            busy = sum(ev.self_device_time_total for ev in rows) / 5 / 1000
            print(f"== {shape} {'cutlass' if use else 'torch'}: GPU busy {busy:.3f} ms/step")
            for ev in rows[:14]:
                print(f"   {ev.self_device_time_total / 5 / 1000:7.3f} ms  x{ev.count / 5:4.1f}  {ev.key[:110]}")
        cutlass_gemm.SWITCH["enabled"] = True
        print(cutlass_gemm.choices())


if __name__ == "__main__":
    main()
