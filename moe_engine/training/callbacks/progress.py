"""Progress on rank 0: a tqdm bar on a terminal; without one (DVC, Prefect, CI logs) one plain line
every ``log_every`` steps, e.g. ``pretrain step 40/300  loss 5.812  lr 2.9e-03  12,345 tokens/s  imbalance 1.21``."""

from __future__ import annotations

import sys

from moe_engine.training.loop import Callback


class Progress(Callback):
    name = "progress"

    def __init__(self, desc: str = "train", tty: bool | None = None):
        self.desc = desc
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None

    def setup(self, loop):
        if loop.rank == 0 and self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=loop.config.steps, desc=self.desc, unit="step", dynamic_ncols=True)

    def pre_step(self, loop):
        if self.bar is not None and self.bar.n < loop.step:
            self.bar.update(loop.step - self.bar.n)

    def post_step(self, loop):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loop.losses[-1]:.3f}", refresh=False)

    def on_log(self, loop, metrics):
        if loop.rank != 0 or self.bar is not None or "train/loss" not in metrics:
            return
        imbalance = [v for k, v in metrics.items() if k.endswith("/load_imbalance")]
        line = (f"{self.desc} step {loop.step}/{loop.config.steps}  loss {metrics['train/loss']:.3f}  "
                f"lr {metrics['train/lr']:.2e}  {metrics['train/tokens_per_s']:,.0f} tokens/s")
        if imbalance:
            line += f"  imbalance {max(imbalance):.2f}"
        print(line, flush=True)

    def close(self, loop, error):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
