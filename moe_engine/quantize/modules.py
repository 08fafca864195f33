"""Quantized modules behind the engine's seams, and the walk that installs them.

* :class:`QuantizedExperts` replaces a fused-experts module (transformers' ``MixtralExperts`` & co.:
  ``gate_up_proj`` [E, 2F, D] or ``up_proj`` [E, F, D], ``down_proj`` [E, D, F]) inside an engine
  ``MoELayer``. It defines ``expert_weights()``, the seam of ``moe_engine.moe.experts``, so dispatch
  and routers run unchanged on the dequantised weights, on CPU and CUDA alike.
* :class:`QuantizedExpertDict` is Switch's one-module-per-expert ``ModuleDict`` whose ``wi``/``wo``
  became :class:`QuantLinear`; it stacks them for the same seam.
* :class:`QuantLinear` replaces an ``nn.Linear`` (attention, shared experts, dense MLPs) when asked.

State-dict keys keep the original names with the buffers below them
(``mlp.experts.gate_up_proj.qweight``, ``self_attn.q_proj.weight.scales``), so a dequantised state
dict (``dequantized_state_dict``) has exactly the stock checkpoint's keys again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.errors import ConfigError, InputError, UserError
from moe_engine.moe.experts import expert_weights
from moe_engine.quantize.tensor import QuantizedWeight

_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


class IncompleteQuantization(UserError):
    """An expert tensor stayed in floating point (an experts module this quantizer does not know)."""


class QuantizedExperts(nn.Module):
    def __init__(self, w_in: QuantizedWeight, w_out: QuantizedWeight, gated: bool):
        super().__init__()
        self.gated = gated
        self.num_experts = w_in.shape[0]
        self.add_module("gate_up_proj" if gated else "up_proj", w_in)
        self.down_proj = w_out

    def quantized_weights(self) -> tuple[QuantizedWeight, QuantizedWeight]:
        return (self.gate_up_proj if self.gated else self.up_proj), self.down_proj

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        w_in, w_out = self.quantized_weights()
        return w_in.dequantize(), w_out.dequantize(), self.gated


class QuantLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QuantizedExpertDict(nn.ModuleDict):
    """Switch experts (``expert_i.wi`` [F, D], ``expert_i.wo`` [D, F]) with quantized linears."""

    def quantized_weights(self) -> tuple[list[QuantizedWeight], list[QuantizedWeight]]:
        mlps = [self[f"expert_{i}"] for i in range(len(self))]
        return [m.wi.weight for m in mlps], [m.wo.weight for m in mlps]

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        w_in, w_out = self.quantized_weights()
        return torch.stack([w.dequantize() for w in w_in]), torch.stack([w.dequantize() for w in w_out]), False


# ----------------------------------------------------------------------------- the walk
@dataclass
class Plan:
    """What gets quantized: module name -> kind ("experts" or "linear")."""

    modules: dict[str, str] = field(default_factory=dict)


def plan(model: nn.Module, attention: bool = False, dense: bool = False) -> Plan:
    """Every MoE layer's experts, plus the attention / other linears when asked. Routers (and
    Qwen2-MoE's shared-expert gate), embeddings and the LM head stay as they are."""
    from moe_engine.models.adapters import moe_layers

    layers = moe_layers(model)
    if not layers:
        raise InputError("the model has no MoE layers (is it a dense checkpoint?); quantize works on MoE models")
    names = {id(m): n for n, m in model.named_modules()}
    result, skip = Plan(), set()
    for layer in layers:
        result.modules[names[id(layer.experts)]] = "experts"
        for part in (layer.moe_router, layer.experts, getattr(layer, "shared_expert_gate", None)):
            if part is not None:
                skip.update(id(m) for m in part.modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        skip.add(id(head))
    if attention or dense:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and id(module) not in skip:
                is_attention = bool(_ATTENTION.search(name))
                if (attention and is_attention) or (dense and not is_attention):
                    result.modules[name] = "linear"
    return result


ExpertsHook = Callable[[str, torch.Tensor, torch.Tensor, nn.Module], None]


def install(model: nn.Module, spec: Plan, bits: int, group_size: int, *, empty: bool = False,
            on_experts: ExpertsHook | None = None) -> None:
    """Swap the planned modules for quantized ones, in place. ``empty=True`` allocates the buffers
    only (to load a saved checkpoint into). ``on_experts(name, w_in, w_out, new)`` sees each
    experts module's float weights before they are dropped (the error report)."""

    def quantized(w: torch.Tensor, name: str) -> QuantizedWeight:
        in_dim = w.shape[-1]
        if bits == 4 and in_dim % group_size:
            raise ConfigError(f"quantize.group_size = {group_size} does not divide the input width {in_dim} of {name}; "
                              f"choose an even divisor of {in_dim}")
        if empty:
            return QuantizedWeight(tuple(w.shape), bits, group_size, dtype=w.dtype, device=w.device)
        return QuantizedWeight.quantize(w, bits, group_size)

    for name, kind in spec.modules.items():
        module = model.get_submodule(name)
        if kind == "linear":
            new = QuantLinear(quantized(module.weight, f"{name}.weight"), module.bias)
        elif isinstance(module, (QuantizedExperts, QuantizedExpertDict)):
            raise InputError(f"{name} is already quantized")
        elif callable(getattr(type(module), "expert_weights", None)):
            raise IncompleteQuantization(f"{name} ({type(module).__name__}) provides its weights itself "
                                         "(offloaded?); quantize the checkpoint, not this model")
        else:
            w_in, w_out, gated = expert_weights(module)
            if isinstance(module, nn.ModuleDict):  # Switch: one MLP per expert, kept per expert
                for i in range(len(module)):
                    mlp = module[f"expert_{i}"]
                    for attr in ("wi", "wo"):
                        linear = getattr(mlp, attr)
                        setattr(mlp, attr, QuantLinear(quantized(linear.weight, f"{name}.expert_{i}.{attr}.weight"),
                                                       linear.bias))
                new = QuantizedExpertDict(dict(module.items()))
            else:
                tag = "gate_up_proj" if gated else "up_proj"
                new = QuantizedExperts(quantized(w_in, f"{name}.{tag}"), quantized(w_out, f"{name}.down_proj"), gated)
            if on_experts is not None:
                on_experts(name, w_in, w_out, new)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def check_complete(model: nn.Module) -> int:
    """Raise unless every expert tensor of every MoE layer is quantized; returns how many expert
    tensors are (Switch counts one per expert and projection, fused experts one per projection)."""
    from moe_engine.models.adapters import moe_layers

    layers = set(moe_layers(model))
    left, count = [], 0
    for lname, layer in ((n, m) for n, m in model.named_modules() if m in layers):
        experts = layer.experts
        if not isinstance(experts, (QuantizedExperts, QuantizedExpertDict)):
            left.append(f"{lname}.experts ({type(experts).__name__})")
            continue
        w_in, w_out = experts.quantized_weights()
        count += len(w_in) + len(w_out) if isinstance(w_in, list) else 2
        left += [f"{lname}.experts.{p}" for p, t in experts.named_parameters() if t.is_floating_point() and not p.endswith("bias")]
    if left:
        raise IncompleteQuantization("expert tensors left in floating point: " + ", ".join(left[:10])
                                     + (f" and {len(left) - 10} more" if len(left) > 10 else ""))
    if count == 0:
        raise IncompleteQuantization("no expert tensor was quantized (no MoE layers found)")
    return count


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """name (the stock checkpoint key) -> quantized weight, for every quantized tensor of the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedWeight)}


def dequantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every quantized weight dequantised under its original key: a
    checkpoint stock transformers loads (with the quantization's rounding in it)."""
    state = dict(model.state_dict())
    for name, q in quantized_weights(model).items():
        for buf in ("qweight", "scales", "zeros"):
            state.pop(f"{name}.{buf}", None)
        state[name] = q.dequantize()
    return state
