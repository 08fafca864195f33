"""benchmarks/dispatch_passes.py: the candidate scatter permute writes index_select's rows bit for bit, on
uneven routings with k 1, 2 and 8. On a CUDA GPU, or without one in Triton's CPU interpreter (a subprocess:
the interpreter must be on before Triton is first imported)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not HAS_TRITON or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
                    reason="needs a CUDA GPU, or Triton's interpreter (test_scatter_permute_in_triton_interpreter)")
@pytest.mark.parametrize("dims", [(64, 96, 8, 2, True), (96, 32, 16, 8, False), (40, 32, 4, 1, False)])
def test_scatter_permute_equals_index_select(dims):
    from benchmarks.dispatch_passes import passes

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    _, same = passes(dims, tokens=37, device=DEVICE, dtype=dtype)
    assert same


@pytest.mark.skipif(not HAS_TRITON or DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs Triton without a GPU (on a GPU the test above runs the kernel itself)")
def test_scatter_permute_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "equals_index_select"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "3 passed" in run.stdout
