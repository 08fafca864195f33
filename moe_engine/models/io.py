"""The one writer of model checkpoints, and safe reading of weight files.

Every stage that produces a model (pretrain, finetune, quantize) saves it through
:func:`save_model`: a Hugging Face directory (``config.json``, ``model.safetensors``, the tokenizer
files, and any extra files a stage adds, e.g. a quantization config) written beside the target and
renamed into place when complete. Weights are safetensors only, so loading never runs code.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from moe_engine.errors import InputError
from moe_engine.io import atomic_output

WEIGHTS = "model.safetensors"


def without_tied_copies(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One entry per storage: tied weights (embeddings shared with the LM head or between encoder and
    decoder) are saved once under their first name; transformers re-ties them on load."""
    kept, seen = {}, set()
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident not in seen:
            seen.add(ident)
            kept[key] = tensor.contiguous()
    return kept


def save_model(model: torch.nn.Module, out: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None,
               tokenizer: str | Path | object | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (its config and ``state_dict``, default the model's own) as a Hugging Face
    checkpoint at ``out``, atomically. ``tokenizer``: a tokenizer directory to copy, or a tokenizer
    object with ``save_pretrained``. ``extra(tmp_dir)`` may add files before the rename."""
    from safetensors.torch import save_file

    out = Path(out)
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().cpu() for k, v in state.items()}
    with atomic_output(out) as tmp:
        model.config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None and getattr(model, "can_generate", lambda: False)():
            generation.save_pretrained(tmp)
        save_file(without_tied_copies(state), tmp / WEIGHTS, metadata={"format": "pt"})
        if isinstance(tokenizer, (str, Path)):
            if Path(tokenizer).is_dir():
                shutil.copytree(tokenizer, tmp, dirs_exist_ok=True)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return out


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a file that is not one is refused with its name."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # safetensors' own errors: header too large, invalid JSON, truncated...
        raise InputError(f"{path} is not a valid safetensors file ({exc}); re-create it with save_pretrained "
                         "or the stage that wrote it") from None


def check_weight_files(model_dir: str | Path) -> None:
    """Refuse a model directory whose weights would need pickle (``*.bin``/``*.pt`` only), or whose
    safetensors files are unreadable, naming the file, before transformers sees it."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise InputError(f"{model_dir} holds only pickled weights ({', '.join(pickled)}), which can run code when "
                             "loaded; convert them to safetensors (save_pretrained(..., safe_serialization=True))")
        raise InputError(f"{model_dir} has no model.safetensors; pass the folder save_pretrained wrote")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as exc:
            raise InputError(f"{f} is not a valid safetensors file ({exc}); re-create it with save_pretrained "
                             "or the stage that wrote it") from None
