"""benchmarks/deepgemm_groups.py: its padded layout is the one the engine's aligned dispatch builds."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.deepgemm_groups import padded_layout  # noqa: E402
from moe_engine.moe import dispatch  # noqa: E402


def test_padded_layout_places_rows_as_the_aligned_dispatch_does():
    E, align = 6, 8
    idx_A = torch.randint(0, E, (90,), generator=torch.Generator().manual_seed(2))
    idx_A[idx_A == 4] = 5  # an expert with no rows
    p = dispatch.plan(idx_A, E, may_drop=False, align=align)
    sizes = p.counts_E.tolist()
    rows_A, layout_M, aligned = padded_layout(sizes, align, "cpu")
    assert aligned == p.group_rows_E.tolist() and layout_M.numel() == sum(aligned)
    assert torch.equal(rows_A, p.inverse_A[p.order_A])  # sorted assignments land on the same rows
    expert_of_row = torch.full((layout_M.numel(),), -1, dtype=torch.int32)
    expert_of_row[p.inverse_A] = idx_A.to(torch.int32)
    assert torch.equal(layout_M, expert_of_row)
