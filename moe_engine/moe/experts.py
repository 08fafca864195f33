"""Expert weights and the grouped expert MLP. Shape legend in ``routing.py``; H is the expert's
input-projection width (2F for gated SwiGLU-style experts, F otherwise).

Weights use transformers' layout so checkpoints load unchanged: fused 3-D ``gate_up_proj`` [E, 2F, D]
(gate rows first, then up) and ``down_proj`` [E, D, F]; non-gated experts use ``up_proj`` [E, F, D].
Switch Transformers keeps one ``wi``/``wo`` module per expert; those are stacked on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.moe.dispatch import DispatchPlan
from moe_engine.moe.swiglu import swiglu

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown expert activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


class Experts(nn.Module):
    """E expert MLPs stored as fused 3-D weights (the layout of transformers' MixtralExperts)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, act: str = "silu", gated: bool = True):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_size, ffn_size
        self.act_name, self.gated = act, gated
        width = 2 * ffn_size if gated else ffn_size
        w_in = nn.Parameter(torch.empty(num_experts, width, hidden_size))
        if gated:
            self.gate_up_proj = w_in
        else:
            self.up_proj = w_in
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size))
        for w in (w_in, self.down_proj):
            nn.init.normal_(w, std=0.02)


# ----------------------------------------------------------------------------- the provider protocol
# How the layer reads expert weights; dispatch and routers never see where they came from. An experts
# module may define either or both of these methods (every other module is read by its parameters):
#
#   expert_weights() -> (w_in_EHD, w_out_EDF, gated)
#       every expert, as device tensors in transformers' layout (resident weights; a quantized module
#       may dequantize here). Used wherever all experts are needed: expert parallelism, and the layer
#       itself when ``fetch_experts`` is not defined.
#   fetch_experts(routing, x_TD) -> ExpertSlots
#       only what this forward selected: the layer passes its routing (and the routed hidden states,
#       for a provider that prefetches by applying the next layer's router to them) and receives S
#       "slots" of weights plus each assignment's slot. An offloaded provider with a device cache
#       (moe_engine.inference.offload) implements it; a quantized-and-offloaded one would dequantize
#       into its slots. The layer then runs the same grouped or decode math over the S slots.


@dataclass
class ExpertSlots:
    """The expert weights one forward uses: S slots (S = E for resident experts) and the slot of
    every assignment (``S`` marks a dropped assignment, as ``E`` does in ``Routing``)."""

    w_in_SHD: torch.Tensor
    w_out_SDF: torch.Tensor
    gated: bool
    slot_idx_A: torch.Tensor

    @property
    def num_slots(self) -> int:
        return self.w_in_SHD.shape[0]


def expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(w_in_EHD, w_out_EDF, gated) for any supported experts module, sharing its parameters.

    A module that provides them another way (quantized, offloaded) defines ``expert_weights()``
    returning the same triple (see the protocol above), and dispatch and routers do not change."""
    provider = getattr(type(experts), "expert_weights", None)
    if callable(provider):
        return experts.expert_weights()
    if isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        return experts.gate_up_proj, experts.down_proj, True
    if isinstance(getattr(experts, "up_proj", None), torch.Tensor) and experts.up_proj.dim() == 3:
        return experts.up_proj, experts.down_proj, False
    if isinstance(experts, nn.ModuleDict):  # Switch: expert_i.wi [F, D], expert_i.wo [D, F]
        mlps = [experts[f"expert_{i}"] for i in range(len(experts))]
        w_in = torch.stack([m.wi.weight for m in mlps])
        w_out = torch.stack([m.wo.weight for m in mlps])
        return w_in, w_out, False
    raise TypeError(f"{type(experts).__name__} holds no expert weights this engine understands")


def fetch_experts(experts: nn.Module, routing, x_TD: torch.Tensor) -> ExpertSlots:
    """The weights of the experts ``routing`` selected: the module's own ``fetch_experts`` if it has
    one, else all its experts (``expert_weights``) with the routing's expert ids as slots."""
    provider = getattr(type(experts), "fetch_experts", None)
    if callable(provider):
        return experts.fetch_experts(routing, x_TD)
    w_in, w_out, gated = expert_weights(experts)
    return ExpertSlots(w_in, w_out, gated, routing.expert_idx_A)


def _use_grouped_mm(x_AD: torch.Tensor, w: torch.Tensor) -> bool:
    # The CUDA grouped GEMM wants bf16 operands whose rows are 16-byte aligned.
    return (
        x_AD.is_cuda
        and hasattr(F, "grouped_mm")
        and x_AD.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and x_AD.shape[-1] % 8 == 0
        and w.shape[1] % 8 == 0
    )


def grouped_linear(x_AD: torch.Tensor, w_EOI: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
    """y[a] = x[a] @ w[e(a)].T for rows sorted by expert; rows past the last group are left
    undefined on the GPU path (they belong to dropped assignments and are masked later)."""
    if _use_grouped_mm(x_AD, w_EOI):
        return F.grouped_mm(x_AD, w_EOI.transpose(-2, -1), offs=p.offsets_E)
    # Portable path: one GEMM per expert over its contiguous rows (one host sync for the sizes).
    sizes = p.counts_E.tolist()
    tail = x_AD.shape[0] - sum(sizes)
    chunks = x_AD.split(sizes + [tail])
    outs = [chunk @ w_EOI[e].t() for e, chunk in enumerate(chunks[:-1])]
    outs.append(x_AD.new_zeros(tail, w_EOI.shape[1]))
    return torch.cat(outs)


def expert_mlp(
    x_AD: torch.Tensor,
    p: DispatchPlan,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    gated: bool,
    act,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Each expert's MLP on its rows: down(act(gate) * up) when gated, else down(act(up))."""
    h_AH = grouped_linear(x_AD, w_in_EHD, p)
    if gated and act is F.silu:
        h_AF = swiglu(h_AH)  # fused Triton kernel on CUDA
    elif gated:
        gate_AF, up_AF = h_AH.chunk(2, dim=-1)
        h_AF = act(gate_AF) * up_AF
    else:
        h_AF = act(h_AH)
    if dropout > 0 and training:
        h_AF = F.dropout(h_AF, dropout, training=True)
    return grouped_linear(h_AF, w_out_EDF, p)
