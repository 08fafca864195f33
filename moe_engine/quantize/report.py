"""What quantization cost, per expert: relative weight error and output error on calibration tokens.

For each MoE layer the calibration tokens' hidden states are captured at the layer's input; each
expert's MLP is then run on the tokens the (unchanged) router sends it, with the float weights and
with the dequantised ones: ``output_rel = ||y - y_q|| / ||y||`` over those tokens. ``w_in_rel`` /
``w_out_rel`` are ``||W_e - W_q,e||_F / ||W_e||_F`` of its input and output projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moe_engine.moe.experts import expert_weights


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||a|| (0 for an all-zero a equal to b)."""
    den = a.float().norm().item()
    num = (a.float() - b.float()).norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


@dataclass
class LayerCapture:
    """A MoE layer's input and output on the calibration tokens (float model)."""

    hidden_BSD: torch.Tensor
    output_BSD: torch.Tensor


@torch.no_grad()
def capture_moe_layers(model: nn.Module, input_ids: torch.Tensor, forward) -> dict[str, LayerCapture]:
    """Run ``forward(model, input_ids)`` once, keeping every MoE layer's input and output."""
    from moe_engine.models.adapters import moe_layers

    layers = set(moe_layers(model))
    captured: dict[str, LayerCapture] = {}
    handles = []
    for name, module in model.named_modules():
        if module in layers:
            def hook(mod, args, out, name=name):
                captured[name] = LayerCapture(args[0].detach().clone(), out.detach().clone())
            handles.append(module.register_forward_hook(hook))
    try:
        forward(model, input_ids)
    finally:
        for h in handles:
            h.remove()
    return captured


def _mlp(x_TD, w_in_HD, w_out_DF, gated, act):
    h = x_TD @ w_in_HD.t()
    if gated:
        gate, up = h.chunk(2, dim=-1)
        h = act(gate) * up
    else:
        h = act(h)
    return h @ w_out_DF.t()


@torch.no_grad()
def expert_rows(layer_name: str, layer: nn.Module, capture: LayerCapture, w_in_EHD: torch.Tensor,
                w_out_EDF: torch.Tensor, quantized_experts: nn.Module) -> list[dict]:
    """One row per expert of this layer (see the module docstring)."""
    q_in, q_out, gated = expert_weights(quantized_experts)
    hidden = capture.hidden_BSD
    x_TD = hidden.reshape(-1, hidden.shape[-1]).float()
    group = hidden.shape[-2] if (layer.capacity_per_sequence and hidden.dim() == 3) else None
    routing = layer.moe_router(hidden.reshape(-1, hidden.shape[-1]), group_size=group)
    if routing.token_major:
        token_A = torch.arange(routing.expert_idx_A.numel(), device=x_TD.device) // routing.top_k
    else:
        token_A = routing.token_idx_A
    act = layer.act
    rows = []
    for e in range(w_in_EHD.shape[0]):
        tokens = token_A[routing.expert_idx_A == e]
        row = {"layer": layer_name, "expert": e, "tokens": int(tokens.numel()),
               "w_in_rel": rel(w_in_EHD[e], q_in[e]), "w_out_rel": rel(w_out_EDF[e], q_out[e]), "output_rel": None}
        if tokens.numel():
            x = x_TD.index_select(0, tokens)
            y = _mlp(x, w_in_EHD[e].float(), w_out_EDF[e].float(), gated, act)
            y_q = _mlp(x, q_in[e].float(), q_out[e].float(), gated, act)
            row["output_rel"] = rel(y, y_q)
        rows.append(row)
    return rows


@dataclass
class ErrorSummary:
    rows: list[dict] = field(default_factory=list)
    layer_output_rel: dict[str, float] = field(default_factory=dict)
    logits_rel: float | None = None

    def metrics(self) -> dict:
        w = [max(r["w_in_rel"], r["w_out_rel"]) for r in self.rows]
        out = [r["output_rel"] for r in self.rows if r["output_rel"] is not None]
        return {
            "experts": len(self.rows),
            "weight_rel_max": max(w, default=None),
            "weight_rel_mean": sum(w) / len(w) if w else None,
            "output_rel_max": max(out, default=None),
            "output_rel_mean": sum(out) / len(out) if out else None,
            "experts_without_calibration_tokens": sum(r["output_rel"] is None for r in self.rows),
            "layer_output_rel_max": max(self.layer_output_rel.values(), default=None),
            "logits_rel": self.logits_rel,
        }

    def csv(self) -> str:
        lines = ["layer,expert,tokens,w_in_rel,w_out_rel,output_rel"]
        for r in self.rows:
            out = "" if r["output_rel"] is None else f"{r['output_rel']:.6g}"
            lines.append(f"{r['layer']},{r['expert']},{r['tokens']},{r['w_in_rel']:.6g},{r['w_out_rel']:.6g},{out}")
        return "\n".join(lines) + "\n"

    def worst(self, n: int = 5) -> list[dict]:
        return sorted((r for r in self.rows if r["output_rel"] is not None), key=lambda r: -r["output_rel"])[:n]


def layer_output_errors(model: nn.Module, captured: dict[str, LayerCapture]) -> dict[str, float]:
    """Each MoE layer rerun on its captured input with its quantized weights, against its float output."""
    out = {}
    with torch.no_grad():
        for name, cap in captured.items():
            out[name] = rel(cap.output_BSD, model.get_submodule(name)(cap.hidden_BSD))
    return out


def _fmt(x, spec="{:.4g}") -> str:
    return "-" if x is None else spec.format(x)


def markdown(summary: ErrorSummary, sizes: dict, gate_table: str | None, header: str) -> str:
    m = summary.metrics()
    lines = [f"# {header}", "", "## Size", "", "| | original | quantized | ratio |", "|---|---:|---:|---:|"]
    for key in ("disk", "memory"):
        o, q = sizes[f"{key}_original"], sizes[f"{key}_quantized"]
        lines.append(f"| bytes {'on disk' if key == 'disk' else 'in memory'} | {o:,} | {q:,} | {q / o:.3f} |")
    lines += ["", "## Quality", ""]
    lines.append(gate_table if gate_table else "quality gate not run (no --data, or gate.enabled = false)")
    lines += ["", "## Errors on calibration tokens", "",
              f"- experts: {m['experts']}; weight rel. error max {_fmt(m['weight_rel_max'])}, mean {_fmt(m['weight_rel_mean'])}",
              f"- expert output rel. error max {_fmt(m['output_rel_max'])}, mean {_fmt(m['output_rel_mean'])}"
              f" ({m['experts_without_calibration_tokens']} experts got no calibration token)",
              f"- MoE layer output rel. error max {_fmt(m['layer_output_rel_max'])}; logits rel. error {_fmt(m['logits_rel'])}",
              "", "Worst experts by output error:", "", "| layer | expert | tokens | w_in | w_out | output |", "|---|---:|---:|---:|---:|---:|"]
    for r in summary.worst():
        lines.append(f"| {r['layer']} | {r['expert']} | {r['tokens']} | {r['w_in_rel']:.4g} | {r['w_out_rel']:.4g} | {r['output_rel']:.4g} |")
    return "\n".join(lines) + "\n"
