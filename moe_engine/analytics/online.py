"""Online router monitoring during training: accumulate on device, reduce across ranks, log scalars.

    monitor = RouterMonitor(model, MonitorConfig(imbalance_alert=2.0))
    with monitor:                       # or monitor.attach() / monitor.detach()
        for step, batch in enumerate(loader):
            loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
            if step % 50 == 0:
                mlflow.log_metrics(monitor.compute(), step=step)   # {"router/layer0/load_imbalance": ...}

The routing hook adds ~25 small device-side kernels per layer (no host sync, no Python numbers from
tensors), so it costs a few small kernels per step. :meth:`RouterMonitor.compute` is the one sync
point: it all-reduces the sums (SUM) and the worst-step imbalance (MAX) when torch.distributed is
initialised, derives each metric from the global totals (a ratio of global sums, not a mean of
per-rank ratios), raises alerts and resets the window. Shape legend in ``metrics.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from moe_engine.analytics import metrics as M
from moe_engine.config import Config

log = logging.getLogger(__name__)

# Layout of a layer's SUM accumulator after its E expert counts (all reduced with SUM across ranks).
# The first _N_MEASURED slots come from tensors each forward, the rest are per-forward constants.
_SLOTS = (
    "entropy", "top1_prob", "top1_margin", "z_loss", "balance_loss", "aux_loss", "dropped", "tokens", "assignments", "steps"
)
_S = {name: i for i, name in enumerate(_SLOTS)}
_N_MEASURED = _SLOTS.index("tokens")


@dataclass
class MonitorConfig(Config):
    """Router monitoring settings; fields equal the keys of a params.yaml ``router_monitor:`` section."""

    imbalance_alert: float = 2.0  # alert when a layer's max/mean tokens per expert exceeds this
    dead_fraction_alert: float = 0.0  # alert when the share of experts with no token exceeds this
    per_expert: bool = False  # also emit router/layer{i}/expert{e}/load_share (E scalars per layer)
    training_only: bool = True  # ignore forwards of layers in eval mode (validation passes)
    prefix: str = "router"

    def check(self) -> None:
        self.require(self.imbalance_alert >= 1.0, "imbalance_alert", ">= 1 (max/mean load of a perfectly balanced layer)")
        self.require(0.0 <= self.dead_fraction_alert <= 1.0, "dead_fraction_alert", "in [0, 1]")

    def build(self, model: nn.Module) -> "RouterMonitor":
        return RouterMonitor(model, self)


@dataclass
class Alert:
    layer: str
    metric: str
    value: float
    threshold: float

    def __str__(self) -> str:
        return f"router alert: {self.layer} {self.metric} = {self.value:.3f} exceeds {self.threshold:g}"


class RouterMonitor:
    """Accumulates per-layer routing statistics over a logging window; see the module docstring."""

    def __init__(self, model: nn.Module, config: MonitorConfig | None = None):
        from moe_engine.models.adapters import moe_layers

        self.config = config or MonitorConfig()
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("model has no engine MoE layers; build it with me.build_model or me.patch")
        names = {id(m): n for n, m in model.named_modules()}
        self.names = [names.get(id(m), f"layer{i}") for i, m in enumerate(self.layers)]
        self.last_alerts: list[Alert] = []
        self._index = {id(m): i for i, m in enumerate(self.layers)}
        self._handles: list = []
        self._sums: list[torch.Tensor] = []
        self._scale_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._max_imbalance: list[torch.Tensor] = []
        self.reset()

    # -- collection ------------------------------------------------------------------------------
    def reset(self) -> None:
        self._sums, self._max_imbalance = [], []
        for layer in self.layers:
            device = next(layer.parameters()).device
            # float64: token counts over a long window stay exact (float32 stops at 2**24)
            self._sums.append(torch.zeros(layer.num_experts + len(_SLOTS), dtype=torch.float64, device=device))
            self._max_imbalance.append(torch.zeros((), device=device))

    def attach(self) -> "RouterMonitor":
        if not self._handles:
            self._handles = [layer.register_routing_hook(self._hook) for layer in self.layers]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "RouterMonitor":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @torch.no_grad()
    def _hook(self, layer, routing, counts_E: torch.Tensor) -> None:
        """Adds one forward's statistics to the layer's accumulator in ~25 small kernels: per-token
        values are stacked and summed once, and a cached scale vector turns sums into the slots (the
        metrics of ``metrics.py``: entropy / log E and top-1 prob and margin times T, z loss and balance
        loss per forward). A layer forward is launch-bound at training sizes; this keeps the hook cheap."""
        if self.config.training_only and not layer.training:
            return
        i = self._index[id(layer)]
        num_experts, num_tokens = routing.num_experts, routing.num_tokens
        num_assignments = routing.expert_idx_A.numel()
        counts_E = counts_E.detach().float()
        if routing.monitor_sums is not None:  # the fused router summed them in its pass over the logits
            per_token_4, probs_sum_E = routing.monitor_sums[:4], routing.monitor_sums[4:]
        else:
            probs_TE = routing.probs_TE.detach().float()
            if num_experts >= 2:
                top_T2 = probs_TE.topk(2, dim=-1).values
                top1_T, margin_T = top_T2[:, 0], top_T2[:, 0] - top_T2[:, 1]
            else:  # one expert: the margin is the top-1 probability (metrics.router_confidence)
                top1_T = margin_T = probs_TE[:, 0]
            per_token_4 = torch.stack([
                torch.special.entr(probs_TE).sum(-1), top1_T, margin_T,
                routing.logits_TE.detach().float().logsumexp(-1).square(),
            ], dim=1).sum(0)
            probs_sum_E = probs_TE.sum(0)
        aux = layer.last_aux_loss  # the layer summed its aux losses just before calling the hooks
        aux_1 = aux.float().reshape(1) if aux is not None else counts_E.new_zeros(1)
        measured = torch.cat([
            counts_E, per_token_4, torch.dot(counts_E, probs_sum_E).reshape(1), aux_1,
            routing.num_dropped().reshape(1).float(),
        ])
        scale, constants = self._scales(num_experts, num_tokens, num_assignments, measured.device)
        acc = self._sums[i]
        acc[: num_experts + _N_MEASURED].addcmul_(measured, scale)
        acc[num_experts + _N_MEASURED :].add_(constants)
        torch.maximum(self._max_imbalance[i], M.load_imbalance(counts_E), out=self._max_imbalance[i])

    def _scales(self, num_experts: int, num_tokens: int, num_assignments: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (num_experts, num_tokens, num_assignments, device)
        cached = self._scale_cache.get(key)
        if cached is None:
            t = max(num_tokens, 1)
            per_slot = {
                "entropy": 1.0 / math.log(num_experts) if num_experts > 1 else 1.0,  # normalised entropy, times T
                "top1_prob": 1.0, "top1_margin": 1.0,  # times T
                "z_loss": 1.0 / t,  # mean logsumexp^2 (ST-MoE eq. 5)
                "balance_loss": num_experts / t**2,  # E * sum_e (c_e / T) (P_e / T) (Switch eqs. 4-6)
                "aux_loss": 1.0, "dropped": 1.0,
            }
            scale = [1.0] * num_experts + [per_slot[name] for name in _SLOTS[:_N_MEASURED]]
            constants = [float(num_tokens), float(num_assignments), 1.0]  # tokens, assignments, steps
            cached = (torch.tensor(scale, dtype=torch.float64, device=device),
                      torch.tensor(constants, dtype=torch.float64, device=device))
            self._scale_cache[key] = cached
        return cached

    # -- reduction and logging -------------------------------------------------------------------
    def _reduced(self) -> tuple[list[list[float]], list[float]]:
        """Per-layer global sums and worst-step imbalances, as Python floats (the one host sync)."""
        device = self._sums[0].device  # layers may sit on different devices (pipeline stages)
        sums = torch.cat([s.to(device) for s in self._sums])
        maxes = torch.stack([m.to(device) for m in self._max_imbalance])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)  # counts and sums add up
            torch.distributed.all_reduce(maxes, op=torch.distributed.ReduceOp.MAX)  # worst step on any rank
        flat, out, start = sums.tolist(), [], 0
        for s in self._sums:
            out.append(flat[start : start + s.numel()])
            start += s.numel()
        return out, maxes.tolist()

    def compute(self, reset: bool = True) -> dict[str, float]:
        """Flat ``{"router/layer{i}/{metric}": float}`` over the window since the last reset, reduced
        across ranks; an empty dict when no training forward ran. Raises alerts (logged and printed)."""
        sums, maxes = self._reduced()
        if reset:
            self.reset()
        p, out, per_layer = self.config.prefix, {}, []
        for i, (layer_sums, worst) in enumerate(zip(sums, maxes)):
            num_experts = len(layer_sums) - len(_SLOTS)
            counts_E, s = torch.tensor(layer_sums[:num_experts]), layer_sums[num_experts:]
            if s[_S["steps"]] == 0:
                continue
            tokens, steps = s[_S["tokens"]], s[_S["steps"]]
            m = {
                "tokens": tokens,
                "load_imbalance": M.load_imbalance(counts_E).item(),
                "load_imbalance_step_max": worst,
                "load_cv": M.load_cv(counts_E).item(),
                "dead_expert_fraction": M.dead_expert_fraction(counts_E).item(),
                "load_diversity": M.load_diversity(counts_E).item(),
                "drop_rate": s[_S["dropped"]] / max(s[_S["assignments"]], 1.0),
                "routing_entropy": s[_S["entropy"]] / tokens,  # normalised by log E
                "top1_prob": s[_S["top1_prob"]] / tokens,
                "top1_margin": s[_S["top1_margin"]] / tokens,
                "balance_loss": s[_S["balance_loss"]] / steps,  # unscaled, per step
                "z_loss": s[_S["z_loss"]] / steps,
                "aux_loss": s[_S["aux_loss"]] / steps,  # what the router added to the loss (scaled)
            }
            if self.config.per_expert:
                for e, share in enumerate(M.load_share(counts_E).tolist()):
                    m[f"expert{e}/load_share"] = share
            out.update({f"{p}/layer{i}/{k}": float(v) for k, v in m.items()})
            per_layer.append((f"layer{i} ({self.names[i]})", m))
        if per_layer:
            for key in ("load_imbalance", "dead_expert_fraction", "routing_entropy", "drop_rate", "balance_loss"):
                values = [m[key] for _, m in per_layer]
                out[f"{p}/mean/{key}"] = sum(values) / len(values)
                out[f"{p}/max/{key}"] = max(values)
        self.last_alerts = self._alerts(per_layer)
        return out

    def _alerts(self, per_layer) -> list[Alert]:
        cfg, alerts = self.config, []
        for name, m in per_layer:
            if math.isfinite(cfg.imbalance_alert) and m["load_imbalance"] > cfg.imbalance_alert:
                alerts.append(Alert(name, "load_imbalance", m["load_imbalance"], cfg.imbalance_alert))
            if m["dead_expert_fraction"] > cfg.dead_fraction_alert:
                alerts.append(Alert(name, "dead_expert_fraction", m["dead_expert_fraction"], cfg.dead_fraction_alert))
        rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
        for alert in alerts if rank0 else []:  # every rank holds the same reduced values: report once
            log.warning("%s", alert)
            print(alert, flush=True)
        return alerts
