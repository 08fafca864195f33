"""Stop a run the moment its loss or gradient norm stops being finite, before the bad step's weights
reach a checkpoint or an export; the last good checkpoint stays ``latest``."""

from __future__ import annotations

import math

from moe_engine.errors import UserError
from moe_engine.training import checkpoint
from moe_engine.training.loop import Callback


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN or infinite."""


class StopOnDivergence(Callback):
    name = "divergence"

    def on_loss(self, loop, step, loss):
        if not math.isfinite(loss):
            self.stop(loop, f"loss became {loss} at step {step}; stopped before the optimizer applied it")

    def on_grad_norm(self, loop, step, norm):
        # bf16 runs skip DeepSpeed's per-parameter overflow scan; its global norm, computed for clipping
        # anyway, is checked here instead (DeepSpeed reports an overflow as -1): one step late, but before
        # any checkpoint or export sees the weights
        if math.isfinite(norm) and norm >= 0:
            return
        shown = "nan/inf" if norm == -1 else norm
        self.stop(loop, f"the gradient norm became {shown} at step {step} while the loss was finite; its weights were not saved")

    def stop(self, loop, what: str) -> None:
        root = loop.out_dir / "checkpoints"
        last = checkpoint.latest(root) if root.exists() else None
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(f"{what} ({where}). Try a lower lr, more warmup, grad_clip, or router z_loss_coef.")
