"""The CUDA fast paths (grouped GEMM, fused SwiGLU) against the portable ones. Skipped without a GPU;
run on the lent GPU machine with ``python -m pytest tests/moe``."""

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
def test_cuda_layer_matches_cpu_float64_path(kind, k):
    rc = RouterConfig(kind=kind, num_experts=16, top_k=k, capacity_factor=1.0, aux_loss_coef=0.0)
    layer = MoEConfig(hidden_size=128, ffn_size=256, router=rc).build()
    x = torch.randn(4, 64, 128)
    cpu = layer.double()(x.double())
    gpu_layer = layer.to("cuda", torch.bfloat16)
    out = gpu_layer(x.to("cuda", torch.bfloat16))
    assert _rel(out.cpu(), cpu) < 3e-2
