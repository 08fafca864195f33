"""Per-architecture adapters: turn one transformers sparse block into an engine ``MoELayer`` that
holds the *same* parameter tensors under the *same* names.

An adapter reads the block's config (k, normalisation, scoring, shared experts...) into a
:class:`RouterConfig`, moves the router weight (and DeepSeek-V3's correction bias) into the
engine router, and keeps the experts / shared-expert modules as they are: the engine only reads
their weights. So ``state_dict`` keys do not change and a patched model saves a checkpoint that
stock transformers loads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch.nn.functional as F
from torch import nn

from moe_engine.errors import ConfigError
from moe_engine.moe.experts import activation
from moe_engine.moe.layer import MoELayer
from moe_engine.moe.router import ROUTERS, RouterConfig, SwitchRouter


@dataclass(frozen=True)
class Adapter:
    block_class: str  # transformers class name of the sparse block this adapter replaces
    router_config: Callable[[object], RouterConfig]  # hf config -> router settings
    build: Callable[[nn.Module, RouterConfig, object], MoELayer]


def _hidden(config) -> int:
    return getattr(config, "hidden_size", None) or config.d_model


def _act(block_experts: nn.Module, config):
    name = getattr(config, "hidden_act", None) or getattr(config, "dense_act_fn", "silu")
    return activation(name)


def _adopt_router(block_gate: nn.Module, rc: RouterConfig, config) -> nn.Module:
    router = rc.build(_hidden(config))
    router.weight = block_gate.weight  # the very same Parameter: no copy, same checkpoint key
    if hasattr(block_gate, "e_score_correction_bias"):
        router.e_score_correction_bias = block_gate.e_score_correction_bias
    return router


def _topk_layer(block, rc, config) -> MoELayer:
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    name = "shared_expert" if hasattr(block, "shared_expert") else "shared_experts"
    return MoELayer(
        _adopt_router(block.gate, rc, config),
        block.experts,
        act=_act(block.experts, config),
        router_name="gate",
        shared_expert=shared,
        shared_expert_name=name,
        shared_expert_gate=getattr(block, "shared_expert_gate", None),
    )


class _SwitchClassifierRouter(SwitchRouter):
    """Switch routing over transformers' ``router.classifier`` Linear (kept, so keys stay
    ``router.classifier.weight``); always projects in float32 as Switch's selective precision."""

    def __init__(self, hidden_size, config, classifier: nn.Linear):
        super().__init__(hidden_size, config)
        del self.weight
        self.classifier = classifier

    def project(self, x_TD):
        bias = None if self.classifier.bias is None else self.classifier.bias.float()
        return F.linear(x_TD.float(), self.classifier.weight.float(), bias)


def _switch_layer(block, rc, config) -> MoELayer:
    router = _SwitchClassifierRouter(_hidden(config), rc, block.router.classifier)
    return MoELayer(
        router,
        block.experts,
        act=_act(block.experts, config),
        router_name="router",
        expert_dropout=config.dropout_rate,
    )


def _mixtral_rc(c) -> RouterConfig:
    return RouterConfig(
        kind="topk",
        num_experts=c.num_local_experts,
        top_k=c.num_experts_per_tok,
        norm_topk_prob=True,
        aux_loss_coef=c.router_aux_loss_coef,
        jitter_noise=c.router_jitter_noise,
    )


def _olmoe_rc(c) -> RouterConfig:  # also Qwen2-MoE: same router, norm_topk_prob from config
    return RouterConfig(
        kind="topk",
        num_experts=c.num_experts,
        top_k=c.num_experts_per_tok,
        norm_topk_prob=c.norm_topk_prob,
        aux_loss_coef=c.router_aux_loss_coef,
    )


def _deepseek_rc(c) -> RouterConfig:
    return RouterConfig(
        kind="sigmoid_grouped",
        num_experts=c.n_routed_experts,
        top_k=c.num_experts_per_tok,
        norm_topk_prob=c.norm_topk_prob,
        aux_loss_coef=0.0,  # DeepSeek-V3 balances with the bias, not a loss
        n_group=c.n_group,
        topk_group=c.topk_group,
        routed_scaling_factor=c.routed_scaling_factor,
        bias_update_rate=0.001,  # gamma of DeepSeek-V3, sec. 4.2
    )


def _switch_rc(c) -> RouterConfig:
    return RouterConfig(
        kind="switch",
        num_experts=c.num_experts,
        top_k=1,
        norm_topk_prob=False,
        aux_loss_coef=c.router_aux_loss_coef,
        z_loss_coef=c.router_z_loss_coef,
        jitter_noise=c.router_jitter_noise,
        fp32=True,
        expert_capacity=c.expert_capacity,
    )


ADAPTERS: dict[str, Adapter] = {
    "mixtral": Adapter("MixtralSparseMoeBlock", _mixtral_rc, _topk_layer),
    "olmoe": Adapter("OlmoeSparseMoeBlock", _olmoe_rc, _topk_layer),
    "qwen2_moe": Adapter("Qwen2MoeSparseMoeBlock", _olmoe_rc, _topk_layer),
    "deepseek_v3": Adapter("DeepseekV3MoE", _deepseek_rc, _topk_layer),
    "switch_transformers": Adapter("SwitchTransformersSparseMLP", _switch_rc, _switch_layer),
}


def router_config(config, **router_overrides) -> RouterConfig:
    """The RouterConfig every MoE layer of a model with this transformers ``config`` gets: the
    architecture's own settings, then ``router_overrides`` (checked: unknown keys, ranges)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ConfigError(f"no MoE adapter for model_type={model_type!r}; supported: {sorted(ADAPTERS)}")
    unknown = set(router_overrides) - set(RouterConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown router settings {sorted(unknown)}; valid: {sorted(RouterConfig.__dataclass_fields__)}")
    return replace(ADAPTERS[model_type].router_config(config), **router_overrides)


def patch(model: nn.Module, **router_overrides) -> nn.Module:
    """Install engine MoE layers into a stock transformers MoE model, in place; returns the model.

    The patched model computes the same function with the same weights. ``router_overrides``
    replace router settings for every layer (e.g. ``aux_loss_coef=0.0``, ``kind="expert_choice"``,
    ``z_loss_coef=1e-3``). The router losses are then the engine's (attached to the layer outputs),
    so transformers' own ``output_router_logits`` loss is switched off to avoid counting them twice.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"no MoE adapter for model_type={model_type!r}; supported: {sorted(ADAPTERS)}")
    adapter = ADAPTERS[model_type]
    unknown = set(router_overrides) - set(RouterConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown router settings {sorted(unknown)}; valid: {sorted(RouterConfig.__dataclass_fields__)}")
    if "kind" in router_overrides and router_overrides["kind"] not in ROUTERS:
        raise ValueError(f"router kind {router_overrides['kind']!r} is not registered; known: {sorted(ROUTERS)}")
    targets = [(n, m) for n, m in model.named_modules() if type(m).__name__ == adapter.block_class]
    layers = []
    for name, block in targets:
        rc = replace(adapter.router_config(config), **router_overrides)
        layer = adapter.build(block, rc, config)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers.append(layer)
    for layer in moe_layers(model):
        layer.moe_router.loss_scale = 1.0 / max(len(layers), 1)
    if hasattr(config, "output_router_logits"):
        config.output_router_logits = False
    return model


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]
