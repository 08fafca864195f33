"""benchmarks/dispatch_passes.py: every variant runs and the scatter permute it times is checked against
index_select (on the CPU its reference path; the Triton kernel's bits are tests/moe/test_dispatch_kernels.py's)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.dispatch_passes import passes  # noqa: E402


@pytest.mark.parametrize("dims", [(64, 96, 8, 2, True), (96, 32, 16, 8, False), (40, 32, 4, 1, False)])
def test_every_pass_runs_and_the_scatter_permute_equals_index_select(dims):
    variants, same = passes(dims, tokens=37, device="cpu", dtype=torch.float32)
    assert same
    outputs = {name: fn() for name, fn in variants.items()}
    assert torch.equal(outputs["permute (index_select)"], outputs["scatter permute"])
    assert outputs["combine"].shape == (37, dims[0]) and outputs["combine backward"][1].shape == (37, dims[3])
