"""Router statistics during training: the live monitor (``analytics.online.RouterMonitor``: load,
imbalance, entropy, drops... reduced across ranks at log steps, with alerts) and the tokens each
expert received over the whole run, kept in checkpoints so a resumed run still counts from step 1."""

from __future__ import annotations

import torch

from moe_engine.analytics.online import MonitorConfig, RouterMonitor
from moe_engine.training.loop import Callback


class RouterStats(Callback):
    name = "router_stats"

    def __init__(self, monitor: MonitorConfig | None = None):
        self.monitor_config = monitor or MonitorConfig()
        self.monitor = None
        self.run_counts: dict[str, torch.Tensor] = {}

    def setup(self, loop):
        if loop.is_moe:  # after deepspeed.initialize: the accumulators live where the engine put the model
            self.monitor = RouterMonitor(loop.module, self.monitor_config).attach()

    def post_step(self, loop):
        for name, counts in loop.step_counts.items():
            prev = self.run_counts.get(name)
            if prev is not None and prev.device != counts.device:  # restored from a checkpoint on the CPU
                prev = prev.to(counts.device)
            self.run_counts[name] = counts.detach() if prev is None else prev + counts.detach()

    def add_metrics(self, loop, metrics):
        if self.monitor is not None:  # collective: every rank calls it; alerts are printed and logged on rank 0
            metrics.update(self.monitor.compute())
            metrics["train/aux_loss"] = sum(float(layer.last_aux_loss or 0.0) for layer in loop.layer_names)

    def tokens_per_expert(self) -> dict[str, list[int]]:
        return {n: c.long().tolist() for n, c in self.run_counts.items()}

    def state_dict(self):
        return {"run_counts": {n: c.cpu() for n, c in self.run_counts.items()}}

    def load_state_dict(self, state):
        self.run_counts = dict(state.get("run_counts", {}))

    def close(self, loop, error):
        if self.monitor is not None:
            self.monitor.detach()
            self.monitor = None
