import pytest
import torch

from moe_engine.moe import dispatch


def _plan(T=6, K=2, E=3, drop=False):
    expert_idx_A = torch.randint(0, E, (T * K,))
    if drop:
        expert_idx_A[::5] = E
    return expert_idx_A, dispatch.plan(expert_idx_A, E, may_drop=drop)


def test_plan_sorts_by_expert_and_counts():
    expert_idx_A, p = _plan(drop=True)
    assert torch.all(expert_idx_A[p.order_A][:-1] <= expert_idx_A[p.order_A][1:])
    assert p.counts_E.tolist() == [(expert_idx_A == e).sum().item() for e in range(3)]
    assert torch.equal(p.order_A[p.inverse_A], torch.arange(12))


def test_permute_and_unpermute_gradients_match_finite_differences():
    _, p = _plan()
    x_TD = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w_TK = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: dispatch.permute(x, p, 2), (x_TD,))
    y_AD = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: dispatch.unpermute(y, w.reshape(-1), p, 2), (y_AD, w_TK))


def test_permute_then_unpermute_with_unit_weights_sums_k_copies():
    _, p = _plan()
    x_TD = torch.randn(6, 4)
    out = dispatch.unpermute(dispatch.permute(x_TD, p, 2), torch.ones(12), p, 2)
    torch.testing.assert_close(out, 2 * x_TD)


def test_dropped_rows_are_zeroed_even_if_they_hold_nan():
    expert_idx_A, p = _plan(drop=True)
    y_AD = torch.randn(12, 4)
    y_AD[~p.valid_A] = float("nan")  # what an unwritten GEMM row may hold
    weight_A = torch.where(expert_idx_A == 3, 0.0, 1.0)
    out = dispatch.unpermute(y_AD, weight_A, p, 2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("num_experts", [8, 255, 256, 300])
def test_plan_on_narrow_sort_keys_equals_the_int64_stable_sort(num_experts):
    """The plan sorts ids as uint8/int16 (fewer radix passes on the GPU): same order, groups and drop mask
    as a stable int64 sort, at the type boundaries too (id ``num_experts`` marks a dropped assignment)."""
    idx_A = torch.randint(0, num_experts + 1, (4000,), generator=torch.Generator().manual_seed(num_experts))
    p = dispatch.plan(idx_A, num_experts, may_drop=True)
    sorted_A, order_A = torch.sort(idx_A, stable=True)
    assert torch.equal(p.order_A, order_A)
    assert torch.equal(p.inverse_A[order_A], torch.arange(idx_A.numel()))
    assert torch.equal(p.counts_E, torch.bincount(idx_A, minlength=num_experts + 1)[:num_experts].int())
    assert torch.equal(p.valid_A, sorted_A < num_experts)


def test_dropped_rows_get_no_input_gradient_even_if_their_gradient_rows_are_garbage():
    """Past the last expert group the GPU grouped GEMM's backward leaves rows unwritten: whatever they
    hold (NaN here), the tokens' gradients are the sums of their kept rows only."""
    expert_idx_A = torch.tensor([0, 2, 1, 2, 2, 0])  # E = 2: assignments 1, 3 and 4 were dropped
    p = dispatch.plan(expert_idx_A, 2, may_drop=True)
    x_TD = torch.randn(3, 4, requires_grad=True)
    x_AD = dispatch.permute(x_TD, p, top_k=2)
    grad_AD = torch.randn(6, 4)
    grad_AD[~p.valid_A] = float("nan")
    x_AD.backward(grad_AD)
    kept_A = expert_idx_A < 2
    expected_TD = torch.zeros(3, 4).index_add_(0, torch.arange(6)[kept_A] // 2, grad_AD[p.inverse_A][kept_A])
    torch.testing.assert_close(x_TD.grad, expected_TD)
