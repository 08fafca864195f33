"""Inference: generation (``generate.py``: transformers' generate, static cache + torch.compile, or
the engine's CUDA-graph decode loop), selective expert loading with a device cache and prefetch
(``offload.py``, stores in ``stores.py``), and the ``moe-lab generate`` command (``cli.py``). The
small-batch decode path itself lives in the MoE layer (``moe/decode.py``).

Names resolve lazily: importing this package imports neither transformers nor safetensors.
"""

from importlib import import_module

_EXPORTS = {
    "generate": "moe_engine.inference.generate",
    "GenerationResult": "moe_engine.inference.generate",
    "StaticDecoder": "moe_engine.inference.generate",
    "GenerateConfig": "moe_engine.inference.config",
    "OffloadConfig": "moe_engine.inference.config",
    "offload_experts": "moe_engine.inference.offload",
    "offload_stats": "moe_engine.inference.offload",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moe_engine.inference' has no attribute {name!r}")
