"""Fine-tuning an MoE on (prompt, response) task data: LoRA on attention and fused experts (the
engine applies the adapter inside its grouped expert path), expert-selective fine-tuning (ESFT:
only the experts the task routes to train), and full fine-tuning, all on the shared training loop.

    me.finetune("outputs/pretrain/model", "data/tasks/chatterbot_qa", method="lora", out_dir="outputs/finetune")

``moe-lab finetune --base MODEL_DIR --data DATA --method lora|esft|full --out OUT``.
"""

import sys as _sys
import types as _types


class _Callable(_types.ModuleType):
    """``me.finetune(...)`` calls :func:`moe_engine.finetune.run.finetune`: once this subpackage is
    imported, Python binds the name ``finetune`` on ``moe_engine`` to the module itself, so the module
    is made callable rather than shadowing the function."""

    def __call__(self, *args, **kwargs):
        from moe_engine.finetune.run import finetune

        return finetune(*args, **kwargs)


_sys.modules[__name__].__class__ = _Callable
