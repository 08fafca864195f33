"""Checkpoints every ``save_every`` steps and at the end; resume from the newest valid one.

Resume rules (documented in the README): the checkpoint's settings must equal this run's except
``LoopConfig.RESUMABLE`` ones. A changed ``lr`` is applied from the resume step on (the schedule's
peak moves); a changed ``steps``/``warmup_steps``/``min_lr_ratio`` recomputes the schedule over the
new total. A corrupt ``latest`` falls back to the newest valid older checkpoint, with a warning.
With ``fresh`` the existing checkpoints are ignored, and removed when this run's first one is complete.
"""

from __future__ import annotations

import shutil
import sys

from moe_engine.training import checkpoint
from moe_engine.training.checkpoint import CheckpointError
from moe_engine.training.loop import Callback


class Checkpointer(Callback):
    name = "checkpointer"

    def __init__(self, every: int, keep: int, fresh: bool = False):
        self.every, self.keep, self.fresh = every, keep, fresh
        self.resumed_from = None
        self.changed: list[str] = []

    @staticmethod
    def root(loop):
        return loop.out_dir / "checkpoints"

    def setup(self, loop):
        found = None if self.fresh else checkpoint.find_resumable(self.root(loop))
        if found is None:
            return
        path, meta = found
        self.changed = checkpoint.check_resumable(meta, loop.settings, type(loop.config).RESUMABLE, path)
        if meta["step"] > loop.config.steps:
            raise CheckpointError(f"{path} is at step {meta['step']} but this run has steps={loop.config.steps}; "
                                  f"use steps >= {meta['step']}, or --fresh to start over")
        state = checkpoint.load(path, rank=loop.rank, world_size=loop.world, ep_rank=loop.ep_rank,
                                ep_size=loop.config.ep_size, module=loop.module, meta=meta)
        _load_optimizer(loop.optimizer, state["optimizer"])
        loop.schedule.load_state_dict(state["scheduler"])
        loop.data.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        loop.load_callback_states(state.get("callbacks", {}))
        loop.step = loop.start = state["step"]
        loop.engine.global_steps = loop.step
        if "lr" in self.changed:
            loop.apply_lr(loop.config.lr)
        self.resumed_from = path
        if loop.rank == 0:
            note = f" (changed: {', '.join(self.changed)})" if self.changed else ""
            print(f"resumed from {path} at step {loop.step}{note}", file=sys.stderr)

    def post_step(self, loop):
        if self.every and (loop.step % self.every == 0 or loop.step == loop.config.steps):
            self.save(loop)

    def save(self, loop):
        loop.flush_pending_norm()  # never save weights a bad step wrote
        root = self.root(loop)
        if self.fresh and loop.rank == 0:  # the old run's checkpoints go once this run has its own
            for old in root.glob("step_*"):
                shutil.rmtree(old, ignore_errors=True)
            (root / checkpoint.LATEST).unlink(missing_ok=True)
        self.fresh = False
        rank_state = {"optimizer": loop.optimizer.state_dict(), "scheduler": loop.schedule.state_dict(),
                      "data": loop.data.state_dict(), "rng": checkpoint.rng_state(), "step": loop.step,
                      "callbacks": loop.callback_states()}
        checkpoint.save(root, loop.step, rank=loop.rank, world_size=loop.world, ep_rank=loop.ep_rank,
                        ep_size=loop.config.ep_size, writes_model=loop.writes_model, module=loop.module,
                        rank_state=rank_state, keep=self.keep, settings=loop.settings)


def _load_optimizer(optimizer, state) -> None:
    import torch

    if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "dp_process_group"):
        optimizer.load_state_dict(state)
        return
    import torch.distributed as dist

    dp_rank = dist.get_rank(group=optimizer.dp_process_group)
    states = [None] * dist.get_world_size(group=optimizer.dp_process_group)
    states[dp_rank] = state
    optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
