"""MoE layer benchmark: the engine layer against a dense SwiGLU MLP with the same active FLOPs,
transformers' sparse block with each experts implementation, and DeepSpeed-MoE's layer.

bf16, forward+backward and forward-only, at 16,384 tokens for three shapes and a decode case
(8 tokens, forward only). Every variant gets the same router and expert weights and is checked
against a float32 reference before it is timed. Run on the lent GPU:

    python benchmarks/moe_layer.py --out benchmarks/results/moe_layer_h100.json

``--smoke`` runs tiny shapes on the CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_engine.moe import cutlass_gemm, deepgemm_gemm, dispatch  # noqa: E402
from moe_engine.moe.graphs import MoEGraphs  # noqa: E402
from moe_engine.moe import router_kernels  # noqa: E402
from moe_engine.moe import swiglu as swiglu_mod  # noqa: E402
from moe_engine.moe.layer import MoEConfig  # noqa: E402
from moe_engine.moe.router import RouterConfig  # noqa: E402

# name: (D, F, E, K, renormalise top-k weights)
SHAPES = {
    "mixtral-like": (1024, 3584, 8, 2, True),
    "olmoe-like": (2048, 1024, 64, 8, False),
    "switch-like": (768, 3072, 32, 1, False),
    # fine-grained, 128 experts: Qwen3-30B-A3B's MoE layer (hidden 2048, moe_intermediate 768, 128 experts, top-8)
    "qwen3-moe-like": (2048, 768, 128, 8, True),
}
SMOKE_SHAPES = {"smoke": (64, 96, 8, 2, True), "smoke-k1": (32, 64, 4, 1, False)}


# ---------------------------------------------------------------- variants
class DenseSwiGLU(nn.Module):
    """The dense baseline: transformers' MLP layout (gate, up, down) with F_dense = K * F."""

    def __init__(self, D, F_dense, fused=False):
        super().__init__()
        self.fused = fused
        if fused:  # the engine's own building blocks: one [2F, D] GEMM + fused SwiGLU
            self.gate_up = nn.Linear(D, 2 * F_dense, bias=False)
        else:
            self.gate_proj = nn.Linear(D, F_dense, bias=False)
            self.up_proj = nn.Linear(D, F_dense, bias=False)
        self.down_proj = nn.Linear(F_dense, D, bias=False)

    def forward(self, x):
        if self.fused:
            return self.down_proj(swiglu_mod.swiglu(self.gate_up(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


AUX_LOSS_COEF = 0.01  # the engine layer trains with its balance loss, as in pretraining


def engine_layer(D, F_, E, K, norm, aux_loss_coef=AUX_LOSS_COEF):
    rc = RouterConfig(kind="topk", num_experts=E, top_k=K, norm_topk_prob=norm, aux_loss_coef=aux_loss_coef)
    return MoEConfig(hidden_size=D, ffn_size=F_, router=rc).build()


def hf_block(D, F_, E, K, norm, impl, weights):
    from transformers import MixtralConfig, OlmoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    if norm:
        cfg = MixtralConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=K)
        block = MixtralSparseMoeBlock(cfg)
    else:  # OLMoE's block keeps raw top-k probabilities
        cfg = OlmoeConfig(hidden_size=D, intermediate_size=F_, num_experts=E, num_experts_per_tok=K, norm_topk_prob=False)
        block = OlmoeSparseMoeBlock(cfg)
    cfg._experts_implementation = impl
    with torch.no_grad():
        block.gate.weight.copy_(weights["router"])
        block.experts.gate_up_proj.copy_(weights["gate_up"])
        block.experts.down_proj.copy_(weights["down"])
    return block


class DeepSpeedMoE(nn.Module):
    def __init__(self, D, F_, E, K, weights, drop_tokens):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(
            hidden_size=D, expert=DenseSwiGLU(D, F_), num_experts=E, ep_size=1, k=K, capacity_factor=1.0,
            eval_capacity_factor=1.0, min_capacity=0, drop_tokens=drop_tokens, use_rts=False, use_residual=False,
            top2_2nd_expert_sampling=False,  # deterministic top-2, like every other variant
        )
        with torch.no_grad():
            self.moe.deepspeed_moe.gate.wg.weight.copy_(weights["router"])
            for e, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                expert.gate_proj.weight.copy_(weights["gate_up"][e, :F_])
                expert.up_proj.weight.copy_(weights["gate_up"][e, F_:])
                expert.down_proj.weight.copy_(weights["down"][e])

    def forward(self, x):
        return self.moe(x)[0]


def init_deepspeed_single_process():
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def engine_train_step(shape: str, tokens: int):
    """(the engine layer of ``shape`` in bf16 on the GPU, a fwd+bwd step on fixed input and output gradient)."""
    D, F_, E, K, norm = SHAPES[shape]
    torch.manual_seed(0)
    layer = engine_layer(D, F_, E, K, norm).cuda().to(torch.bfloat16)
    x = torch.randn(1, tokens, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)

    def step():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        layer(x).backward(g)

    return layer, step


def graphed_engine(engine, tokens, D, device, dtype):
    """The engine layer with its training forward and backward captured (``moe/graphs.py``): one
    recorded eager step, then capture; the benchmark's fwd+bwd then replays both graphs."""
    graphs = MoEGraphs([engine]).record()
    x_BSD = torch.randn(1, tokens, D, device=device, dtype=dtype, requires_grad=True)
    engine(x_BSD).backward(torch.randn_like(x_BSD))
    engine.zero_grad(set_to_none=True)
    graphs.capture()
    return engine


# ---------------------------------------------------------------- reference
def reference_fp32(x_TD, weights, K, norm, router_fp32=False):
    """Float32 MoE from the definition, routing on logits of the variant's router precision
    (bf16 logits flip a few near-tied top-k choices, which alone moves the output by ~4%)."""
    if router_fp32:
        logits_TE = F.linear(x_TD.float(), weights["router"].float())
    else:
        logits_TE = F.linear(x_TD, weights["router"].to(x_TD.dtype)).float()
    probs_TE = logits_TE.softmax(-1)
    top_w, top_i = probs_TE.topk(K, dim=-1)
    if norm:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    x32 = x_TD.float()
    out = torch.zeros_like(x32)
    gate_up, down = weights["gate_up"].float(), weights["down"].float()
    for e in range(gate_up.shape[0]):
        w_T = (top_w * (top_i == e)).sum(-1)
        rows = w_T.nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        g, u = (x32[rows] @ gate_up[e].t()).chunk(2, dim=-1)
        out[rows] += w_T[rows, None] * ((F.silu(g) * u) @ down[e].t())
    return out


# ---------------------------------------------------------------- timing
def bench(fn, device, reps):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_shape(name, dims, tokens, device, dtype, reps, include_ds, log, only=None):
    D, F_, E, K, norm = dims
    torch.manual_seed(0)
    engine = engine_layer(D, F_, E, K, norm).to(device, dtype)
    weights = {
        "router": engine.gate.weight.detach().clone(),
        "gate_up": engine.experts.gate_up_proj.detach().clone(),
        "down": engine.experts.down_proj.detach().clone(),
    }
    # realistic scale: unit-variance activations, weights ~ 1/sqrt(fan_in)
    with torch.no_grad():
        weights["router"].normal_(0, D**-0.5)
        weights["gate_up"].normal_(0, D**-0.5)
        weights["down"].normal_(0, F_**-0.5)
        engine.gate.weight.copy_(weights["router"])
        engine.experts.gate_up_proj.copy_(weights["gate_up"])
        engine.experts.down_proj.copy_(weights["down"])

    variants = {"engine": lambda: engine}
    variants["engine (eager SwiGLU)"] = lambda: engine
    variants["engine (PyTorch router)"] = lambda: engine  # the router before its fused kernel
    variants["engine (int64 sort keys)"] = lambda: engine  # the dispatch sort before its narrow keys
    variants["engine (index_select permute)"] = lambda: engine  # the forward permute before scatter_rows
    variants["dense (HF MLP)"] = lambda: DenseSwiGLU(D, K * F_).to(device, dtype)
    variants["dense (fused SwiGLU)"] = lambda: DenseSwiGLU(D, K * F_, fused=True).to(device, dtype)
    if cutlass_gemm.loaded():  # --cutlass: the expert GEMMs on the per-shape tuned CUTLASS kernels
        variants["engine (CUTLASS tuned)"] = lambda: engine
    if "module" in deepgemm_gemm._state:  # --deepgemm: forward and input gradients on DeepGEMM, aligned groups
        variants["engine (aligned groups, grouped_mm)"] = lambda: engine  # the layout alone, on F.grouped_mm
        variants["engine (DeepGEMM m-grouped)"] = lambda: engine
    if device.type == "cuda":  # the training step replayed from CUDA graphs, the dense baseline likewise
        variants["engine (CUDA graph)"] = lambda: graphed_engine(engine, tokens, D, device, dtype)
        if cutlass_gemm.loaded():
            variants["engine (CUTLASS tuned, CUDA graph)"] = lambda: graphed_engine(engine, tokens, D, device, dtype)
        if "module" in deepgemm_gemm._state:
            variants["engine (DeepGEMM m-grouped, CUDA graph)"] = lambda: graphed_engine(engine, tokens, D, device, dtype)
        variants["dense (fused SwiGLU, CUDA graph)"] = lambda: torch.cuda.make_graphed_callables(
            DenseSwiGLU(D, K * F_, fused=True).to(device, dtype),
            (torch.randn(1, tokens, D, device=device, dtype=dtype, requires_grad=True),))
    for impl in ("eager", "grouped_mm", "batched_mm", "sonicmoe", "deepgemm"):
        variants[f"transformers {impl}"] = lambda impl=impl: hf_block(D, F_, E, K, norm, impl, weights).to(device, dtype)
    if include_ds:
        variants["deepspeed-moe (dropless)"] = lambda: DeepSpeedMoE(D, F_, E, K, weights, False).to(device, dtype)

    if only:  # --variants: these names only (the dense baselines always run)
        variants = {k: v for k, v in variants.items() if k.startswith("dense") or k in only}
    x_TD = torch.randn(tokens, D, device=device, dtype=dtype)
    refs = {}
    narrow_keys = dispatch.sort_key_dtype
    grad_out = torch.randn(1, tokens, D, device=device, dtype=dtype)
    results = {}
    for vname, make in variants.items():
        row = {}
        swiglu_mod.FUSED["enabled"] = "eager SwiGLU" not in vname
        cutlass_gemm.SWITCH["enabled"] = "CUTLASS" in vname
        deepgemm_gemm.SWITCH["enabled"] = "DeepGEMM" in vname
        dispatch.ALIGN["rows"] = deepgemm_gemm.ALIGN if "aligned groups" in vname else 0
        router_kernels.FUSED["enabled"] = "PyTorch router" not in vname
        if "int64 sort keys" in vname:
            dispatch.sort_key_dtype = lambda num_ids: torch.int64
        dispatch.SCATTER["enabled"] = "index_select permute" not in vname
        try:
            if vname.startswith("transformers batched_mm") and tokens * K * 3 * F_ * D * 2 > 20e9:
                raise MemoryError(f"batched_mm gathers a weight copy per token: {tokens * K * 3 * F_ * D * 2 / 1e9:.0f} GB")
            module = make()
            x_BSD = x_TD.view(1, tokens, D).clone().requires_grad_(True)
            params = [p for p in module.parameters()]
            with torch.no_grad():
                out = module(x_BSD).view(tokens, D).float()
            if not vname.startswith("dense"):
                # DeepSpeed's gate runs in float32 and renormalises the top-k weights whenever K > 1
                key = (K > 1, True) if vname.startswith("deepspeed") else (norm, False)
                if key not in refs:
                    refs[key] = reference_fp32(x_TD, weights, K, *key)
                ref = refs[key]
                row["rel_err_vs_fp32"] = ((out - ref).norm() / ref.norm()).item()
                row["checked"] = row["rel_err_vs_fp32"] < 3e-2
                if not row["checked"]:
                    raise AssertionError(f"wrong result: rel err {row['rel_err_vs_fp32']:.3g} vs the fp32 reference")

            def fwd():
                with torch.no_grad():
                    module(x_BSD)

            def fwd_bwd():
                for p in params:
                    p.grad = None
                x_BSD.grad = None
                module(x_BSD).backward(grad_out)

            row["fwd_ms"] = bench(fwd, device, reps)
            if tokens > 64:
                row["fwd_bwd_ms"] = bench(fwd_bwd, device, reps)
        except Exception as exc:  # record why a variant could not run, keep going
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        finally:
            if engine.graphs is not None:
                engine.graphs.release()
            swiglu_mod.FUSED["enabled"] = True
            cutlass_gemm.SWITCH["enabled"] = True
            deepgemm_gemm.SWITCH["enabled"] = True
            dispatch.ALIGN["rows"] = 0
            router_kernels.FUSED["enabled"] = True
            dispatch.sort_key_dtype = narrow_keys
            dispatch.SCATTER["enabled"] = True
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results[vname] = row
        log(f"{name:14s} T={tokens:<6d} {vname:28s} {json.dumps(row)}")
    dense_keys = [k for k in results if k.startswith("dense") and "error" not in results[k]]
    for mode in ("fwd_bwd_ms", "fwd_ms"):
        best = min((results[k][mode] for k in dense_keys if mode in results[k]), default=None)
        if best:
            for row in results.values():
                if mode in row:
                    row[mode.replace("_ms", "_vs_best_dense")] = row[mode] / best
    return results


def environment(device):
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
    }
    for mod in ("transformers", "deepspeed", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:
            env[mod] = f"unavailable ({type(exc).__name__})"
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--reps", type=int, default=200, help="ms of timed repetitions per variant (GPU)")
    ap.add_argument("--shapes", nargs="*", help="subset of shape names")
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--variants", nargs="*", help="only these variants, by name (the dense ones always run)")
    ap.add_argument("--cutlass", type=Path, help="a CUTLASS checkout: adds the engine on the tuned CUTLASS kernels")
    ap.add_argument("--cutlass-build", type=Path, default=Path(".cache/moe-lab-kernels"),
                    help="where the CUTLASS kernels are built and kept (default .cache/moe-lab-kernels)")
    ap.add_argument("--deepgemm", type=Path, help="a DeepGEMM source tree (with submodules): adds the engine with its "
                    "forward and input-gradient GEMMs on DeepGEMM (moe/deepgemm_gemm.py)")
    args = ap.parse_args(argv)
    if args.cutlass:
        cutlass_gemm.enable(args.cutlass, args.cutlass_build)
    if args.deepgemm:
        deepgemm_gemm.enable(args.deepgemm, args.cutlass_build)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if k in args.shapes}
    tokens = 256 if args.smoke else args.tokens
    include_ds = not args.no_deepspeed
    if include_ds:
        try:
            init_deepspeed_single_process()
        except Exception as exc:
            print(f"DeepSpeed unavailable: {exc}", file=sys.stderr)
            include_ds = False
    report = {"env": environment(device), "dtype": str(dtype), "tokens": tokens, "cutlass_choices": {},
              "engine_router": f"top-k softmax with the balance loss (coef {AUX_LOSS_COEF}) in fwd+bwd", "shapes": {}}
    for name, dims in shapes.items():
        D, F_, E, K, norm = dims
        report["shapes"][name] = {
            "dims": dict(D=D, F=F_, E=E, K=K, norm_topk_prob=norm),
            "train": run_shape(name, dims, tokens, device, dtype, args.reps, include_ds, print, args.variants),
            "decode": run_shape(name, dims, args.decode_tokens, device, dtype, args.reps, include_ds, print, args.variants),
        }
    report["cutlass_choices"] = cutlass_gemm.choices()
    print("\nshape           variant                        fwd+bwd ms  x dense   fwd ms   x dense   decode fwd ms")
    for name, r in report["shapes"].items():
        for v, row in r["train"].items():
            dec = r["decode"].get(v, {})
            fmt = lambda x, f="{:8.3f}": f.format(x) if isinstance(x, float) else "       -"  # noqa: E731
            print(f"{name:15s} {v:30s} {fmt(row.get('fwd_bwd_ms'))}  {fmt(row.get('fwd_bwd_vs_best_dense'), '{:6.2f}x')}"
                  f"  {fmt(row.get('fwd_ms'))}  {fmt(row.get('fwd_vs_best_dense'), '{:6.2f}x')}  {fmt(dec.get('fwd_ms'))}"
                  f"  {row.get('error', '')[:60]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
