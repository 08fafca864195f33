"""benchmarks/gather_gemm_kernels.py: the gather-fused grouped GEMMs of the study give the PyTorch
reference's rows, with empty expert groups and rows past the last group. The kernels run on a CUDA GPU,
or without one in Triton's CPU interpreter (a subprocess: the interpreter must be on before Triton is
first imported)."""

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import gather_gemm_kernels as gg  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernel_test = pytest.mark.skipif(not HAS_TRITON or (DEVICE == "cpu" and not INTERPRETED),
                                 reason="needs a CUDA GPU, or Triton's interpreter (test_kernels_in_triton_interpreter)")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # the interpreter's bf16 dot is not numpy's to do
SMALL_MM = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)
SMALL_WGRAD = dict(BLOCK_N=32, BLOCK_K=32, BLOCK_R=16, num_warps=4, num_stages=2)


def _problem(rows_per_expert=(5, 0, 37, 16, 1), tokens=40, D=64, N=96, k=2):
    """Expert groups of uneven sizes (one empty), ``rows`` gathering from ``tokens`` source rows, and
    a few rows past the last group (a capacity drop's tail)."""
    g = torch.Generator().manual_seed(0)
    A = sum(rows_per_expert)
    offsets_E = torch.tensor(rows_per_expert).cumsum(0).to(torch.int32)
    rows = torch.randint(0, tokens, (A + 3,), generator=g).to(torch.int32)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE, DTYPE)  # noqa: E731
    return dict(src=mk(tokens, D), rows=rows.to(DEVICE), offsets_E=offsets_E.to(DEVICE), A=A,
                w_ENK=mk(len(rows_per_expert), N, D), w_EKN=mk(len(rows_per_expert), D, N), h=mk(A + 3, N))


@kernel_test
@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("transpose_w", [True, False])
def test_kernel_gather_mm_matches_the_reference(gather, transpose_w):
    p = _problem()
    w = p["w_ENK"] if transpose_w else p["w_EKN"]
    src = p["src"] if gather else p["src"].index_select(0, p["rows"])
    rows = p["rows"] if gather else None
    out = gg.gather_mm(src, rows, w, p["offsets_E"], transpose_w, config=SMALL_MM)
    ref = gg.gather_mm_reference(src, rows, w, p["offsets_E"], transpose_w)
    A = p["A"]
    assert out.shape == ref.shape == (p["rows"].numel(), 96)
    torch.testing.assert_close(out[:A].float(), ref[:A].float(), rtol=2e-2, atol=2e-2)
    assert ref[:A].abs().amax() > 1  # not a comparison of zeros


@kernel_test
@pytest.mark.parametrize("gather_g, gather_x", [(True, False), (False, True), (False, False)])
def test_kernel_gather_wgrad_matches_the_reference(gather_g, gather_x):
    p = _problem()
    rows = p["rows"][: p["A"]]
    g = p["src"] if gather_g else p["src"].index_select(0, rows)  # [*, 64]
    x = p["h"] if not gather_x else p["h"][:40]  # [*, 96]; gathered rows index its first 40
    g_rows, x_rows = (rows if gather_g else None), (rows if gather_x else None)
    out = gg.gather_wgrad(g, g_rows, x, x_rows, p["offsets_E"], config=SMALL_WGRAD)
    ref = gg.gather_wgrad_reference(g, g_rows, x, x_rows, p["offsets_E"])
    assert out.shape == ref.shape == (5, 64, 96)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=5e-2)
    assert ref[1].abs().amax() == 0 and out[1].abs().amax() == 0  # the empty expert's gradient is zero


@pytest.mark.skipif(not HAS_TRITON or DEVICE == "cuda" or INTERPRETED, reason="the kernels run directly here")
def test_kernels_in_triton_interpreter(run_in_triton_interpreter):
    summary = run_in_triton_interpreter(__file__, "kernel_gather")
    assert re.search(r"\b7 passed\b", summary), summary
