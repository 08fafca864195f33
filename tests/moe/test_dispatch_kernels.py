"""The forward permute's kernel (dispatch_kernels.scatter_rows) against index_select, bit for bit: the
engine's way of building x_AD on CUDA must give the rows the CPU path's index_select gives.

The kernel tests run on a CUDA GPU, or without one in a subprocess under Triton's CPU interpreter (on before
Triton is first imported); skipped where Triton is absent. The reference path runs everywhere."""

import importlib.util
import os
import re

import pytest
import torch

from moe_engine.moe import dispatch
from moe_engine.moe import dispatch_kernels as dk

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernel_test = pytest.mark.skipif(not HAS_TRITON or (DEVICE == "cpu" and not INTERPRETED),
                                 reason="needs a CUDA GPU, or Triton's interpreter (test_in_triton_interpreter)")
CASES = [(37, 96, 8, 2, True), (29, 32, 16, 8, False), (40, 1100, 4, 1, False), (5, 8, 3, 3, True)]


@pytest.mark.skipif(not HAS_TRITON or DEVICE == "cuda" or INTERPRETED, reason="the kernel runs directly here")
def test_in_triton_interpreter(run_in_triton_interpreter):
    summary = run_in_triton_interpreter(__file__, "not test_in_triton_interpreter")
    assert re.search(r"\b11 passed, 2 skipped\b", summary), summary  # skipped: the two CUDA-only permute tests


def _routing(T, E, K, may_drop, device=DEVICE):
    """An uneven top-k routing (a few experts get most rows); with may_drop some assignments go to the
    drop id E and sort past the last group."""
    g = torch.Generator(device="cpu").manual_seed(T * 31 + K)
    skew_E = torch.linspace(0, 3, E)
    expert_TK = (torch.randn(T, E, generator=g) + skew_E).topk(K, dim=-1).indices
    if may_drop:
        expert_TK[torch.rand(T, K, generator=g) < 0.3] = E
    return dispatch.plan(expert_TK.reshape(-1).to(device), E, may_drop)


@pytest.mark.parametrize("T,D,E,K,may_drop", CASES)
def test_reference_equals_index_select(T, D, E, K, may_drop):
    p = _routing(T, E, K, may_drop, device="cpu")
    x_TD = torch.randn(T, D, dtype=torch.float64)
    assert torch.equal(dk.scatter_rows_reference(x_TD, p.inverse_A, K), x_TD.index_select(0, p.order_A // K))


@kernel_test
@pytest.mark.parametrize("T,D,E,K,may_drop", CASES)
def test_kernel_writes_index_selects_bits(T, D, E, K, may_drop):
    p = _routing(T, E, K, may_drop)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # the interpreter runs float32 only
    x_TD = torch.randn(T, D, device=DEVICE).to(dtype)
    out_AD = dk.scatter_rows_triton(x_TD, p.inverse_A, K)
    assert out_AD.dtype == dtype and torch.equal(out_AD, x_TD.index_select(0, p.order_A // K))


@kernel_test
def test_kernel_reads_a_strided_input_as_its_values():
    p = _routing(16, 8, 2, False)
    x_DT = torch.randn(64, 16, device=DEVICE)
    assert torch.equal(dk.scatter_rows_triton(x_DT.t(), p.inverse_A, 2), x_DT.t().index_select(0, p.order_A // 2))


@kernel_test
@pytest.mark.parametrize("may_drop", [False, True])
def test_kernel_fills_an_aligned_buffer_as_the_reference_does(may_drop):
    """Aligned groups (rows > A): every named row written at its place, the others left alone."""
    T, E, K = 33, 6, 2
    expert_A = _routing(T, E, K, may_drop, device="cpu").order_A  # any assignment-to-expert map will do
    p = dispatch.plan((expert_A % (E + int(may_drop))).to(DEVICE), E, may_drop, align=16)
    x_TD = torch.randn(T, 40, device=DEVICE)
    out = dk.scatter_rows_triton(x_TD, p.inverse_A, K, p.rows)
    ref = dk.scatter_rows_reference(x_TD.cpu(), p.inverse_A.cpu(), K, p.rows)
    assert out.shape == ref.shape == (p.rows, 40)
    assert torch.equal(out[p.inverse_A].cpu(), ref[p.inverse_A.cpu()])


@pytest.mark.skipif(DEVICE != "cuda" or not HAS_TRITON, reason="the layer takes the kernel on CUDA only")
@pytest.mark.parametrize("may_drop", [False, True])
def test_permute_on_cuda_gives_index_selects_rows_and_gradients(may_drop):
    T, D, E, K = 300, 256, 16, 4
    p = _routing(T, E, K, may_drop)
    x_TD = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g_AD = torch.randn(T * K, D, device="cuda", dtype=torch.bfloat16)
    out_AD = dispatch.permute(x_TD, p, K)
    (grad,) = torch.autograd.grad(out_AD, x_TD, g_AD)
    ref_x = x_TD.detach().double().requires_grad_()
    ref_AD = ref_x.index_select(0, p.order_A // K)
    mask = p.valid_A[:, None] if may_drop else torch.ones_like(g_AD[:, :1], dtype=torch.bool)
    (ref_grad,) = torch.autograd.grad(ref_AD, ref_x, g_AD.double() * mask)
    assert torch.equal(out_AD, x_TD.detach().index_select(0, p.order_A // K))
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-2)
