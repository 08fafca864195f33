"""What trains, per method: LoRA adapters (peft) on attention and experts, the experts ESFT selected,
or every parameter. The router stays frozen bit-for-bit unless ``train_router``.

- ``lora``: peft LoRA on the attention projections (``target_modules``) and on the fused routed experts
  (``target_parameters`` on ``mlp.experts.gate_up_proj`` / ``down_proj``; Switch's per-expert ``wi`` /
  ``wo`` through ``target_modules``), shared experts optionally. The engine reads peft's A and B and
  computes ``x W^T + s (x A^T) B^T`` per expert inside its grouped path (``moe.experts.expert_lora``),
  so no [E, out, in] delta is built; dropout on the adapters' input works on experts too. The saved
  adapter is peft's own format, loadable by stock ``PeftModel.from_pretrained`` onto stock transformers.
- ``esft``: fused expert tensors train with the gradient rows of unselected experts zeroed and no
  weight decay (so Adam leaves them exactly as they were); everything else is frozen.
- ``full``: every parameter (the router only with ``train_router``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from moe_engine.errors import ConfigError
from moe_engine.finetune.config import FinetuneConfig
from moe_engine.models.adapters import ADAPTERS, moe_layers


def _router_params(model: nn.Module) -> list[nn.Parameter]:
    out = []
    for layer in moe_layers(model):
        out += list(layer.moe_router.parameters())
    return out


def _matched(model: nn.Module, names: list[str]) -> dict[str, int]:
    found = {name: 0 for name in names}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            for name in names:
                if module_name == name or module_name.endswith("." + name):
                    found[name] += 1
    return found


def lora_targets(model: nn.Module, cfg: FinetuneConfig) -> tuple[list[str] | str, list[str]]:
    """(peft target_modules, target_parameters) for this architecture, every name checked to exist."""
    adapter = ADAPTERS[model.config.model_type]
    default = cfg.lora.attention == ["q_proj", "k_proj", "v_proj", "o_proj"]
    attention = [n for n in adapter.attention if _matched(model, [n])[n]] if default else list(cfg.lora.attention)
    missing = [n for n, count in _matched(model, attention).items() if count == 0]
    if missing:
        raise ConfigError(f"finetune.lora.attention: no {', '.join(missing)} module in this {model.config.model_type} model "
                          f"(its attention projections: {', '.join(adapter.attention)})")
    modules = list(attention)
    if cfg.lora.shared_experts:
        shared = [f"{adapter.shared_experts}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        if not any(_matched(model, shared).values()):
            raise ConfigError(f"finetune.lora.shared_experts: this {model.config.model_type} model has no shared experts")
        modules += shared
    parameters: list[str] = []
    if cfg.lora.experts:
        layer = moe_layers(model)[0]
        if isinstance(layer.experts, nn.ModuleDict):  # Switch: one Linear pair per expert
            names = "|".join(map(re.escape, modules))
            return rf"(.*\.)?({names}|experts\.expert_\d+\.(wi|wo))", parameters
        fused = [n for n, _ in layer.experts.named_parameters(recurse=False)]
        parameters = [f"experts.{n}" for n in fused]
    return modules, parameters


def apply_lora(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """A peft model with LoRA as configured; only adapter parameters (and the router, if asked) train."""
    from peft import LoraConfig, get_peft_model

    modules, parameters = lora_targets(model, cfg)
    layers = moe_layers(model)
    to_save = sorted({layer.router_name for layer in layers}) if cfg.train_router else None
    peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0, target_modules=modules,
                             target_parameters=parameters or None, modules_to_save=to_save, bias="none")
    peft_model = get_peft_model(model, peft_config)
    if cfg.lora.dropout > 0:  # peft refuses dropout with target_parameters; the engine applies it itself
        for layer in layers:
            layer.lora_dropout = cfg.lora.dropout
        for module in peft_model.modules():
            if hasattr(module, "lora_dropout") and isinstance(module.lora_dropout, nn.ModuleDict):
                for name in list(module.lora_dropout):
                    module.lora_dropout[name] = nn.Dropout(cfg.lora.dropout)
    return peft_model


def _freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def apply_esft(model: nn.Module, cfg: FinetuneConfig, chosen: dict[str, list[int]]) -> None:
    """Train only the chosen experts of each layer (``chosen``: layer name -> expert ids). Call after
    experts were sharded over expert-parallel ranks: the masks cover this rank's slice."""
    _freeze_all(model)
    if cfg.esft.train_non_experts:
        expert_params = {id(p) for layer in moe_layers(model) for p in layer.experts.parameters()}
        shared = {id(p) for layer in moe_layers(model) if layer.shared is not None for p in layer.shared.parameters()}
        routers = {id(p) for p in _router_params(model)}
        for p in model.parameters():
            if id(p) not in expert_params | shared | routers:
                p.requires_grad_(True)
    named = {m: n for n, m in model.named_modules() if m in set(moe_layers(model))}
    for layer, name in named.items():
        ids = chosen.get(name, [])
        E = layer.num_experts
        ep = layer.expert_parallel
        first, count = (ep.rank * ep.local_experts, ep.local_experts) if ep is not None else (0, E)
        local = [i - first for i in ids if first <= i < first + count]
        if isinstance(layer.experts, nn.ModuleDict):  # one module per expert: freeze by module
            for i in local:
                for p in layer.experts[f"expert_{i}"].parameters():
                    p.requires_grad_(True)
        elif local:
            mask_E = torch.zeros(count, dtype=torch.bool)
            mask_E[local] = True
            for p in layer.experts.parameters(recurse=False):
                p.requires_grad_(True)
                p.no_weight_decay = True  # decay would move unselected experts (their grad is zero, not their decay)
                p.trained_fraction = len(local) / count
                shape = (count,) + (1,) * (p.dim() - 1)
                m = mask_E.to(p.device).view(shape)
                p.register_hook(lambda g, m=m: g * m.to(g.dtype))
        if cfg.esft.train_shared_experts and layer.shared is not None:
            for p in layer.shared.parameters():
                p.requires_grad_(True)
    if cfg.train_router:
        for p in _router_params(model):
            p.requires_grad_(True)


def apply_full(model: nn.Module, cfg: FinetuneConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    if not cfg.train_router:
        for p in _router_params(model):
            p.requires_grad_(False)


def trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(round(p.numel() * getattr(p, "trained_fraction", 1.0)) for p in model.parameters() if p.requires_grad)
    return trained, total
