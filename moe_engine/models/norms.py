"""Fused RMSNorm for the transformer blocks around the MoE layers (any model: MoE or dense).

transformers writes RMSNorm as eager ops: a cast to float32, ``pow``, ``mean``, ``rsqrt``, two
multiplies and a cast back, each a full pass over the [T, D] activation in float32, and about twice
as many in backward: 1.4 ms per norm fwd+bwd at 16k tokens x 2048 on an H200, where torch's own
``F.rms_norm`` (one fused CUDA kernel each way, float32 inside) takes 0.17 ms
(``benchmarks/norm_kernels.py``). A decoder layer has two norms, OLMoE's and Qwen3's attention two more
(q/k norms): on the 128-expert OLMoE-shaped model the eager norms were ~22% of the training step.

``fuse_rms_norms(model)`` switches every RMSNorm module of a model to ``F.rms_norm`` where it runs
fused (a CUDA tensor whose dtype equals the weight's) and leaves the module,
its parameter and its ``state_dict`` key as they are; elsewhere (CPU, mixed dtypes) the module's
own forward runs, so the CPU path is bit-for-bit the stock one. The function is the same; the rounding
differs slightly: transformers rounds the normalised value to bf16 before the weight multiply,
``F.rms_norm`` rounds once after it (closer to float64 math; the GPU tests compare both against it). A
module is switched only if it behaves as transformers' formula on a probe input (so Gemma-style
``(1 + weight)`` norms, LayerNorms with a mean or a bias, and anything unrecognised keep their own forward).
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The formula of transformers' RMSNorm modules (Llama, Mixtral, OLMoE, Qwen, DeepSeek, Switch's
    T5-style norm) for an input of the weight's dtype."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused kernel runs for this call (else the module's own forward does)."""
    return (x.is_cuda and weight.is_cuda and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and weight.dim() == 1 and x.shape[-1] == weight.shape[0])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dimension: torch's fused kernel where ``fusable``, else the reference formula."""
    if fusable(x, weight):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_reference(x, weight, eps)


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if fusable(hidden_states, self.weight):
        return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self._moe_lab_norm_eps)
    return type(self).forward(self, hidden_states)


def _takes_one_input(module: nn.Module) -> bool:
    """``forward(hidden_states)`` and nothing else (gated norms take a second input)."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


def _behaves_as_rms_norm(module: nn.Module, eps: float) -> bool:
    """The module's own forward equals the formula on probes: a copy of the module with a float32 CPU
    weight, so the check neither touches the module nor depends on where it lives (float32: some
    modules compute the mean of squares in float32 whatever the input's dtype). Two scales: mean(x^2)
    ~ 9, and ~ eps, where an epsilon other than the attribute's would show."""
    if module.weight.numel() == 0 or not _takes_one_input(module):
        return False
    probe = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(0)
    weight = torch.rand(module.weight.shape[0], generator=gen, dtype=torch.float32) + 0.5
    probe.weight = nn.Parameter(weight, requires_grad=False)  # replaces the copy's parameter (same name)
    x = torch.randn(3, weight.shape[0], generator=gen, dtype=torch.float32)
    for scale in (3.0, eps ** 0.5):
        try:
            with torch.no_grad():
                out = type(module).forward(probe, x * scale)
        except Exception:  # noqa: BLE001 - a module that cannot run the probe is not ours to fuse
            return False
        if not (isinstance(out, torch.Tensor) and out.shape == x.shape
                and torch.allclose(out, rms_norm_reference(x * scale, weight, eps), rtol=1e-5, atol=1e-6)):
            return False
    return True


def fuse_rms_norms(model: nn.Module) -> int:
    """Run every RMSNorm module of ``model`` on the fused kernel where it applies; returns how many.
    Each module is probed on its own (per-instance settings count). Idempotent; parameters, names and
    ``state_dict`` are untouched (only the forward changes; a pickled model still loads: the forward is
    a ``functools.partial`` of a module-level function)."""
    fused = 0
    for module in model.modules():
        if getattr(module, "_moe_lab_norm_eps", None) is not None:
            fused += 1
            continue
        weight, eps = getattr(module, "weight", None), _eps(module)
        if (eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1 or getattr(module, "bias", None) is not None
                or list(module.children()) or "norm" not in type(module).__name__.lower()):
            continue
        if _behaves_as_rms_norm(module, eps):
            module._moe_lab_norm_eps = eps
            module.forward = functools.partial(_fused_forward, module)
            fused += 1
    return fused
