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


@pytest.mark.parametrize("num_experts,top_k,align,drop", [(3, 2, 4, False), (8, 2, 16, True), (16, 8, 8, False),
                                                           (5, 1, 128, True)])
def test_aligned_plan_puts_each_group_on_a_multiple_and_names_every_padding_row(num_experts, top_k, align, drop):
    """Aligned groups: group e starts on a multiple of ``align`` and holds its tokens in sorted order, then
    padding up to the next multiple; ``pad_rows_P`` is every padding row plus distinct tail rows; dropped rows
    follow the last group; counts and token order are those of the unaligned plan."""
    T, E = 64, num_experts
    g = torch.Generator().manual_seed(align + E)
    idx_A = torch.randint(0, E + (1 if drop else 0), (T * top_k,), generator=g)
    p, q = dispatch.plan(idx_A, E, may_drop=drop, align=align), dispatch.plan(idx_A, E, may_drop=drop)
    A = T * top_k
    assert p.aligned and p.rows == A + E * (align - 1) + 1
    assert torch.equal(p.counts_E, q.counts_E) and torch.equal(p.order_A, q.order_A)
    group_rows = p.group_rows_E.tolist()
    starts = [0] + p.offsets_E.tolist()[:-1]
    assert all(s % align == 0 for s in starts) and all(r % align == 0 for r in group_rows)
    tokens = p.counts_E.tolist()
    assert p.ends_E.tolist() == [s + n for s, n in zip(starts, tokens)]
    place_A = p.inverse_A  # each assignment's row: its expert's start plus its rank there (the unaligned rank)
    for a in range(A):
        e = int(idx_A[a])
        if e < E:
            assert starts[e] <= place_A[a] < starts[e] + tokens[e]
            assert place_A[a] - starts[e] == q.inverse_A[a] - (q.offsets_E[e] - q.counts_E[e])
        else:
            assert p.offsets_E[-1] <= place_A[a] < p.rows - 1
    padding = {r for s, n, m in zip(starts, tokens, group_rows) for r in range(s + n, s + m)}
    pad_rows = p.pad_rows_P.tolist()
    assert len(pad_rows) == len(set(pad_rows)) == E * (align - 1)
    used = set(place_A.tolist())
    assert padding <= set(pad_rows) and not (set(pad_rows) & used) and max(pad_rows) < p.rows - 1
    if drop:
        assert p.valid_A.tolist() == [r in used and r < p.offsets_E[-1] for r in range(p.rows)]


def test_aligned_permute_zeroes_padding_and_its_gradients_equal_the_unaligned_ones():
    E, K, T = 6, 2, 40
    idx_A = torch.randint(0, E + 1, (T * K,), generator=torch.Generator().manual_seed(5))
    p, q = dispatch.plan(idx_A, E, may_drop=True, align=8), dispatch.plan(idx_A, E, may_drop=True)
    x_TD = torch.randn(T, 4, dtype=torch.float64, requires_grad=True)
    x_MD = dispatch.permute(x_TD, p, K)
    assert x_MD.shape == (p.rows, 4) and (x_MD[p.pad_rows_P] == 0).all()
    assert torch.equal(x_MD[p.inverse_A], dispatch.permute(x_TD, q, K)[q.inverse_A])
    w_A = torch.rand(T * K, dtype=torch.float64)
    y_MD = torch.randn(p.rows, 4, dtype=torch.float64, requires_grad=True)
    y_MD.data[~p.valid_A] = float("nan")  # padding, dropped and tail rows: never computed
    out = dispatch.unpermute(y_MD, w_A, p, K)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all() and (y_MD.grad[p.pad_rows_P] == 0).all()
    y_AD = y_MD.detach()[p.inverse_A][q.inverse_A.argsort()]  # the same rows in the unaligned order
    torch.testing.assert_close(out, dispatch.unpermute(y_AD.nan_to_num(0.0), w_A, q, K))
    kept = dispatch.plan(idx_A.clamp(max=E - 1), E, may_drop=False, align=8)  # dropped rows get no gradient
    assert torch.autograd.gradcheck(lambda x: dispatch.permute(x, kept, K)[kept.inverse_A], (x_TD,))


def test_aligned_combine_backward_zeroes_the_padding_whatever_the_kernel_left_there(monkeypatch):
    """Without drops nothing masks the combine's gradient rows: the rows it does not write (NaN here, as an
    unwritten GPU buffer may hold) must come out zero on the padding, which the weight gradients sum over."""
    E, K, T = 5, 2, 30
    idx_A = torch.randint(0, E, (T * K,), generator=torch.Generator().manual_seed(9))
    p = dispatch.plan(idx_A, E, may_drop=False, align=8)
    real = dispatch.kernels.combine_backward

    def leaves_nan(g_TD, src_AD, idx_A, w_TK):
        grad, grad_w = real(g_TD, src_AD, idx_A, w_TK)
        unwritten = torch.ones(grad.shape[0], dtype=torch.bool)
        unwritten[idx_A] = False
        return grad.masked_fill(unwritten[:, None], float("nan")), grad_w

    monkeypatch.setattr(dispatch.kernels, "combine_backward", leaves_nan)
    y_MD = torch.randn(p.rows, 4, dtype=torch.float64, requires_grad=True)
    dispatch.unpermute(y_MD, torch.rand(T * K, dtype=torch.float64), p, K).sum().backward()
    padding = p.pad_rows_P[p.pad_rows_P < p.offsets_E[-1]]
    assert padding.numel() > 0 and (y_MD.grad[padding] == 0).all()
    assert torch.isfinite(y_MD.grad[p.inverse_A]).all()
