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
        raise ValueError(f"{arch} config has no field(s) {unknown}; check the spelling against transformers' {type(known).__name__}")
    return AutoConfig.for_model(arch, **kwargs)


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


def load(path: str | Path, *, router: dict | None = None, **from_pretrained_kwargs) -> PreTrainedModel:
    """``from_pretrained(path)`` of any supported MoE checkpoint (local dir), then ``patch``."""
    from moe_engine.errors import InputError
    from moe_engine.models.io import check_weight_files

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a model directory (no config.json); pass the folder save_pretrained wrote")
    check_weight_files(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path / 'config.json'} cannot be read as a transformers config: {exc}") from None
    from moe_engine.quantize.format import load_quantized, quantization_of

    if quantization_of(config) is not None:  # written by `moe-lab quantize`: quantized experts behind the seam
        return load_quantized(path, config, router)
    model = _model_class(config).from_pretrained(path, use_safetensors=True, **from_pretrained_kwargs)
    return patch(model, **(router or {}))
