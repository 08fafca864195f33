"""RMSNorm fwd+bwd on one GPU: transformers' eager module against torch's fused ``F.rms_norm``, which
``fuse_rms_norms`` (``moe_engine/models/norms.py``) runs in its place, at the widths the models here
normalise: 128 (Qwen3's per-head q/k norm), 2048 (OLMoE's hidden size and its whole-projection q/k
norms), 4096 (Mixtral) and 7168 (DeepSeek-V3). One process, variants timed round-robin (several rounds,
the median), bf16, the input and the weight both trained. The norms' share of a training step is
measured by ``pretrain_throughput.py`` (run option ``eagernorm``); this isolates the kernels.
(``results/norm_kernels_h200_triton.json`` is the run that compared a first, Triton, version too.)

    python benchmarks/norm_kernels.py --out benchmarks/results/norm_kernels_h200.json
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.grouped_gemm_groups import round_robin  # noqa: E402
from benchmarks.moe_layer import environment  # noqa: E402
from moe_engine.models.norms import rms_norm  # noqa: E402

WIDTHS = (128, 2048, 4096, 7168)


def variants(dim: int, eps: float = 1e-6):
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    eager = OlmoeRMSNorm(dim, eps=eps).to("cuda", torch.bfloat16)
    return {
        "transformers eager": eager,
        "engine (F.rms_norm)": lambda x: rms_norm(x, eager.weight, eps),
    }, eager.weight


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="rows per call (tokens of a micro-batch)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rep-ms", type=float, default=50.0, help="ms of timed repetitions per variant and round")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for dim in WIDTHS:
        fns, weight = variants(dim)
        x = torch.randn(args.tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)

        def step(fn):
            x.grad = weight.grad = None
            fn(x).backward(g)

        times = round_robin({name: (lambda fn=fn: step(fn)) for name, fn in fns.items()}, args.rounds, args.rep_ms)
        row = {"dim": dim, "tokens": args.tokens, "ms_fwd_bwd": {n: statistics.median(t) for n, t in times.items()}}
        base = row["ms_fwd_bwd"]["transformers eager"]
        row["speedup_vs_eager"] = {n: base / t for n, t in row["ms_fwd_bwd"].items()}
        # bytes a fused fwd+bwd must move: x and y forward; x, dy and dx backward (bf16)
        row["engine_GBps"] = 5 * x.numel() * 2 / row["ms_fwd_bwd"]["engine (F.rms_norm)"] / 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"env": environment(torch.device("cuda")), "rounds": args.rounds, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
