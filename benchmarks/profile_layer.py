"""Where the engine layer's time goes: torch.profiler over forward+backward, top CUDA kernels.

    python benchmarks/profile_layer.py --shape olmoe-like
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.moe_layer import SHAPES, DenseSwiGLU, engine_layer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="olmoe-like", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--fwd-only", action="store_true", help="inference: forward under no_grad")
    args = ap.parse_args()
    D, F_, E, K, norm = SHAPES[args.shape]
    x = torch.randn(1, args.tokens, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    for name, module in (("engine", engine_layer(D, F_, E, K, norm)), ("dense", DenseSwiGLU(D, K * F_))):
        module = module.to("cuda", torch.bfloat16)

        def step():
            if args.fwd_only:
                with torch.no_grad():
                    module(x)
            else:  # grads set to None as in training, so no accumulation kernels are counted
                for p in list(module.parameters()) + [x]:
                    p.grad = None
                module(x).backward(g)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"==== {args.shape} T={args.tokens} {name} (5x {'fwd' if args.fwd_only else 'fwd+bwd'}); "
              f"{sum(e.count for e in kernels) // 5} kernels per step")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[: args.rows]:
            print(f"{e.self_device_time_total / 5:10.1f} us/step  x{e.count // 5:<3d} {e.key[:150]}")


if __name__ == "__main__":
    main()
