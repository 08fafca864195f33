"""An exportable Switch Transformers sparse MLP, for the ONNX export of a stock transformers model.

transformers' ``SwitchTransformersSparseMLP`` cannot be exported as it is: its router casts its own
``classifier`` module inside ``forward`` (``self.classifier = self.classifier.to(self.dtype)``, which
``torch.export`` refuses), and its experts loop over the experts that got tokens
(``expert_mask.sum(...).nonzero()``), a data-dependent loop that a trace would bake in. During the
export only, :func:`exportable_switch` gives each sparse MLP a forward computing the same function
from the same weights with static-shape routing (top-1, expert capacity per sequence, as
``SwitchTransformersTop1Router``) and the experts as grouped matmuls (tokens sorted by expert, one
matmul per expert over its rows: transformers' ``grouped_mm_fallback`` op, which transformers'
ONNX exporter lowers to one ``MatMul`` per expert), never a weight copy per token.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn


def _sparse_mlp_forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
    import transformers.integrations.moe  # noqa: F401 - registers torch.ops.transformers.grouped_mm_fallback

    router, experts = self.router, self.experts
    B, S, D = hidden_BSD.shape
    E = router.num_experts
    # router: float32 logits and softmax ("selective precision", Switch Transformers sec. 2.4)
    bias = None if router.classifier.bias is None else router.classifier.bias.to(router.dtype)
    logits_BSE = F.linear(hidden_BSD.to(router.dtype), router.classifier.weight.to(router.dtype), bias)
    probs_BSE = torch.softmax(logits_BSE, dim=-1, dtype=router.dtype).to(hidden_BSD.dtype)
    expert_BS = probs_BSE.argmax(dim=-1)
    onehot_BSE = F.one_hot(expert_BS, E)
    position_BS = (torch.cumsum(onehot_BSE, dim=-2) * onehot_BSE).sum(-1)  # place in its expert's queue
    keep_BS = position_BS <= router.expert_capacity  # tokens past capacity are dropped (output 0)
    weight_T = (probs_BSE.amax(dim=-1) * keep_BS).reshape(-1)
    # experts: sort tokens by expert, one matmul per expert over its contiguous rows
    x_TD = hidden_BSD.reshape(-1, D)
    expert_T = expert_BS.reshape(-1)
    order_T = torch.argsort(expert_T)
    inverse_T = torch.argsort(order_T)
    ends_E = torch.cumsum(onehot_BSE.reshape(-1, E).sum(0), 0).to(torch.int32)  # static [E], unlike bincount
    mlps = [experts[f"expert_{i}"] for i in range(E)]
    w_in_EDF = torch.stack([m.wi.weight.t() for m in mlps])
    w_out_EFD = torch.stack([m.wo.weight.t() for m in mlps])
    grouped = torch.ops.transformers.grouped_mm_fallback
    h_TF = mlps[0].act(grouped(x_TD.index_select(0, order_T), w_in_EDF, ends_E))
    y_TD = grouped(h_TF, w_out_EFD, ends_E).index_select(0, inverse_T)
    return (y_TD * weight_T[:, None]).to(hidden_BSD.dtype).reshape(B, S, D)


@contextlib.contextmanager
def exportable_switch(model: nn.Module):
    """Inside the block every ``SwitchTransformersSparseMLP`` of ``model`` runs the exportable forward."""
    blocks = [m for m in model.modules() if type(m).__name__ == "SwitchTransformersSparseMLP"]
    for block in blocks:
        block.forward = types.MethodType(_sparse_mlp_forward, block)
    try:
        yield model
    finally:
        for block in blocks:
            del block.forward
