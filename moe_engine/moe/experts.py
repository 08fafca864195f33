"""Expert weights and the grouped expert MLP. Shape legend in ``routing.py``; H is the expert's
input-projection width (2F for gated SwiGLU-style experts, F otherwise); R a LoRA rank.

Weights use transformers' layout so checkpoints load unchanged: fused 3-D ``gate_up_proj`` [E, 2F, D]
(gate rows first, then up) and ``down_proj`` [E, D, F]; non-gated experts use ``up_proj`` [E, F, D].
Switch Transformers keeps one ``wi``/``wo`` module per expert; those are stacked on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.moe import cutlass_gemm, deepgemm_gemm, dispatch
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
        base = lambda m: m.base_layer if _is_lora_linear(m) else m  # noqa: E731 - peft LoRA keeps the Linear inside
        w_in = torch.stack([base(m.wi).weight for m in mlps])
        w_out = torch.stack([base(m.wo).weight for m in mlps])
        return w_in, w_out, False
    raise TypeError(f"{type(experts).__name__} holds no expert weights this engine understands")


@dataclass
class LowRank:
    """One LoRA adapter on a fused expert weight [E, O, I]: ``delta_e = scale * b_EOR[e] @ a_ERI[e]``.
    The expert path computes ``x W_e^T + scale * ((dropout(x) a_e^T) b_e^T)``: two thin grouped GEMMs,
    never the [E, O, I] delta (peft's own ``target_parameters`` forward rebuilds W + delta each call)."""

    a_ERI: torch.Tensor
    b_EOR: torch.Tensor
    scale: float
    dropout: float = 0.0


def _is_param_wrapper(module) -> bool:  # peft's LoRA on an nn.Parameter (target_parameters)
    return hasattr(module, "parameter_name") and hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def _is_lora_linear(module) -> bool:  # peft's LoRA on an nn.Linear (target_modules)
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and isinstance(getattr(module, "base_layer"), nn.Linear)


def _active(wrapper) -> list[str]:
    if getattr(wrapper, "disable_adapters", False) or getattr(wrapper, "merged", False):
        return []
    return [a for a in wrapper.active_adapters if a in wrapper.lora_A]


def expert_lora(experts: nn.Module, dropout: float = 0.0) -> tuple[nn.Module, dict[str, list[LowRank]]]:
    """(the experts module under any peft LoRA wrappers, {"in": [...], "out": [...]} low-rank terms of the
    active adapters). Reads peft's own weights (no copy), so its optimizer and ``save_pretrained`` work
    unchanged; recognises peft by duck typing (the engine does not import it)."""
    terms: dict[str, list[LowRank]] = {"in": [], "out": []}
    module = experts
    while _is_param_wrapper(module):  # nested: one wrapper per targeted parameter
        which = "out" if module.parameter_name == "down_proj" else "in"
        for name in _active(module):
            lhs, rhs, scale = module.get_delta_factors(name)  # delta = scale * lhs @ rhs in the parameter's layout
            param = module.get_param()
            if lhs.shape[:2] != param.shape[:2] or rhs.shape[-1] != param.shape[-1]:
                raise TypeError(f"unexpected LoRA factor layout {tuple(lhs.shape)} @ {tuple(rhs.shape)} for {tuple(param.shape)}")
            # peft's views are permuted; the grouped GEMM wants row-major [E, out, in] (copies of rank-r factors only)
            terms[which].append(LowRank(rhs.contiguous(), lhs.contiguous(), scale, dropout))
        module = module.base_layer
    if isinstance(module, nn.ModuleDict):  # Switch: peft LoRA on each expert's wi / wo Linear
        mlps = [module[f"expert_{i}"] for i in range(len(module))]
        for which, attr in (("in", "wi"), ("out", "wo")):
            first = getattr(mlps[0], attr)
            if not _is_lora_linear(first):
                continue
            for name in _active(first):
                a = torch.stack([getattr(m, attr).lora_A[name].weight for m in mlps])
                b = torch.stack([getattr(m, attr).lora_B[name].weight for m in mlps])
                terms[which].append(LowRank(a, b, first.scaling[name], dropout))
    return module, terms


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


def row_alignment(x_TD: torch.Tensor, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor) -> int:
    """Rows each expert group of a token-choice dispatch must start on for these weights (0: any):
    DeepGEMM's block once ``deepgemm_gemm.enable`` ran, or what ``dispatch.ALIGN`` asks for."""
    return max(dispatch.ALIGN["rows"], deepgemm_gemm.row_alignment(x_TD, w_in_EHD, w_out_EDF))


def grouped_linear(x_AD: torch.Tensor, w_EOI: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
    """y[a] = x[a] @ w[e(a)].T for rows sorted by expert; rows past the last group are left
    undefined on the GPU path (they belong to dropped assignments and are masked later). With aligned
    groups (``p.aligned``) the zero padding rows inside groups give zero rows."""
    if _use_grouped_mm(x_AD, w_EOI):
        if p.align == deepgemm_gemm.ALIGN and deepgemm_gemm.usable(x_AD, w_EOI):  # deepgemm_gemm.enable(...) was called
            return deepgemm_gemm.grouped_linear(x_AD, w_EOI, p)
        if cutlass_gemm.usable(x_AD, w_EOI):  # cutlass_gemm.enable(...) was called: the per-shape tuned kernels
            return cutlass_gemm.grouped_linear(x_AD, w_EOI, p.offsets_E)
        return F.grouped_mm(x_AD, w_EOI.transpose(-2, -1), offs=p.offsets_E)
    # Portable path: one GEMM per expert over its contiguous rows (one host sync for the sizes).
    sizes = p.group_rows_E.tolist()
    tail = x_AD.shape[0] - sum(sizes)
    chunks = x_AD.split(sizes + [tail])
    outs = [chunk @ w_EOI[e].t() for e, chunk in enumerate(chunks[:-1])]
    outs.append(x_AD.new_zeros(tail, w_EOI.shape[1]))
    return torch.cat(outs)


def lora_linear(x_AD: torch.Tensor, w_EOI: torch.Tensor, p: DispatchPlan, terms: list[LowRank], training: bool) -> torch.Tensor:
    """``grouped_linear`` plus each LoRA term, as (x a^T) b^T per expert."""
    y_AO = grouped_linear(x_AD, w_EOI, p)
    for t in terms:
        x = F.dropout(x_AD, t.dropout, training=True) if t.dropout > 0 and training else x_AD
        y_AO = y_AO + t.scale * grouped_linear(grouped_linear(x, t.a_ERI.to(x.dtype), p), t.b_EOR.to(x.dtype), p)
    return y_AO


def expert_mlp(
    x_AD: torch.Tensor,
    p: DispatchPlan,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    gated: bool,
    act,
    dropout: float = 0.0,
    training: bool = False,
    lora: dict[str, list[LowRank]] | None = None,
) -> torch.Tensor:
    """Each expert's MLP on its rows: down(act(gate) * up) when gated, else down(act(up)); ``lora``
    adds low-rank terms to the input ("in") and output ("out") projections."""
    lora = lora or {}
    h_AH = lora_linear(x_AD, w_in_EHD, p, lora.get("in", []), training)
    if gated and act is F.silu:
        h_AF = swiglu(h_AH)  # fused Triton kernel on CUDA
    elif gated:
        gate_AF, up_AF = h_AH.chunk(2, dim=-1)
        h_AF = act(gate_AF) * up_AF
    else:
        h_AF = act(h_AH)
    if dropout > 0 and training:
        h_AF = F.dropout(h_AF, dropout, training=True)
    return lora_linear(h_AF, w_out_EDF, p, lora.get("out", []), training)
