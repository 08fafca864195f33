"""Per-architecture adapters: turn one transformers sparse block into an engine ``MoELayer`` that
holds the *same* parameter tensors under the *same* names.

An adapter reads the block's config (k, normalisation, scoring, shared experts...) into a
:class:`RouterConfig`, moves the router weight (and DeepSeek-V3's correction bias) into the
engine router, and keeps the experts / shared-expert modules as they are: the engine only reads
their weights. So ``state_dict`` keys do not change and a patched model saves a checkpoint that
stock transformers loads.

A patched model behaves like the stock one where transformers looks (tested against stock models):
``output_router_logits=True`` returns the same per-layer router logits (the engine layer records them
into transformers' collector) and the model's own aux loss is then computed from them; the padding
mask (``attention_mask``) reaches the engine's balance loss; ``init_weights()`` initialises engine
routers as the stock ``_init_weights`` initialises its routers; ``set_experts_implementation`` picks
the engine's own expert path; and ``patch`` of a patched model changes nothing.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.errors import ConfigError
from moe_engine.moe.experts import activation
from moe_engine.moe.layer import MoELayer
from moe_engine.moe.router import Router, RouterConfig, SwitchRouter


@dataclass(frozen=True)
class Adapter:
    block_class: str  # transformers class name of the sparse block this adapter replaces
    router_config: Callable[[object], RouterConfig]  # hf config -> router settings
    build: Callable[[nn.Module, RouterConfig, object], MoELayer]
    init_weights: Callable[[nn.Module, object], None]  # (module, hf config): what the stock _init_weights does for its MoE parts
    attention: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention projection module names (LoRA targets)
    shared_experts: str = "shared_expert"  # module name of the shared expert(s), if the architecture has them


def _init_topk_router(module: nn.Module, config) -> None:
    """Mixtral / OLMoE / Qwen2-MoE / DeepSeek-V3 ``_init_weights`` on their router: normal(0,
    initializer_range) weight; DeepSeek-V3's selection bias zero."""
    from transformers import initialization as init

    if isinstance(module, Router) and not isinstance(module, _SwitchClassifierRouter):
        init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        if isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor):
            init.zeros_(module.e_score_correction_bias)


def _init_switch_layer(module: nn.Module, config) -> None:
    """SwitchTransformers' ``_init_weights`` on its sparse MLP, which the engine layer replaced:
    router classifier normal(0, factor), every expert's wi and wo normal(0, factor / sqrt(d_model))."""
    from transformers import initialization as init

    if isinstance(module, MoELayer):
        factor = config.initializer_factor
        init.normal_(module.moe_router.classifier.weight, mean=0.0, std=factor * 1)
        for idx in range(config.num_experts):
            expert = module.experts[f"expert_{idx}"]
            init.normal_(expert.wi.weight, mean=0.0, std=factor * (config.d_model**-0.5))
            init.normal_(expert.wo.weight, mean=0.0, std=factor * (config.d_model**-0.5))


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
    "mixtral": Adapter("MixtralSparseMoeBlock", _mixtral_rc, _topk_layer, _init_topk_router),
    "olmoe": Adapter("OlmoeSparseMoeBlock", _olmoe_rc, _topk_layer, _init_topk_router),
    "qwen2_moe": Adapter("Qwen2MoeSparseMoeBlock", _olmoe_rc, _topk_layer, _init_topk_router),
    "deepseek_v3": Adapter("DeepseekV3MoE", _deepseek_rc, _topk_layer, _init_topk_router,
                           attention=("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
                           shared_experts="shared_experts"),
    "switch_transformers": Adapter("SwitchTransformersSparseMLP", _switch_rc, _switch_layer, _init_switch_layer,
                                   attention=("q", "k", "v", "o")),
}

# transformers' experts implementations -> the engine layer's expert path (MoELayer.experts_mode)
EXPERTS_MODES = {"grouped_mm": "grouped", "batched_mm": "gathered", "auto": "auto", "engine": "auto"}


