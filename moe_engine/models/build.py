"""Build or load transformers MoE models with engine layers installed."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig, PreTrainedModel

from moe_engine.models.adapters import patch
from moe_engine.models.presets import canonical_arch, preset_kwargs


def model_config(arch: str, preset: str = "tiny", **overrides) -> PretrainedConfig:
    """The transformers config of ``arch`` at ``preset``, with ``overrides`` applied (any config field)."""
    arch = canonical_arch(arch)
    kwargs = preset_kwargs(arch, preset)
    kwargs.update(overrides)
    known = AutoConfig.for_model(arch)  # transformers accepts any kwarg, so check against the defaults
    unknown = [k for k in overrides if not hasattr(known, k)]
    if unknown:
        from moe_engine.errors import ConfigError

        raise ConfigError(f"{arch} config has no field(s) {unknown}; check the spelling against transformers' {type(known).__name__}")
    config = AutoConfig.for_model(arch, **kwargs)
    _check_attention_shape(config, explicit_head_dim=kwargs.get("head_dim") is not None)
    return config


def _check_attention_shape(config: PretrainedConfig, explicit_head_dim: bool) -> None:
    """Head counts that transformers accepts but that fail in the first forward (a shape error deep in
    attention or RoPE): refused here as a ConfigError naming the fields."""
    from moe_engine.errors import ConfigError

    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not heads or not hidden or config.is_encoder_decoder:  # Switch (T5 layout) sets d_kv itself
        return
    if kv_heads and heads % kv_heads:
        raise ConfigError(f"model.num_attention_heads = {heads} is not a multiple of model.num_key_value_heads = "
                          f"{kv_heads}: grouped-query attention shares each key/value head among whole groups")
    if not explicit_head_dim and hidden % heads:
        raise ConfigError(f"model.hidden_size = {hidden} is not divisible by model.num_attention_heads = {heads}: "
                          "pick a head count that divides it, or set model.head_dim")


def _model_class(config: PretrainedConfig):
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def build_model(
    arch: str,
    preset: str = "tiny",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
    router: dict | None = None,
    **overrides,
) -> PreTrainedModel:
    """A freshly initialised transformers model of ``arch`` with engine MoE layers installed.

    ``preset`` is ``"tiny"`` (a debug size that runs on a CPU in seconds) or a published shape
    (``mixtral-8x7b``, ``olmoe-1b-7b``, ``qwen1.5-moe-a2.7b``, ``deepseek-v3-style``,
    ``switch-base-8``); pass ``device="meta"`` to instantiate large ones without memory.
    ``overrides`` are config fields; ``router`` holds router settings (see ``RouterConfig``).
    """
    config = model_config(arch, preset, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        model = _model_class(config).from_config(config, dtype=dtype)
    return patch(model, **(router or {}))


def __getattr__(name):
    # ``load`` lives in loading.py: building a model from config (pretraining) does not depend on how
    # checkpoints are read (quantized ones included); ``from moe_engine.models.build import load`` still works
    if name == "load":
        from moe_engine.models.loading import load

        return load
    raise AttributeError(f"module 'moe_engine.models.build' has no attribute {name!r}")
