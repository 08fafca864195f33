"""Moving tokens to their experts and back. Shape legend in ``routing.py``.

Dropless token-choice dispatch (the hot path):
    1. sort the A = T*K assignments by expert (dropped ones, expert E, sort last);
    2. gather the token rows in that order -> ``x_AD`` (rows of one expert are contiguous);
    3. the experts run as one grouped GEMM over those contiguous groups;
    4. un-sort and combine each token's K rows with its routing weights.
Steps 2 and 4 are custom autograd functions: their backward passes are gathers through the
inverse permutation plus a [T, K, D] sum, so no atomic scatter-add (slow and non-deterministic
on GPUs for bf16) appears anywhere in forward or backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    order_A: torch.Tensor  # assignment index in expert-sorted order
    inverse_A: torch.Tensor  # position of each assignment in the sorted order
    counts_E: torch.Tensor  # rows per expert (dropped excluded)
    offsets_E: torch.Tensor  # int32 cumulative counts: the groups of the grouped GEMM
    valid_A: torch.Tensor | None  # bool, sorted order; None when nothing can be dropped


def plan(expert_idx_A: torch.Tensor, num_experts: int, may_drop: bool) -> DispatchPlan:
    # A stable sort keeps token order inside each expert, so results do not depend on the sort.
    sorted_expert_A, order_A = torch.sort(expert_idx_A, stable=True)
    inverse_A = torch.empty_like(order_A)
    inverse_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
    # Group ends straight from the sorted ids: no bincount, whose output size forces a GPU->host sync.
    experts_E = torch.arange(1, num_experts + 1, device=expert_idx_A.device, dtype=sorted_expert_A.dtype)
    offsets_E = torch.searchsorted(sorted_expert_A, experts_E).to(torch.int32)
    counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
    valid_A = (sorted_expert_A < num_experts) if may_drop else None
    return DispatchPlan(order_A, inverse_A, counts_E, offsets_E, valid_A)


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulate in at least float32 (bf16 sums of K rows lose bits), float64 stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


class _PermuteTokens(torch.autograd.Function):
    """x_AD = x_TD[order_A // K]; backward sums each token's K gradient rows."""

    @staticmethod
    def forward(ctx, x_TD, order_A, inverse_A, top_k):
        ctx.save_for_backward(inverse_A)
        ctx.top_k = top_k
        return x_TD.index_select(0, order_A // top_k)

    @staticmethod
    def backward(ctx, grad_AD):
        (inverse_A,) = ctx.saved_tensors
        grad_TKD = grad_AD.index_select(0, inverse_A).view(-1, ctx.top_k, grad_AD.shape[-1])
        return grad_TKD.sum(1, dtype=_acc(grad_AD)).to(grad_AD.dtype), None, None, None


class _UnpermuteCombine(torch.autograd.Function):
    """out_TD[t] = sum_k w_TK[t, k] * y_AD[inverse_A[t*K + k]], accumulated in >= float32."""

    @staticmethod
    def forward(ctx, y_AD, weight_TK, order_A, inverse_A):
        ctx.save_for_backward(y_AD, weight_TK, order_A, inverse_A)
        num_tokens, top_k = weight_TK.shape
        y_TKD = y_AD.index_select(0, inverse_A).view(num_tokens, top_k, -1)
        acc = _acc(y_AD)
        out_T1D = torch.bmm(weight_TK.unsqueeze(1).to(acc), y_TKD.to(acc))
        return out_T1D.squeeze(1).to(y_AD.dtype)

    @staticmethod
    def backward(ctx, grad_TD):
        y_AD, weight_TK, order_A, inverse_A = ctx.saved_tensors
        num_tokens, top_k = weight_TK.shape
        grad_y_AD = grad_weight_TK = None
        if ctx.needs_input_grad[0]:
            grad_y_TKD = weight_TK.to(grad_TD.dtype)[..., None] * grad_TD[:, None, :]
            grad_y_AD = grad_y_TKD.view(num_tokens * top_k, -1).index_select(0, order_A)
        if ctx.needs_input_grad[1]:
            y_TKD = y_AD.index_select(0, inverse_A).view(num_tokens, top_k, -1)
            acc = _acc(y_AD)
            grad_weight_TK = torch.bmm(y_TKD.to(acc), grad_TD.to(acc)[:, :, None]).squeeze(-1).to(weight_TK.dtype)
        return grad_y_AD, grad_weight_TK, None, None


def permute(x_TD: torch.Tensor, p: DispatchPlan, top_k: int) -> torch.Tensor:
    return _PermuteTokens.apply(x_TD, p.order_A, p.inverse_A, top_k)


def unpermute(y_AD: torch.Tensor, weight_A: torch.Tensor, p: DispatchPlan, top_k: int) -> torch.Tensor:
    if p.valid_A is not None:  # rows of dropped assignments were never computed: zero them (0 * NaN = NaN)
        y_AD = y_AD.masked_fill(~p.valid_A[:, None], 0.0)
    return _UnpermuteCombine.apply(y_AD, weight_A.view(-1, top_k), p.order_A, p.inverse_A)

