"""DeepGEMM's m-grouped GEMMs in the expert path (moe/deepgemm_gemm.py) and the aligned groups they need: the
aligned layout on torch's grouped GEMM gives the unaligned layer's bits forward and for the input gradient
(the weight gradients to bf16 rounding); with DeepGEMM enabled the layer gives the same outputs and gradients
as without it, eager and replayed from CUDA graphs, drops included. The GPU tests need an sm90 GPU, nvcc and a
DeepGEMM source tree with its submodules in $DEEPGEMM_DIR (on the lent machine also CXX=/usr/bin/g++:
NOTES.md); the errors for a machine without them run anywhere."""

import copy
import os
from pathlib import Path

import pytest
import torch

from moe_engine.moe import deepgemm_gemm, dispatch
from moe_engine.moe.deepgemm_gemm import DeepGemmUnavailable
from moe_engine.moe.graphs import MoEGraphs

from .layers import gpu_layer

REPO = Path(__file__).resolve().parents[2]
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_deepgemm = pytest.mark.skipif(not (HOPPER and os.environ.get("DEEPGEMM_DIR")),
                                    reason="needs an sm90 GPU, nvcc and $DEEPGEMM_DIR")
LAYERS = [(8, 2, None), (64, 8, None), (16, 1, 1.0)]  # experts, top_k, capacity factor (Switch: drops)


def test_a_machine_without_the_parts_gets_told_what_is_missing(tmp_path):
    with pytest.raises(DeepGemmUnavailable, match="not a DeepGEMM source tree .*--recursive"):
        deepgemm_gemm.build(tmp_path, tmp_path / "build")
    if not HOPPER:
        with pytest.raises(DeepGemmUnavailable, match="sm90"):
            deepgemm_gemm.enable(tmp_path, tmp_path / "build")
    assert not deepgemm_gemm.enabled() and not (tmp_path / "build").exists()
    x, w = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(2, 64, 64, dtype=torch.bfloat16)
    assert not deepgemm_gemm.usable(x, w) and deepgemm_gemm.row_alignment(x, w, w) == 0


def _case(experts, top_k, capacity):
    """A layer, its input and an output gradient, the same for every run of one case."""
    torch.manual_seed(0)
    base = gpu_layer(experts, top_k, capacity)
    x = torch.randn(4, 512, 256, device="cuda", dtype=torch.bfloat16)
    return base, x, torch.randn_like(x)


def _step(layer, x, grad):
    xi = x.clone().requires_grad_(True)
    out = layer(xi)
    out.backward(grad)
    grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    layer.zero_grad(set_to_none=True)
    return [out.detach(), xi.grad, *grads]


def _same_up_to_weight_gradient_rounding(got, want):
    """Outputs and input gradients bit for bit; the parameters' gradients sum over whole groups, whose
    zero padding rows shift the GEMM's K tiles: equal to bf16 rounding."""
    assert len(got) == len(want)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for g, w in zip(got[2:], want[2:]):
        torch.testing.assert_close(g.float(), w.float(), rtol=1.6e-2, atol=1e-5)


@cuda
@pytest.mark.parametrize("experts, top_k, capacity", LAYERS)
def test_aligned_groups_on_torchs_grouped_gemm_keep_the_layers_results(experts, top_k, capacity, monkeypatch):
    base, x, grad = _case(experts, top_k, capacity)
    plain = _step(copy.deepcopy(base), x, grad)
    monkeypatch.setitem(dispatch.ALIGN, "rows", 128)
    _same_up_to_weight_gradient_rounding(_step(copy.deepcopy(base), x, grad), plain)


@pytest.fixture(scope="module")
def deepgemm():
    deepgemm_gemm.enable(os.environ["DEEPGEMM_DIR"], REPO / ".cache" / "moe-lab-kernels")
    yield
    deepgemm_gemm.disable()


@needs_deepgemm
def test_the_autograd_function_matches_grouped_mm_on_aligned_groups(deepgemm):
    """Forward and input gradient on DeepGEMM, the weight gradient on F.grouped_mm: against F.grouped_mm's
    autograd on the same aligned rows (an expert with no rows included), padding rows zero."""
    g = torch.Generator().manual_seed(0)
    E, T, K, D, O = 8, 300, 2, 256, 384
    idx_A = torch.randint(0, E, (T * K,), generator=g)
    idx_A[idx_A == 3] = 4  # expert 3 gets nothing
    p = dispatch.plan(idx_A.cuda(), E, may_drop=False, align=deepgemm_gemm.ALIGN)
    x = dispatch.permute(torch.randn(T, D, device="cuda", dtype=torch.bfloat16), p, K).requires_grad_(True)
    w = (torch.randn(E, O, D, device="cuda", dtype=torch.bfloat16) * 0.05).requires_grad_(True)
    gy = torch.randn(p.rows, O, device="cuda", dtype=torch.bfloat16).index_fill_(0, p.pad_rows_P, 0)
    y = deepgemm_gemm.grouped_linear(x, w, p)
    y.backward(gy)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.grouped_mm(x2, w2.transpose(-2, -1), offs=p.offsets_E)
    y2.backward(gy)
    real, pads = p.inverse_A, p.pad_rows_P[p.pad_rows_P < p.offsets_E[-1]]  # padding rows: inside the groups
    assert pads.numel() > 0 and torch.equal(y[real], y2[real]) and torch.equal(x.grad[real], x2.grad[real])
    assert (y[pads] == 0).all() and (x.grad[pads] == 0).all()
    # F.grouped_mm(gy.t(), x) against autograd's own orientation of the same sums: equal up to rounding
    torch.testing.assert_close(w.grad.float(), w2.grad.float(), rtol=1.6e-2, atol=1e-5)


@needs_deepgemm
@pytest.mark.parametrize("experts, top_k, capacity", LAYERS)
def test_the_moe_layer_keeps_its_results_on_deepgemm_eager_and_graphed(deepgemm, experts, top_k, capacity):
    base, x, grad = _case(experts, top_k, capacity)
    deepgemm_gemm.SWITCH["enabled"] = False
    try:
        plain = _step(copy.deepcopy(base), x, grad)
        deepgemm_gemm.SWITCH["enabled"] = True
        layer = copy.deepcopy(base)
        assert deepgemm_gemm.row_alignment(x, *layer.experts.parameters()) == deepgemm_gemm.ALIGN
        _same_up_to_weight_gradient_rounding(_step(layer, x, grad), plain)
        graphs = MoEGraphs([layer]).record()  # a recorded eager step, then the capture: replays keep the bits
        _step(layer, x, grad)
        graphs.capture()
        try:
            _same_up_to_weight_gradient_rounding(_step(layer, x, grad), plain)
        finally:
            graphs.release()
    finally:
        deepgemm_gemm.SWITCH["enabled"] = True
