"""The saved format of a quantized checkpoint, and loading it back.

A quantized model directory is a Hugging Face directory written by ``models.io.save_model``:
``config.json`` with a ``quantization_config`` entry (transformers' convention), ``model.safetensors``
and the tokenizer files. ``quantization_config``::

    {"quant_method": "moe_lab", "format_version": 1,
     "bits": 4, "group_size": 32, "symmetric": false, "scale_dtype": "float16",
     "targets": {"experts": true, "attention": false, "dense": false},
     "modules": {"model.layers.0.mlp.experts": "experts", "model.layers.0.self_attn.q_proj": "linear", ...}}

Every quantized weight ``NAME`` (``model.layers.0.mlp.experts.gate_up_proj``,
``model.layers.0.self_attn.q_proj.weight``) is stored as ``NAME.qweight``, ``NAME.scales`` and, for
4 bits, ``NAME.zeros``; their layout is in ``moe_engine/quantize/tensor.py``. Everything else keeps
its stock key and dtype.

No transformers quantizer reads fused 3-D expert weights in this form, so stock
``from_pretrained`` cannot load it (it warns "Unknown quantization type" and leaves the experts
uninitialised): load it with ``moe_engine.load`` (``me.load``), or write a plain checkpoint with
``moe_engine.quantize.format.dequantize_checkpoint``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_engine.errors import InputError
from moe_engine.quantize.modules import Plan, dequantized_state_dict, install

QUANT_METHOD = "moe_lab"
FORMAT_VERSION = 1


def quantization_config(bits: int, group_size: int, spec: Plan, attention: bool, dense: bool) -> dict[str, Any]:
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": bits,
        "group_size": group_size if bits == 4 else None,  # int8: one scale per output row
        "symmetric": bits == 8,
        "scale_dtype": "float16",
        "targets": {"experts": True, "attention": attention, "dense": dense},
        "modules": dict(spec.modules),
    }


def quantization_of(config) -> dict[str, Any] | None:
    """The engine's quantization_config of a transformers config, or None when not quantized by it."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return qc if qc.get("quant_method") == QUANT_METHOD else None


def _no_init():
    try:  # transformers >= 5.x keeps it here; skips the random init of weights we overwrite anyway
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def stock_model(config, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A stock transformers model (no engine layers) of ``config`` minus its quantization_config,
    optionally with ``state_dict`` loaded (tied copies may be missing)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with _no_init():
        model = cls.from_config(config, dtype=dtype)
    if state_dict is not None:
        load_state(model, state_dict, "the dequantised weights")
    return model.eval()


def load_quantized(path: str | Path, config=None, router: dict | None = None) -> nn.Module:
    """A quantized checkpoint as an engine-patched model (the hook of ``moe_engine.models.build.load``)."""
    from transformers import AutoConfig, GenerationConfig

    from moe_engine.models.adapters import patch
    from moe_engine.models.io import WEIGHTS, read_safetensors

    path = Path(path)
    config = config if config is not None else AutoConfig.from_pretrained(path)
    qc = quantization_of(config)
    if qc is None:
        raise InputError(f"{path / 'config.json'} has no moe_lab quantization_config")
    if qc.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path} holds quantization format {qc.get('format_version')}; this version reads {FORMAT_VERSION}")
    model = stock_model(config)
    model.config.quantization_config = qc
    if (path / "generation_config.json").is_file() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(path)
    patch(model, **(router or {}))
    install(model, Plan(dict(qc["modules"])), qc["bits"], qc["group_size"] or 0, empty=True)
    load_state(model, read_safetensors(path / WEIGHTS), str(path / WEIGHTS))
    return model.eval()


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict`` that accepts only the tied copies ``save_model`` leaves out as missing."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):  # the tied copies (embeddings, LM head) point at the loaded tensor again
        model.tie_weights()
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise InputError(f"{where} does not match the model of its config.json: "
                         f"missing {untied[:5]}, unexpected {unexpected[:5]}; re-create it with `moe-lab quantize`")


def dequantize_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write the quantized checkpoint at ``path`` as a plain one stock transformers loads (same
    numbers as the quantized model computes with, in the original dtype)."""
    from moe_engine.models.io import save_model

    qmodel = load_quantized(path)
    plain = stock_model(qmodel.config, dequantized_state_dict(qmodel))
    tokenizer = _tokenizer(path)
    return save_model(plain, out, tokenizer=tokenizer)


def _tokenizer(model_dir: Path):
    """The tokenizer saved beside a model, or None (save_model copies a tokenizer object, not a folder
    that also holds weights)."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
