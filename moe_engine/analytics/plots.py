"""PNG plots of the analytics tables. matplotlib is imported inside each function and used through
``matplotlib.figure.Figure`` with the Agg canvas, never pyplot, so plotting changes no global backend
state and works headless. Each function takes a validated table and a path and returns the path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd


def _figure(panels: int, width: float, height: float, max_cols: int = 4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(panels, max_cols)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _annotate(ax, im, values: np.ndarray, fmt: str, scale: float = 1.0, limit: int = 160) -> None:
    """Write each cell's value (times ``scale``) in black or white, whichever reads on its colour."""
    if values.size > limit:
        return  # too many cells to read; the colour says it
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            red, green, blue, _ = im.cmap(im.norm(v))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(c, r, format(v * scale, fmt), ha="center", va="center", fontsize=7, color="white" if dark else "black")


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def load_heatmap(experts: pd.DataFrame, path: Path) -> Path:
    """Layer x expert relative load (E * share; 1 = fair share), one panel per checkpoint.
    ``experts``: expert tables with a ``checkpoint`` column, in checkpoint order."""
    from matplotlib.colors import TwoSlopeNorm

    names = list(dict.fromkeys(experts["checkpoint"]))
    vmax = max(2.0, float(experts["relative_load"].max()))
    num_layers, num_experts = experts["layer"].nunique(), experts["expert"].nunique()
    fig, axes = _figure(len(names), max(4.2, 0.3 * num_experts + 1.2), max(2.6, 0.3 * num_layers + 1.4), max_cols=2)
    for ax, name in zip(axes, names):
        grid_LE = experts[experts["checkpoint"] == name].pivot(index="layer", columns="expert", values="relative_load")
        im = ax.imshow(grid_LE.to_numpy(), cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax), aspect="auto")
        _annotate(ax, im, grid_LE.to_numpy(), ".1f")
        ax.set(title=str(name), xlabel="expert", ylabel="layer", xticks=range(grid_LE.shape[1]), yticks=range(grid_LE.shape[0]))
        ax.set_yticklabels(grid_LE.index)
    fig.colorbar(im, ax=list(axes), label="E x load share (1 = balanced)")
    fig.suptitle("Expert load per layer across checkpoints")
    return _save(fig, path)


def coactivation_heatmaps(coact: pd.DataFrame, path: Path) -> Path:
    """Per layer, row i / column j: share of expert i's tokens that expert j also processed (OLMoE)."""
    layers = sorted(coact["layer"].unique())
    size = max(3.6, 0.25 * coact["expert"].nunique() + 1.2)
    fig, axes = _figure(len(layers), size, size - 0.3)
    vmax = max(float(coact["coactivation"].max()), 1e-6)
    for ax, layer in zip(axes, layers):
        rows = coact[coact["layer"] == layer]
        num_experts = int(max(rows["expert"].max(), rows["other"].max())) + 1
        grid_EE = rows.pivot(index="expert", columns="other", values="coactivation")
        grid_EE = grid_EE.reindex(index=range(num_experts), columns=range(num_experts))  # diagonal: NaN, drawn blank
        im = ax.imshow(grid_EE.to_numpy(), cmap="viridis", vmin=0.0, vmax=vmax)
        _annotate(ax, im, grid_EE.to_numpy(), ".0f", scale=100, limit=100)
        ax.set(title=f"layer {layer}", xlabel="co-activated expert j", ylabel="expert i")
    fig.colorbar(im, ax=list(axes), label="N(i, j) / N(i)")
    fig.suptitle("Expert co-activation (numbers in %)")
    return _save(fig, path)


def specialisation_heatmaps(spec: pd.DataFrame, path: Path, what: str = "domain") -> Path:
    """Per layer, group x expert: share of the group's tokens each expert processed; white is the
    uniform K / E of an unspecialised router, red above, blue below (OLMoE's domain specialisation)."""
    from matplotlib.colors import TwoSlopeNorm

    layers = sorted(spec["layer"].unique())
    uniform = float(spec["uniform"].iloc[0])
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(2 * uniform, float(spec["share"].max())))
    groups = list(dict.fromkeys(spec["group"]))
    width = max(4.4, 0.3 * spec["expert"].nunique() + 2.5)  # room for the group names
    fig, axes = _figure(len(layers), width, 0.32 * len(groups) + 1.8, max_cols=2)
    for ax, layer in zip(axes, layers):
        grid_NE = spec[spec["layer"] == layer].pivot(index="group", columns="expert", values="share").reindex(groups)
        im = ax.imshow(grid_NE.to_numpy(), cmap="RdBu_r", norm=norm, aspect="auto")
        _annotate(ax, im, grid_NE.to_numpy(), ".0f", scale=100)
        ax.set(title=f"layer {layer}", xlabel="expert", xticks=range(grid_NE.shape[1]), yticks=range(len(groups)))
        ax.set_yticklabels(groups)
    fig.colorbar(im, ax=list(axes), label=f"share of the {what}'s tokens (uniform = {uniform:.3f})")
    fig.suptitle(f"Expert specialisation by {what} (numbers in %)")
    return _save(fig, path)


def saturation_curve(sat: pd.DataFrame, path: Path, baseline: float | None = None) -> Path:
    """Router saturation of each checkpoint against the last one, per layer and averaged (OLMoE)."""
    fig, (ax,) = _figure(1, 6.5, 3.8)
    order = sat.drop_duplicates("index").sort_values("index")
    for layer, rows in sat.groupby("layer"):
        ax.plot(rows["index"], rows["saturation"], marker="o", alpha=0.6, label=f"layer {layer}")
    mean = sat.groupby("index")["saturation"].mean()
    ax.plot(mean.index, mean.to_numpy(), color="black", linewidth=2.5, label="mean")
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label="random (K / E)")
    ax.set(xticks=order["index"], ylim=(0, 1.02), xlabel="checkpoint", ylabel="|top-k ∩ top-k final| / k")
    ax.set_xticklabels(order["checkpoint"], rotation=30, ha="right")
    ax.legend(fontsize=7, ncols=2)
    ax.set_title("Router saturation against the final checkpoint")
    return _save(fig, path)
