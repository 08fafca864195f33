"""Loading checkpoints: any supported MoE checkpoint directory as an engine-patched model, quantized
ones (written by ``moe-lab quantize``) included. Weights are read from safetensors only."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PreTrainedModel

from moe_engine.models.adapters import patch
from moe_engine.models.build import _model_class


def read_config(path: str | Path, hint: str = "pass the folder save_pretrained wrote"):
    """A local model directory's transformers config; a missing, unreadable or unknown config.json is an
    ``InputError`` naming the file (``hint`` says what to pass instead)."""
    from moe_engine.errors import InputError

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a model directory (no config.json); {hint}")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path / 'config.json'} cannot be read as a transformers config: "
                         f"{str(exc).splitlines()[0][:300]}") from None


def load(path: str | Path, *, router: dict | None = None, **from_pretrained_kwargs) -> PreTrainedModel:
    """``from_pretrained(path)`` of any supported MoE checkpoint (local dir), then ``patch``."""
    from moe_engine.models.io import check_weight_files

    path = Path(path)
    config = read_config(path)
    check_weight_files(path)
    from moe_engine.quantize.format import load_quantized, quantization_of

    if quantization_of(config) is not None:  # written by `moe-lab quantize`: quantized experts behind the seam
        return load_quantized(path, config, router)
    model = _model_class(config).from_pretrained(path, use_safetensors=True, **from_pretrained_kwargs)
    return patch(model, **(router or {}))
