"""The tuned CUTLASS grouped GEMMs (moe/cutlass_gemm.py) against F.grouped_mm: the same bits for every
configuration and schedule, forward and both gradients, with an expert that gets no rows; the MoE layer's
outputs and gradients unchanged when they are enabled, in eager mode and replayed from CUDA graphs. The GPU
tests need an sm90 GPU, nvcc and a CUTLASS checkout in $CUTLASS_DIR (the lent machine); the errors for a
machine without them run anywhere."""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_engine.moe import cutlass_gemm
from moe_engine.moe.cutlass_gemm import DGRAD, FWD, SCHEDULES, WGRAD, CutlassUnavailable
from moe_engine.moe.graphs import MoEGraphs

from .layers import gpu_layer

REPO = Path(__file__).resolve().parents[2]
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_cutlass = pytest.mark.skipif(not (HOPPER and os.environ.get("CUTLASS_DIR")),
                                   reason="needs an sm90 GPU, nvcc and $CUTLASS_DIR")
TESTED = ["coop_128x256x64_c2x1", "pong_64x256x64_c1x1", "coop_256x128x64_c1x2"]  # torch's and two others


def test_a_machine_without_the_parts_gets_told_what_is_missing(tmp_path):
    with pytest.raises(CutlassUnavailable, match="is not a CUTLASS source tree .* CUTLASS 3 checkout"):
        cutlass_gemm.build(tmp_path, tmp_path / "build")
    if not HOPPER:
        with pytest.raises(CutlassUnavailable, match="need an sm90 GPU"):
            cutlass_gemm.enable(tmp_path, tmp_path / "build")
    assert not cutlass_gemm.enabled() and not list(tmp_path.glob("build/*.so"))


@pytest.fixture(scope="module")
def kernels():
    loaded = cutlass_gemm.enable(os.environ["CUTLASS_DIR"], REPO / ".cache" / "moe-lab-kernels", TESTED)
    yield loaded
    cutlass_gemm.disable()


def _operands(E=8, rows=(0, 300, 17, 1024, 511, 64, 1, 2093), D=256, O=384, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    offs = torch.tensor(rows[:E], device="cuda").cumsum(0).to(torch.int32)
    A = int(offs[-1]) + 40  # rows past the last group, as a capacity drop leaves them
    rnd = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    return offs, rnd(A, D), rnd(E, O, D) * 0.05, rnd(A, O)


@needs_cutlass
def test_every_configuration_computes_grouped_mms_bits(kernels):
    offs, x, w, gy = _operands()
    n = int(offs[-1])
    cases = [  # case, a, b, reference, d1, d2, rows compared
        (FWD, x, w, F.grouped_mm(x, w.transpose(-2, -1), offs=offs), w.shape[1], w.shape[2], n),
        (DGRAD, gy, w, F.grouped_mm(gy, w, offs=offs), w.shape[2], w.shape[1], n),
        (WGRAD, gy, x, F.grouped_mm(gy.t(), x, offs=offs), gy.shape[1], x.shape[1], None),
    ]
    for config in kernels:
        for case, a, b, ref, d1, d2, rows in cases:
            for raster, swizzle in SCHEDULES:
                out = torch.full_like(ref, float("nan"))
                cutlass_gemm.launch(config, case, a, b, out, offs, d1, d2, raster, swizzle)
                got, want = (out[:rows], ref[:rows]) if rows else (out, ref)
                assert torch.equal(got, want), (config, case, raster, swizzle)
        assert torch.equal(out[0], torch.zeros_like(out[0]))  # the expert with no rows: a zero weight gradient


@needs_cutlass
def test_the_autograd_function_matches_grouped_mm_forward_and_backward(kernels):
    offs, x, w, gy = _operands(seed=1)
    n = int(offs[-1])
    results = []
    for use in (False, True):
        cutlass_gemm.SWITCH["enabled"] = use
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = cutlass_gemm.grouped_linear(xi, wi, offs) if use else F.grouped_mm(xi, wi.transpose(-2, -1), offs=offs)
        y.backward(gy)
        results.append((y[:n], xi.grad[:n], wi.grad))
    cutlass_gemm.SWITCH["enabled"] = True
    for want, got in zip(*results):
        assert torch.equal(got, want)
    assert cutlass_gemm.choices()  # each shape was tuned once, and what runs is on record


@needs_cutlass
@pytest.mark.parametrize("experts, top_k, capacity", [(8, 2, None), (64, 8, None), (16, 1, 1.0)])
def test_the_moe_layer_gives_the_same_bits_with_the_kernels_eager_and_graphed(kernels, experts, top_k, capacity):
    torch.manual_seed(0)
    base = gpu_layer(experts, top_k, capacity)
    x = torch.randn(4, 512, 256, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)

    def step(layer, use):
        cutlass_gemm.SWITCH["enabled"] = use
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.backward(grad)
        grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
        layer.zero_grad(set_to_none=True)
        return [out.detach(), xi.grad, *grads]

    torch_run = step(copy.deepcopy(base), False)
    tuned = copy.deepcopy(base)
    for got, want in zip(step(tuned, True), torch_run):
        assert torch.equal(got, want)
    graphs = MoEGraphs([tuned]).record()  # a recorded eager step, then the capture: replays keep the bits
    step(tuned, True)
    graphs.capture()
    try:
        for got, want in zip(step(tuned, True), torch_run):
            assert torch.equal(got, want)
    finally:
        graphs.release()
        cutlass_gemm.SWITCH["enabled"] = True
