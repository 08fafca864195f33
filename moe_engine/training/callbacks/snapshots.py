"""A Hugging Face snapshot every ``every`` steps and at the last step (router analytics over time read
``snapshots/step_*``); the last one is always written, so a short run still has a snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from moe_engine.training.loop import Callback


class Snapshots(Callback):
    name = "snapshots"

    def __init__(self, every: int, root: Path, export: Callable[[object, Path], None]):
        self.every, self.root, self.export = every, Path(root), export

    def post_step(self, loop):
        if self.every and (loop.step % self.every == 0 or loop.step == loop.config.steps):
            loop.flush_pending_norm()
            self.export(loop, self.root / f"step_{loop.step:08d}")
