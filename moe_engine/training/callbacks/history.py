"""Per-step loss and lr as CSV (``history.csv``: step, loss, lr, and the cumulative training FLOPs
``train_flops`` so that models of different cost can be compared at equal compute), the format DVC plots
and pandas read. On resume, rows past the checkpoint's step (written by the interrupted run) are dropped first."""

from __future__ import annotations

import csv
from pathlib import Path

from moe_engine.training.loop import Callback

FIELDS = ("step", "loss", "lr", "train_flops")


class History(Callback):
    name = "history"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = None

    def pre_step(self, loop):
        if loop.rank != 0 or self.file is not None:
            return
        kept = []
        if loop.step > 0 and self.path.exists():  # resumed: keep what the checkpoint covers
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= loop.step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.file, FIELDS)
        self.writer.writeheader()
        self.writer.writerows(kept)

    def post_step(self, loop):
        if self.file is not None:
            flops = getattr(loop, "flops_per_token", None)
            self.writer.writerow({"step": loop.step, "loss": repr(loop.losses[-1]), "lr": repr(loop.lr),
                                  "train_flops": repr(float(flops * loop.tokens_per_step * loop.step)) if flops else ""})
            self.file.flush()

    def close(self, loop, error):
        if self.file is not None:
            self.file.close()
            self.file = None


def read_history(path: Path) -> list[dict]:
    """Rows of a history.csv as dicts of numbers."""
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "lr": float(r["lr"]),
                 "train_flops": float(r["train_flops"]) if r.get("train_flops") else None} for r in csv.DictReader(f)]
