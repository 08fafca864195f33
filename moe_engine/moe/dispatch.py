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

Aligned groups (``plan(..., align=N)``, for grouped kernels whose tiles must not span two experts, such as
DeepGEMM's m-grouped GEMMs with their 128-row blocks): each expert's group starts at a multiple of N rows, the
rows between one group's last token and the next group's start are zero ("padding"; the grouped GEMMs map
zero rows to zero rows, so the weight gradients over whole groups are unchanged), and the buffers have a fixed
``A + E * (N - 1) + 1`` rows whatever the routing (no host sync; CUDA graphs keep working). Rows past the last
group ("tail") stay undefined, as dropped rows always were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_engine.moe import dispatch_kernels as kernels

SCATTER = {"enabled": True}  # benchmarks switch it off to time the index_select permute side by side
# Align every token-choice dispatch's groups to this many rows (0: no padding) on top of what the expert
# kernels ask for (experts.row_alignment): tests and benchmarks check the aligned layout on any device with it.
ALIGN = {"rows": 0}


@dataclass
class DispatchPlan:
    order_A: torch.Tensor  # assignment index in expert-sorted order
    inverse_A: torch.Tensor  # position of each assignment in the sorted order
    offsets_E: torch.Tensor  # int32 end row of each expert's group: the groups of the grouped GEMM
    valid_A: torch.Tensor | None  # bool per row of the sorted buffers; None when nothing can be dropped
    # aligned groups only (see the module docstring), all None otherwise:
    rows: int | None = None  # rows of the expert-sorted buffers (A when None)
    align: int = 0  # every group starts on a multiple of this many rows (0: unaligned)
    tokens_E: torch.Tensor | None = None  # int32 real rows per expert (a group also holds its padding)
    ends_E: torch.Tensor | None = None  # int32 row after each expert's last real row (DeepGEMM's "psum" layout)
    # [E * (align - 1)] rows to zero: per expert, its padding rows, the unused slots taking distinct tail rows
    pad_rows_P: torch.Tensor | None = None

    @property
    def group_rows_E(self) -> torch.Tensor:
        """Rows in each expert's group of the grouped GEMM (its tokens and, when aligned, its padding)."""
        return torch.diff(self.offsets_E, prepend=self.offsets_E.new_zeros(1))

    @property
    def counts_E(self) -> torch.Tensor:
        """Tokens per expert (dropped assignments and padding excluded)."""
        return self.tokens_E if self.tokens_E is not None else self.group_rows_E

    @property
    def aligned(self) -> bool:
        return self.align > 0


def sort_key_dtype(num_ids: int) -> torch.dtype:
    """The narrowest integer type holding ids 0..num_ids-1: the GPU's radix sort makes one pass per key
    byte, so uint8 ids take one pass where int64 ids take eight (22 kernels per sort down to a handful),
    and a stable sort gives the same order whatever the key type."""
    return torch.uint8 if num_ids <= 256 else torch.int16 if num_ids <= 2**15 else torch.int64


def plan(expert_idx_A: torch.Tensor, num_experts: int, may_drop: bool, align: int = 0) -> DispatchPlan:
    """The expert-sorted order of the assignments; ``align`` > 1 starts every group at a multiple of that many
    rows (the module docstring: aligned groups)."""
    # A stable sort keeps token order inside each expert, so results do not depend on the sort.
    sorted_expert_A, order_A = torch.sort(expert_idx_A.to(sort_key_dtype(num_experts + 1)), stable=True)
    positions_A = torch.arange(order_A.numel(), device=order_A.device)
    # Group ends straight from the sorted ids: no bincount, whose output size forces a GPU->host sync.
    expert_ends_E = torch.arange(1, num_experts + 1, device=order_A.device, dtype=sorted_expert_A.dtype)
    offsets_E = torch.searchsorted(sorted_expert_A, expert_ends_E, out_int32=True)
    if align > 1:
        return _aligned_plan(sorted_expert_A, order_A, positions_A, offsets_E, num_experts, may_drop, align)
    inverse_A = torch.empty_like(order_A).scatter_(0, order_A, positions_A)
    valid_A = (sorted_expert_A < num_experts) if may_drop else None
    return DispatchPlan(order_A, inverse_A, offsets_E, valid_A)


def _aligned_plan(sorted_expert_A, order_A, positions_A, offsets_E, num_experts, may_drop, align) -> DispatchPlan:
    E, A, dev = num_experts, order_A.numel(), order_A.device
    tokens_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
    group_rows_E = (tokens_E + (align - 1)) // align * align
    group_ends_E = group_rows_E.cumsum(0).to(torch.int32)
    starts_E = group_ends_E - group_rows_E  # where each group starts now
    # every sorted row moves by its expert's shift; dropped rows (id E) follow the last group
    shift_X = torch.cat([starts_E - (offsets_E - tokens_E), (group_ends_E[-1:] - offsets_E[-1:])]).long()
    row_A = positions_A + shift_X[sorted_expert_A.long()]
    inverse_A = torch.empty_like(order_A).scatter_(0, order_A, row_A)
    rows = A + E * (align - 1) + 1  # the most any routing needs, and one row to spare
    # padding rows of expert e: its group's rows past its tokens; unused slots take distinct tail rows
    slot_EP = torch.arange(align - 1, device=dev)
    is_pad_EP = slot_EP[None, :] < (group_rows_E - tokens_E)[:, None]
    pad_EP = (starts_E + tokens_E)[:, None].long() + slot_EP[None, :]
    used = group_ends_E[-1].long() + (A - offsets_E[-1].long())  # groups, then the dropped rows
    spare_EP = used + (torch.cumsum((~is_pad_EP).flatten(), 0) - 1).view(E, align - 1)
    pad_rows_P = torch.where(is_pad_EP, pad_EP, spare_EP).flatten()
    valid_A = None
    if may_drop:  # per buffer row: a token routed to an expert (padding, dropped and tail rows are not)
        valid_A = torch.zeros(rows, dtype=torch.bool, device=dev).scatter_(0, row_A, sorted_expert_A < E)
    return DispatchPlan(order_A, inverse_A, group_ends_E, valid_A, rows=rows, align=align, tokens_E=tokens_E.to(torch.int32),
                        ends_E=(starts_E + tokens_E).to(torch.int32), pad_rows_P=pad_rows_P)


class _PermuteTokens(torch.autograd.Function):
    """x_AD = x_TD[order_A // K]; backward sums each token's K gradient rows (one fused gather-sum).
    On CUDA the forward stores each token row at its K sorted places (``scatter_rows``: T x D read instead
    of ``index_select``'s A x D, the same bits); elsewhere it is the ``index_select``.
    Rows of dropped assignments (``valid_A`` False) get no gradient: past the last expert group the
    grouped GEMM's backward leaves them unwritten, so they are zeroed before the sum."""

    @staticmethod
    def forward(ctx, x_TD, order_A, inverse_A, top_k, valid_A=None, rows=None, pad_rows_P=None):
        ctx.save_for_backward(inverse_A, valid_A)
        ctx.top_k = top_k
        if rows is not None:  # aligned groups: the rows land at their places (always the scatter), padding is zeroed
            return kernels.scatter_rows(x_TD, inverse_A, top_k, rows).index_fill_(0, pad_rows_P, 0)
        if SCATTER["enabled"] and kernels.use_triton(x_TD):
            return kernels.scatter_rows(x_TD, inverse_A, top_k)
        return x_TD.index_select(0, order_A // top_k)

    @staticmethod
    def backward(ctx, grad_AD):
        inverse_A, valid_A = ctx.saved_tensors
        if valid_A is not None:
            grad_AD = grad_AD.masked_fill(~valid_A[:, None], 0.0)
        return kernels.gather_sum(grad_AD, inverse_A, None, ctx.top_k), None, None, None, None, None, None


class _UnpermuteCombine(torch.autograd.Function):
    """out_TD[t] = sum_k w_TK[t, k] * y_AD[inverse_A[t*K + k]], accumulated in >= float32."""

    @staticmethod
    def forward(ctx, y_AD, weight_TK, inverse_A, pad_rows_P=None):
        ctx.save_for_backward(y_AD, weight_TK, inverse_A, pad_rows_P)
        return kernels.gather_sum(y_AD, inverse_A, weight_TK, weight_TK.shape[1])

    @staticmethod
    def backward(ctx, grad_TD):
        y_AD, weight_TK, inverse_A, pad_rows_P = ctx.saved_tensors
        grad_y_AD, grad_weight_TK = kernels.combine_backward(grad_TD, y_AD, inverse_A, weight_TK)
        if pad_rows_P is not None:  # the weight gradients sum over whole groups: their padding must be zero
            grad_y_AD.index_fill_(0, pad_rows_P, 0)
        return grad_y_AD, grad_weight_TK, None, None


def permute(x_TD: torch.Tensor, p: DispatchPlan, top_k: int) -> torch.Tensor:
    return _PermuteTokens.apply(x_TD, p.order_A, p.inverse_A, top_k, p.valid_A, p.rows, p.pad_rows_P)


def unpermute(y_AD: torch.Tensor, weight_A: torch.Tensor, p: DispatchPlan, top_k: int) -> torch.Tensor:
    if p.valid_A is not None:  # rows of dropped assignments were never computed: zero them (0 * NaN = NaN)
        y_AD = y_AD.masked_fill(~p.valid_A[:, None], 0.0)
    return _UnpermuteCombine.apply(y_AD, weight_A.view(-1, top_k), p.inverse_A, p.pad_rows_P)

