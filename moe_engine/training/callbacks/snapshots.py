"""A Hugging Face snapshot every ``every`` steps and at the last step (router analytics over time read
``snapshots/step_*``); the last one is always written, so a short run still has a snapshot.

A run writes its snapshots into ``snapshots.partial/`` beside ``snapshots/``; the folder replaces
``snapshots/`` whole when the run ends well. So a failed or interrupted run, ``--fresh`` included,
leaves the last good run's snapshots as they were (none of a longer old run is left behind among a
new run's), and a resumed run carries on with the snapshots of the run it resumes: the partial
folder's when it was interrupted, the published ones (hard links, no copy) when it had finished. Which
run a folder belongs to is the token in its ``.run`` file, which every checkpoint also records."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from moe_engine.training.loop import Callback

TOKEN = ".run"


def _token(folder: Path) -> str | None:
    try:
        return (folder / TOKEN).read_text().strip()
    except OSError:
        return None


def _step(path: Path) -> int | None:
    tail = path.name.removeprefix("step_")
    return int(tail) if path.name.startswith("step_") and tail.isdigit() else None


def _link_tree(src: Path, dst: Path) -> None:
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:  # another file system, or no hard links: copy
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


class Snapshots(Callback):
    name = "snapshots"

    def __init__(self, every: int, root: Path, export: Callable[[object, Path], None]):
        self.every, self.root, self.export = every, Path(root), export
        self.partial = self.root.with_name(f"{self.root.name}.partial")
        self.run: str | None = None  # the token of the run these snapshots belong to (kept across resumes)
        self.ready = False

    def state_dict(self):
        return {"run": self.run} if self.run else None

    def load_state_dict(self, state):
        self.run = state.get("run")

    def _prepare(self, loop) -> None:
        """Once per process, before the first snapshot: the partial folder holds exactly the snapshots
        of the run being continued up to ``loop.step`` (none for a new run)."""
        self.ready = True
        if loop.rank != 0:
            return
        resumed = loop.start > 0
        if resumed and self.run is not None and _token(self.partial) == self.run:  # interrupted: carry on there
            for old in self.partial.glob("step_*"):
                if (_step(old) or 0) > loop.step:  # written after the checkpoint resumed: this run redoes them
                    shutil.rmtree(old, ignore_errors=True)
            return
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        if resumed and (self.run is None or _token(self.root) in (self.run, None)):  # the finished run's, or older
            for old in sorted(self.root.glob("step_*")):
                if old.is_dir() and (_step(old) or 0) <= loop.step:
                    _link_tree(old, self.partial / old.name)
        self.run = self.run if resumed and self.run else uuid.uuid4().hex
        (self.partial / TOKEN).write_text(self.run + "\n")

    def pre_step(self, loop):
        if self.every and not self.ready:
            self._prepare(loop)

    def post_step(self, loop):
        if self.every and (loop.step % self.every == 0 or loop.step == loop.config.steps):
            loop.flush_pending_norm()
            self.export(loop, self.partial / f"step_{loop.step:08d}")

    def end(self, loop, result):
        """The run ended well: its snapshots replace the last run's, whole."""
        from moe_engine.io import publish

        if not self.every:  # snapshots off: the folder is left as it is
            return
        if not self.ready:
            self._prepare(loop)
        if loop.rank == 0 and self.partial.is_dir():
            publish(self.partial, self.root)
