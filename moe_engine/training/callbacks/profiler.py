"""torch.profiler over optimizer steps [first, last] (1-based): writes ``ops_rank{r}.txt`` (operators
by device time, then by CPU time) and a Chrome/Perfetto trace ``trace_rank{r}.json.gz``."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch

from moe_engine.training.loop import Callback


class Profiler(Callback):
    name = "profiler"

    def __init__(self, steps: list[int], out: Path):
        self.first, self.last = steps if steps else (0, -1)
        self.out = Path(out)
        self.prof = None

    def pre_step(self, loop):
        if loop.step + 1 == self.first:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if loop.device.type == "cuda" else [])
            self.prof = profile(activities=activities)
            self.prof.__enter__()

    def post_step(self, loop):
        if self.prof is not None and loop.step == self.last:
            self.write(loop)

    def close(self, loop, error):
        if self.prof is not None:
            self.write(loop)

    def write(self, loop):
        if loop.device.type == "cuda":
            torch.cuda.synchronize()
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        table = prof.key_averages()
        by_device = "device_time_total" if loop.device.type == "cuda" else "self_cpu_time_total"
        text = (f"optimizer steps {self.first}..{self.last}, rank {loop.rank}\n\n"
                + table.table(sort_by=by_device, row_limit=60) + "\n\n" + table.table(sort_by="cpu_time_total", row_limit=40))
        (self.out / f"ops_rank{loop.rank}.txt").write_text(text)
        raw = self.out / f".trace_rank{loop.rank}.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(self.out / f"trace_rank{loop.rank}.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
