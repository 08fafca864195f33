"""LoRA on fused experts: the engine's path against peft's own ``target_parameters`` path, one MoE layer.

Both variants hold the same base expert weights and the same LoRA factors (r=16 on gate_up_proj and
down_proj, B non-zero so the update matters). peft's path (transformers' block; peft parametrises each
3-D weight as W + s * B @ A for the forward, one ``baddbmm`` per weight) against the engine's
(``x W^T + s (x A^T) B^T`` per expert inside its grouped GEMM path, no [E, out, in] delta). Timed:
forward + backward with only the LoRA factors trainable, at 16,384 tokens, bf16, the OLMoE-like layer
(E 64, k 8, D 2048, F 1024) and the Mixtral-like one (E 8, k 2, D 1024, F 3584). Each variant is
first checked against a float32 reference with the LoRA delta merged explicitly. Peak memory is the
allocator's high-water mark during one fwd+bwd minus what was allocated before.

    python benchmarks/finetune_lora.py --out benchmarks/results/finetune_lora_h200.json   # on the lent GPU
    python benchmarks/finetune_lora.py --smoke                                              # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.moe_layer import environment  # noqa: E402

SHAPES = {  # name: (arch, D, F, E, K)
    "olmoe-like": ("olmoe", 2048, 1024, 64, 8),
    "mixtral-like": ("mixtral", 1024, 3584, 8, 2),
}
SMOKE = {"smoke-olmoe": ("olmoe", 64, 32, 8, 2), "smoke-mixtral": ("mixtral", 64, 96, 4, 2)}


def one_layer_models(arch, D, F, E, K, device, dtype):
    """(stock transformers model, engine-patched copy) with one decoder layer of this shape."""
    import moe_engine as me
    from transformers import AutoModelForCausalLM

    experts = {"mixtral": "num_local_experts", "olmoe": "num_experts"}[arch]
    config = me.model_config(arch, "tiny", hidden_size=D, intermediate_size=F, num_hidden_layers=1, num_attention_heads=16,
                             num_key_value_heads=16, vocab_size=128, **{experts: E}, num_experts_per_tok=K)
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # realistic scale: weights ~ 1/sqrt(fan_in)
        layer = stock.model.layers[0].mlp
        layer.experts.gate_up_proj.normal_(0, D**-0.5)
        layer.experts.down_proj.normal_(0, F**-0.5)
        layer.gate.weight.normal_(0, D**-0.5)
    engine = me.patch(copy.deepcopy(stock), aux_loss_coef=0.0)
    impl = "grouped_mm" if device.type == "cuda" else "eager"
    stock.set_experts_implementation(impl)
    return stock.to(device, dtype), engine.to(device, dtype)


def with_lora(model, r):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=[],
                                                  target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    return peft_model


def reference(stock_block, lora_params, x_TD, K, norm):
    """float32 output of the LoRA-adapted block, the delta merged by hand from peft's factors."""
    import torch.nn.functional as F_

    experts = stock_block.experts.base_layer.base_layer if hasattr(stock_block.experts, "base_layer") else stock_block.experts
    w_gate_up = experts.gate_up_proj.float().clone()
    w_down = experts.down_proj.float().clone()
    for wrapper, w in ((stock_block.experts.base_layer, w_gate_up), (stock_block.experts, w_down)):
        lhs, rhs, scale = wrapper.get_delta_factors("default")
        w += scale * lhs.float() @ rhs.float()
    logits = F_.linear(x_TD, stock_block.gate.weight).float()
    probs = logits.softmax(-1)
    top_w, top_i = probs.topk(K, dim=-1)
    if norm:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    x32, out = x_TD.float(), torch.zeros(x_TD.shape[0], x_TD.shape[1], device=x_TD.device)
    for e in range(w_gate_up.shape[0]):
        w_T = (top_w * (top_i == e)).sum(-1)
        rows = w_T.nonzero().squeeze(-1)
        if rows.numel():
            g, u = (x32[rows] @ w_gate_up[e].t()).chunk(2, dim=-1)
            out[rows] += w_T[rows, None] * ((F_.silu(g) * u) @ w_down[e].t())
    return out


def bench(fn, device, reps_ms):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=reps_ms, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_shape(name, spec, tokens, r, device, dtype, reps):
    arch, D, F, E, K = spec
    stock, engine = one_layer_models(arch, D, F, E, K, device, dtype)
    ps, pe = with_lora(stock, r), with_lora(engine, r)
    sp, ep = dict(ps.named_parameters()), dict(pe.named_parameters())
    with torch.no_grad():
        for n, p in sp.items():
            if "lora_B" in n:
                p.normal_(0, 0.02)
                ep[n].copy_(p)
    blocks = {"peft target_parameters (transformers block)": ps.base_model.model.model.layers[0].mlp,
              "engine (LoRA inside the grouped path)": pe.base_model.model.model.layers[0].mlp}
    x = torch.randn(1, tokens, D, device=device, dtype=dtype)
    g = torch.randn(1, tokens, D, device=device, dtype=dtype)
    norm = arch == "mixtral"
    ref = reference(blocks["peft target_parameters (transformers block)"], None, x[0], K, norm)
    rows = {}
    for vname, block in blocks.items():
        row = {}
        lora = [p for n, p in block.named_parameters() if "lora_" in n]
        try:
            with torch.no_grad():
                out = block(x)
                out = (out[0] if isinstance(out, tuple) else out).reshape(tokens, D).float()
            row["rel_err_vs_fp32"] = ((out - ref).norm() / ref.norm()).item()
            if row["rel_err_vs_fp32"] > (3e-2 if dtype == torch.bfloat16 else 1e-4):
                raise AssertionError(f"wrong result: rel err {row['rel_err_vs_fp32']:.3g}")

            def step():
                for p in lora:
                    p.grad = None
                xi = x.detach().requires_grad_(False)
                y = block(xi)
                (y[0] if isinstance(y, tuple) else y).backward(g)

            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
            row["fwd_bwd_ms"] = bench(step, device, reps)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        rows[vname] = row
        print(f"{name:14s} {vname:44s} {json.dumps(row)}", flush=True)
    peft_row, eng_row = rows.values()
    summary = {}
    if "fwd_bwd_ms" in peft_row and "fwd_bwd_ms" in eng_row:
        summary["speedup_vs_peft"] = peft_row["fwd_bwd_ms"] / eng_row["fwd_bwd_ms"]
    if "peak_extra_gib" in peft_row and "peak_extra_gib" in eng_row:
        summary["memory_vs_peft"] = eng_row["peak_extra_gib"] / peft_row["peak_extra_gib"]
    return {"dims": dict(arch=arch, D=D, F=F, E=E, K=K, r=r, tokens=tokens), "variants": rows, **summary}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=200, help="ms of timed repetitions per variant (GPU)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SMOKE if args.smoke else SHAPES
    tokens = 256 if args.smoke else args.tokens
    report = {"env": environment(device), "dtype": str(dtype), "shapes": {}}
    for name, spec in shapes.items():
        report["shapes"][name] = run_shape(name, spec, tokens, args.rank, device, dtype, args.reps)
    print("\nshape           engine vs peft: speed-up   memory")
    for name, r in report["shapes"].items():
        print(f"{name:15s} {r.get('speedup_vs_peft', float('nan')):22.2f}x   {r.get('memory_vs_peft', float('nan')):.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