def router_config(config, **router_overrides) -> RouterConfig:
    """The RouterConfig every MoE layer of a model with this transformers ``config`` gets: the
    architecture's own settings, then ``router_overrides`` (checked: unknown keys, ranges)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ConfigError(f"no MoE adapter for model_type={model_type!r}; supported: {sorted(ADAPTERS)}")
    unknown = set(router_overrides) - set(RouterConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown router settings {sorted(unknown)}; valid: {sorted(RouterConfig.__dataclass_fields__)}")
    base = ADAPTERS[model_type].router_config(config)
    if router_overrides.get("num_experts", base.num_experts) != base.num_experts:
        raise ConfigError(f"router.num_experts = {router_overrides['num_experts']} differs from the model's "
                          f"{base.num_experts} experts; set the expert count in the model config (e.g. model: "
                          "{num_local_experts: N} for Mixtral, {num_experts: N} for OLMoE), not in router settings")
    return replace(base, **router_overrides)


def patch(model: nn.Module, **router_overrides) -> nn.Module:
    """Install engine MoE layers into a stock transformers MoE model, in place; returns the model.

    The patched model computes the same function with the same weights. ``router_overrides``
    replace router settings for every layer (e.g. ``aux_loss_coef=0.0``, ``kind="expert_choice"``,
    ``z_loss_coef=1e-3``). The router losses are then the engine's (attached to the layer outputs),
    so transformers' own ``output_router_logits`` loss is off by default; asked for explicitly
    (``output_router_logits=True``), transformers computes it from the recorded logits and the engine
    attaches none, so nothing counts twice. Patching a patched model returns it unchanged.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ConfigError(f"no MoE adapter for model_type={model_type!r}; supported: {sorted(ADAPTERS)}")
    adapter = ADAPTERS[model_type]
    router_config(config, **router_overrides)  # checks the overrides once, with a readable message
    targets = [(n, m) for n, m in model.named_modules() if type(m).__name__ == adapter.block_class]
    if not targets and moe_layers(model):  # already patched
        if router_overrides:
            raise ConfigError("this model is already patched; pass router settings to the first patch() "
                              "(or build/load the model again)")
        return model
    for name, block in targets:
        layer = adapter.build(block, router_config(config, **router_overrides), config)
        # children in the stock block's order: init_weights then draws random numbers in the same
        # order as for the stock model (bitwise-equal init), and state_dict keys come in the same order
        order = {child: i for i, child in enumerate(block._modules)}
        layer._modules = dict(sorted(layer._modules.items(), key=lambda kv: order.get(kv[0], len(order))))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    layers = moe_layers(model)
    for layer in layers:
        layer.moe_router.loss_scale = 1.0 / max(len(layers), 1)
    if hasattr(config, "output_router_logits"):
        config.output_router_logits = False
    _install_drop_in_behaviour(model, adapter)
    return model


def _install_drop_in_behaviour(model: nn.Module, adapter: Adapter) -> None:
    """What makes a patched model look stock to transformers: weight init, experts implementation,
    the padding mask for the balance loss, and the router-logits layout."""
    from transformers import PreTrainedModel

    config = model.config
    named = dict(model.named_modules())
    for name, layer in named.items():
        if isinstance(layer, MoELayer):
            layer.router_logits_3d = config.is_encoder_decoder  # Switch records [B, S, E] and concatenates on S
            layer.mask_input = "decoder_attention_mask" if ".decoder." in f".{name}." else "attention_mask"
    for sub in [m for m in model.modules() if isinstance(m, PreTrainedModel)]:
        sub._init_weights = types.MethodType(_engine_init_weights, sub)  # bound: deepcopy rebinds it
    model.set_experts_implementation = types.MethodType(set_experts_mode, model)
    model.get_experts_implementation = types.MethodType(_engine_experts_implementation, model)
    model.register_forward_pre_hook(_share_padding_mask, with_kwargs=True)
    model.register_forward_hook(_clear_padding_mask)


def _engine_init_weights(self, module: nn.Module) -> None:
    """The stock ``_init_weights``, then the adapter's for the engine modules that replaced stock ones."""
    type(self)._init_weights(self, module)
    ADAPTERS[self.config.model_type].init_weights(module, self.config)


def _engine_experts_implementation(self) -> dict[str, str]:
    # "engine", not "grouped_mm": transformers' generate() would otherwise switch every forward to
    # batched_mm (the gathered path) for the whole generation, prompt included; the engine chooses
    # its path by token count itself
    return {"": "engine"}


def set_experts_mode(model: nn.Module, implementation) -> None:
    """``set_experts_implementation`` of a patched model: transformers' names mapped onto the
    engine's expert paths (``grouped_mm`` -> grouped GEMM, ``batched_mm`` -> the gathered-weight
    decode path, ``auto``/``engine`` -> chosen by token count); anything else is refused."""
    if isinstance(implementation, dict):
        implementation = implementation.get("", next(iter(implementation.values()), None))
    if implementation not in EXPERTS_MODES:
        raise ConfigError(f"experts implementation {implementation!r} is not available on an engine-patched model; "
                          f"choose one of {sorted(EXPERTS_MODES)} (the engine runs its own expert kernels), or use "
                          "the stock transformers model for other implementations")
    for layer in moe_layers(model):
        layer.experts_mode = EXPERTS_MODES[implementation]


def _share_padding_mask(model, args, kwargs):
    for layer in moe_layers(model):
        key = getattr(layer, "mask_input", "attention_mask")
        mask = kwargs.get(key)
        if mask is None and key == "attention_mask" and len(args) > 1:  # model(input_ids, attention_mask)
            mask = args[1]
        layer.padding_mask_BS = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _clear_padding_mask(model, args, output):
    for layer in moe_layers(model):
        layer.padding_mask_BS = None


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]
