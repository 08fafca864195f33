"""Expert-parallel dispatch: experts sharded over the ranks of a process group, tokens exchanged
with all-to-all. Shape legend in ``routing.py``; P is the expert-parallel size, El = E / P the
experts a rank holds (global ids ``[rank * El, (rank + 1) * El)``).

Forward on every rank:
    1. sort this rank's assignments by global expert (``dispatch.plan``) and gather their rows;
       rows for rank p's experts are then contiguous;
    2. exchange per-expert row counts, then the rows themselves (all-to-all with uneven splits);
    3. received rows arrive grouped by source rank; regroup them by local expert, run the local
       experts as one grouped GEMM, undo the regrouping;
    4. all-to-all the results back and combine them as in the single-rank path.
Every step is differentiable (``torch.distributed.nn`` all-to-all), so backward mirrors it. The
process group comes from DeepSpeed's expert-parallel groups (``training/parallel.py``); this file
itself needs only ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single

from moe_engine.moe import dispatch
from moe_engine.moe.experts import expert_mlp


@dataclass
class ExpertParallel:
    group: dist.ProcessGroup
    size: int
    rank: int
    num_experts: int  # global E

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.size


class _Permute(torch.autograd.Function):
    """Rows reordered by a permutation; backward applies the inverse (no scatter-add)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _permute(x, order):
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return _Permute.apply(x, order, inverse), inverse


def ep_routed_experts(ep: ExpertParallel, x_TD, routing, w_in_local, w_out_local, gated, act, dropout, training):
    """(out_TD, tokens_per_expert_E) with experts sharded over ``ep.group``."""
    E, El, P = ep.num_experts, ep.local_experts, ep.size
    plan = dispatch.plan(routing.expert_idx_A, E, may_drop=routing.may_drop)
    counts_E = plan.counts_E
    x_AD = dispatch.permute(x_TD, plan, routing.top_k)
    num_rows = x_AD.shape[0]

    # counts_PE[p, e]: rows rank p sends to my local expert e (after the exchange)
    recv_counts = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_counts, counts_E.contiguous(), group=ep.group)
    send_splits = counts_E.view(P, El).sum(1).tolist()  # one host sync for the sizes, as in every EP MoE
    recv_counts_PE = recv_counts.view(P, El)
    recv_splits = recv_counts_PE.sum(1).tolist()
    n_valid = sum(send_splits)

    x_send = x_AD[:n_valid]
    x_recv = all_to_all_single(x_send.new_empty(sum(recv_splits), x_AD.shape[1]), x_send, recv_splits, send_splits, group=ep.group)

    # regroup received rows (source-major) by local expert, stable within each expert
    local_expert_R = torch.repeat_interleave(
        torch.arange(El, device=x_TD.device, dtype=dispatch.sort_key_dtype(El)).repeat(P), recv_counts_PE.reshape(-1),
        output_size=x_recv.shape[0],
    )
    order_R = torch.sort(local_expert_R, stable=True).indices
    x_local, inverse_R = _permute(x_recv, order_R)
    local_plan = dispatch.DispatchPlan(order_R, inverse_R, torch.cumsum(recv_counts_PE.sum(0), 0, dtype=torch.int32), None)
    y_local = expert_mlp(x_local, local_plan, w_in_local, w_out_local, gated, act, dropout, training)
    y_recv = _Permute.apply(y_local, inverse_R, order_R)

    y_send = all_to_all_single(y_recv.new_empty(n_valid, y_recv.shape[1]), y_recv, send_splits, recv_splits, group=ep.group)
    if n_valid < num_rows:  # dropped assignments sit at the tail of the sorted order
        y_send = torch.cat([y_send, y_send.new_zeros(num_rows - n_valid, y_send.shape[1])])
    out_TD = dispatch.unpermute(y_send, routing.weight_A, plan, routing.top_k)
    return out_TD, counts_E
