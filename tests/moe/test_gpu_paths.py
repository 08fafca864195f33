"""The CUDA fast paths (grouped GEMM, fused SwiGLU) against the portable ones. Skipped without a GPU;
run on the lent GPU machine with ``python -m pytest tests/moe``."""

import dataclasses

import pytest
import torch

from moe_engine.moe import swiglu as swiglu_mod
from moe_engine.moe.layer import MoEConfig
from moe_engine.moe.router import RouterConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@cuda
def test_fused_swiglu_forward_and_backward_match_eager():
    h = torch.randn(1000, 2 * 352, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1000, 352, device="cuda", dtype=torch.bfloat16)
    h_ref = h.detach().float().requires_grad_(True)
    out = swiglu_mod._FusedSwiGLU.apply(h)
    ref = swiglu_mod.swiglu_reference(h_ref)
    out.backward(g)
    ref.backward(g.float())
    assert _rel(out, ref) < 1e-2
    assert _rel(h.grad, h_ref.grad) < 1e-2


@cuda
@pytest.mark.parametrize("kind,k", [("topk", 2), ("topk", 8), ("switch", 1), ("expert_choice", 2)])
def test_cuda_grouped_path_matches_cpu_float64_on_the_same_routing(kind, k):
    """Routing decided once in float64; the bf16 GPU experts (grouped GEMM) and the float64 CPU
    experts must then agree to bf16 precision, forward and backward."""
    rc = RouterConfig(kind=kind, num_experts=16, top_k=k, capacity_factor=1.0, aux_loss_coef=0.0)
    layer = MoEConfig(hidden_size=128, ffn_size=256, router=rc).build().double()
    x_TD = torch.randn(256, 128, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # routing is an input here: gradients flow through the experts only
        routing = layer.moe_router(x_TD, group_size=64)
    cpu_out, _ = layer.routed_experts(x_TD, routing)
    g = torch.randn_like(cpu_out)
    cpu_out.backward(g)

    gpu_layer = MoEConfig(hidden_size=128, ffn_size=256, router=rc).build().to("cuda", torch.bfloat16)
    gpu_layer.load_state_dict(layer.state_dict())
    x_gpu = x_TD.detach().to("cuda", torch.bfloat16).requires_grad_(True)
    moved = {f.name: getattr(routing, f.name) for f in dataclasses.fields(routing)}
    moved = {n: (v.detach().cuda() if isinstance(v, torch.Tensor) else v) for n, v in moved.items()}
    moved["weight_A"] = moved["weight_A"].to(torch.bfloat16)
    gpu_out, _ = gpu_layer.routed_experts(x_gpu, dataclasses.replace(routing, **moved))
    gpu_out.backward(g.to("cuda", torch.bfloat16))
    assert _rel(gpu_out.cpu(), cpu_out) < 2e-2
    assert _rel(x_gpu.grad.cpu(), x_TD.grad) < 2e-2
    assert _rel(gpu_layer.experts.gate_up_proj.grad.cpu(), layer.experts.gate_up_proj.grad) < 2e-2


@cuda
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("dim,dtype", [(768, torch.bfloat16), (1000, torch.float32), (2048, torch.bfloat16)])
def test_triton_gather_kernels_match_torch_reference(top_k, dim, dtype):
    from moe_engine.moe import dispatch_kernels as k

    T = 300
    src = torch.randn(T * top_k, dim, device="cuda", dtype=dtype)
    idx = torch.randperm(T * top_k, device="cuda")
    w = torch.rand(T, top_k, device="cuda", dtype=dtype)
    g = torch.randn(T, dim, device="cuda", dtype=dtype)
    for weights in (w, None):
        assert _rel(k.gather_sum(src, idx, weights, top_k), k.gather_sum_reference(src, idx, weights, top_k)) < 1e-5
    gs, gw = k.combine_backward(g, src, idx, w)
    rs, rw = k.combine_backward_reference(g, src, idx, w)
    assert _rel(gs, rs) < 1e-5
    assert _rel(gw, rw) < (1e-5 if dtype == torch.float32 else 1e-2)
