"""Moving tokens to their experts and back. Shape legend in ``routing.py``.

Dropless token-choice dispatch (the hot path):
    1. sort the A = T*K assignments by expert (dropped ones, expert E, sort last);
    2. copy the token rows into that order -> ``x_AD`` (rows of one expert are contiguous; on CUDA each
       token row is read once and stored at its K places, elsewhere an ``index_select``);
    3. the experts run as one grouped GEMM over those contiguous groups;
    4. un-sort and combine each token's K rows with its routing weights.
Steps 2 and 4 are custom autograd functions whose backward passes are gathers through the inverse
permutation (``dispatch_kernels.py``: one fused Triton kernel each on CUDA), so no atomic
scatter-add (slow and non-deterministic on GPUs for bf16) appears in forward or backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_engine.moe import dispatch_kernels as kernels

SCATTER = {"enabled": True}  # benchmarks switch it off to time the index_select permute side by side


@dataclass
class DispatchPlan:
    order_A: torch.Tensor  # assignment index in expert-sorted order
    inverse_A: torch.Tensor  # position of each assignment in the sorted order
    offsets_E: torch.Tensor  # int32 end row of each expert's group: the groups of the grouped GEMM
    valid_A: torch.Tensor | None  # bool, sorted order; None when nothing can be dropped

    @property
    def counts_E(self) -> torch.Tensor:
        """Rows per expert (dropped assignments excluded)."""
        return torch.diff(self.offsets_E, prepend=self.offsets_E.new_zeros(1))


def sort_key_dtype(num_ids: int) -> torch.dtype:
    """The narrowest integer type holding ids 0..num_ids-1: the GPU's radix sort makes one pass per key
    byte, so uint8 ids take one pass where int64 ids take eight (22 kernels per sort down to a handful),
    and a stable sort gives the same order whatever the key type."""
    return torch.uint8 if num_ids <= 256 else torch.int16 if num_ids <= 2**15 else torch.int64


def plan(expert_idx_A: torch.Tensor, num_experts: int, may_drop: bool) -> DispatchPlan:
    # A stable sort keeps token order inside each expert, so results do not depend on the sort.
    sorted_expert_A, order_A = torch.sort(expert_idx_A.to(sort_key_dtype(num_experts + 1)), stable=True)
    positions_A = torch.arange(order_A.numel(), device=order_A.device)
    inverse_A = torch.empty_like(order_A).scatter_(0, order_A, positions_A)
    # Group ends straight from the sorted ids: no bincount, whose output size forces a GPU->host sync.
    expert_ends_E = torch.arange(1, num_experts + 1, device=order_A.device, dtype=sorted_expert_A.dtype)
    offsets_E = torch.searchsorted(sorted_expert_A, expert_ends_E, out_int32=True)
    valid_A = (sorted_expert_A < num_experts) if may_drop else None
    return DispatchPlan(order_A, inverse_A, offsets_E, valid_A)


class _PermuteTokens(torch.autograd.Function):
    """x_AD = x_TD[order_A // K]; backward sums each token's K gradient rows (one fused gather-sum).
    On CUDA the forward stores each token row at its K sorted places (``scatter_rows``: T x D read instead
    of ``index_select``'s A x D, the same bits); elsewhere it is the ``index_select``.
    Rows of dropped assignments (``valid_A`` False) get no gradient: past the last expert group the
    grouped GEMM's backward leaves them unwritten, so they are zeroed before the sum."""

    @staticmethod
    def forward(ctx, x_TD, order_A, inverse_A, top_k, valid_A=None):
        ctx.save_for_backward(inverse_A, valid_A)
        ctx.top_k = top_k
        if SCATTER["enabled"] and kernels.use_triton(x_TD):
            return kernels.scatter_rows(x_TD, inverse_A, top_k)
        return x_TD.index_select(0, order_A // top_k)

    @staticmethod
    def backward(ctx, grad_AD):
        inverse_A, valid_A = ctx.saved_tensors
        if valid_A is not None:
            grad_AD = grad_AD.masked_fill(~valid_A[:, None], 0.0)
        return kernels.gather_sum(grad_AD, inverse_A, None, ctx.top_k), None, None, None, None


class _UnpermuteCombine(torch.autograd.Function):
    """out_TD[t] = sum_k w_TK[t, k] * y_AD[inverse_A[t*K + k]], accumulated in >= float32."""

    @staticmethod
    def forward(ctx, y_AD, weight_TK, inverse_A):
        ctx.save_for_backward(y_AD, weight_TK, inverse_A)
        return kernels.gather_sum(y_AD, inverse_A, weight_TK, weight_TK.shape[1])

    @staticmethod
    def backward(ctx, grad_TD):
        y_AD, weight_TK, inverse_A = ctx.saved_tensors
        grad_y_AD, grad_weight_TK = kernels.combine_backward(grad_TD, y_AD, inverse_A, weight_TK)
        return grad_y_AD, grad_weight_TK, None


def permute(x_TD: torch.Tensor, p: DispatchPlan, top_k: int) -> torch.Tensor:
    return _PermuteTokens.apply(x_TD, p.order_A, p.inverse_A, top_k, p.valid_A)


def unpermute(y_AD: torch.Tensor, weight_A: torch.Tensor, p: DispatchPlan, top_k: int) -> torch.Tensor:
    if p.valid_A is not None:  # rows of dropped assignments were never computed: zero them (0 * NaN = NaN)
        y_AD = y_AD.masked_fill(~p.valid_A[:, None], 0.0)
    return _UnpermuteCombine.apply(y_AD, weight_A.view(-1, top_k), p.inverse_A)

