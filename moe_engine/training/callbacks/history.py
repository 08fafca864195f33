"""Per-step loss and lr as CSV (``history.csv``: step, loss, lr, and the cumulative training FLOPs
``train_flops`` so that models of different cost can be compared at equal compute), the format DVC plots
and pandas read.

A run writes its rows to ``history.partial.csv`` beside it (flushed every step: ``tail -f`` it), and
that file becomes ``history.csv`` only when the run ends well, so a failed, diverged or interrupted
run (``--fresh`` included) leaves the last good run's history in place and its own rows in the partial
file. Every checkpoint holds the rows up to its step, so a resume rewrites exactly what that checkpoint
covers, whichever run (or file) they came from."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import torch

from moe_engine.training.loop import Callback

FIELDS = ("step", "loss", "lr", "train_flops")


def partial_path(path: Path) -> Path:
    """Where a run in progress writes the history that becomes ``path`` when it ends well."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


class History(Callback):
    name = "history"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.file = None
        self.rows: list[tuple[float, float, float, float]] = []  # (step, loss, lr, train_flops or nan)
        self.restored: list[tuple[float, float, float, float]] | None = None  # from the checkpoint resumed

    def state_dict(self):
        return {"rows": torch.tensor(self.rows, dtype=torch.float64).reshape(-1, len(FIELDS))}

    def load_state_dict(self, state):
        self.restored = [tuple(r) for r in state["rows"].tolist()]

    def _open(self, loop):
        if self.restored is not None:
            kept = [r for r in self.restored if r[0] <= loop.step]
        elif loop.step > 0 and self.path.exists():  # a checkpoint from before the rows were saved in it
            kept = [(r["step"], r["loss"], r["lr"], math.nan if r["train_flops"] is None else r["train_flops"])
                    for r in read_history(self.path) if r["step"] <= loop.step]
        else:
            kept = []
        self.rows = list(kept)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.partial, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(FIELDS)
        for row in kept:
            self._write(row)

    def _write(self, row):
        step, loss, lr, flops = row
        self.writer.writerow([int(step), repr(loss), repr(lr), "" if math.isnan(flops) else repr(flops)])

    def pre_step(self, loop):
        if loop.rank == 0 and self.file is None:
            self._open(loop)

    def post_step(self, loop):
        if self.file is not None:
            flops = getattr(loop, "flops_per_token", None)
            row = (float(loop.step), float(loop.losses[-1]), float(loop.lr),
                   float(flops * loop.tokens_per_step * loop.step) if flops else math.nan)
            self.rows.append(row)
            self._write(row)
            self.file.flush()

    def end(self, loop, result):
        """The run ended well: its history replaces the last one (before MLflow logs it)."""
        if loop.rank != 0:
            return
        if self.file is None:  # no step ran (resumed at the last step): the checkpoint's rows
            self._open(loop)
        self.file.close()
        self.file = None
        os.replace(self.partial, self.path)

    def close(self, loop, error):
        if self.file is not None:  # failed or interrupted: history.csv stays the last good run's
            self.file.close()
            self.file = None


def read_history(path: Path) -> list[dict]:
    """Rows of a history.csv (or history.partial.csv) as dicts of numbers."""
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "lr": float(r["lr"]),
                 "train_flops": float(r["train_flops"]) if r.get("train_flops") else None} for r in csv.DictReader(f)]
