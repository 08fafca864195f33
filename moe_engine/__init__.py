"""Open MoE Trainer Lab's engine: MoE layers for transformers models, training, analytics.

    import moe_engine as me
    model = me.build_model("mixtral", preset="tiny")   # HF model with engine MoE layers
    model = me.patch(hf_model)                         # same weights, same outputs, engine layers
    trainer = me.Trainer(arch="mixtral", data=prepared_dir)  # the short path (DeepSpeed)
    trainer.fit()
    me.quantize(model, bits=4)                         # int8/int4 experts in place; me.load reads the saved dir
    me.export_onnx("model_dir", "out_dir")             # ONNX graphs checked against stock transformers

Names resolve lazily, so ``import moe_engine`` is cheap and has no side effects.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "build_model": "moe_engine.models.build",
    "model_config": "moe_engine.models.build",
    "load": "moe_engine.models.loading",
    "patch": "moe_engine.models.adapters",
    "moe_layers": "moe_engine.models.adapters",
    "MoELayer": "moe_engine.moe.layer",
    "MoEConfig": "moe_engine.moe.layer",
    "Router": "moe_engine.moe.router",
    "RouterConfig": "moe_engine.moe.router",
    "register_router": "moe_engine.moe.router",
    "Routing": "moe_engine.moe.routing",
    "Trainer": "moe_engine.training.trainer",
    "PretrainConfig": "moe_engine.training.config",
    "finetune": "moe_engine.finetune.run",
    "FinetuneConfig": "moe_engine.finetune.config",
    "generate": "moe_engine.inference.generate",
    "quantize": "moe_engine.quantize.quantize",
    "export_onnx": "moe_engine.export.export",
}

__all__ = sorted(_EXPORTS)


_SUBPACKAGES = {"data", "analytics", "benchmark", "inference", "models", "moe", "training"}  # finetune: the function me.finetune


def __getattr__(name):
    if name in _SUBPACKAGES:
        return import_module(f"moe_engine.{name}")
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moe_engine' has no attribute {name!r}")
