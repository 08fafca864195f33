"""Validation every ``every`` steps during training: ``val/loss`` over time (MLflow, the history),
not only a final point."""

from __future__ import annotations

from moe_engine.training.loop import Callback


class PeriodicEval(Callback):
    name = "periodic_eval"

    def __init__(self, every: int, split: str = "val"):
        self.every, self.split = every, split
        self.points: list[tuple[int, float]] = []

    def post_step(self, loop):
        if not self.every or loop.step % self.every or loop.step == loop.config.steps:
            return  # the final evaluation is the trainer's
        loss = loop.evaluate(self.split)
        if loss is None:
            return
        self.points.append((loop.step, loss))
        for cb in loop.callbacks:
            cb.on_log(loop, {f"{self.split}/loss": loss})

    def state_dict(self):
        return {"points": [list(p) for p in self.points]}

    def load_state_dict(self, state):
        self.points = [tuple(p) for p in state.get("points", [])]
