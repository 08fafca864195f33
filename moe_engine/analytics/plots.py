"""PNG plots of the analytics tables. matplotlib is imported inside each function and used through
``matplotlib.figure.Figure`` with the Agg canvas, never pyplot, so plotting changes no global backend
state and works headless. Each function takes a validated table and a path and returns the path.

Units, as in the HTML report: shares are drawn in % (cells and colourbars alike), the relative load
as a multiple of the fair share; expert and layer axes carry integer ticks only."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def keep_cache_in(folder: str | Path) -> None:
    """matplotlib writes its font cache to ``$MPLCONFIGDIR``, by default under ``$HOME``. Unless the
    user chose a folder (or matplotlib is already imported), point it at ``folder`` (the output's
    ``.cache/matplotlib``), so that plotting writes nowhere but beside the outputs."""
    if os.environ.get("MPLCONFIGDIR") or "matplotlib" in sys.modules:
        return
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["MPLCONFIGDIR"] = str(folder)


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


def _integer_ticks(ax, x: bool = True, y: bool = True) -> None:
    """Ticks at whole experts / layers only (imshow puts cell n at n); at most ~12 per axis."""
    from matplotlib.ticker import MaxNLocator

    if x:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True, min_n_ticks=1))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=12, integer=True, min_n_ticks=1))


def _percent_colorbar(fig, im, axes, label: str):
    from matplotlib.ticker import PercentFormatter

    return fig.colorbar(im, ax=list(axes), label=label, format=PercentFormatter(decimals=0))


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
        ax.set(title=str(name), xlabel="expert", ylabel="layer", yticks=range(grid_LE.shape[0]))
        ax.set_yticklabels(grid_LE.index)
        _integer_ticks(ax, y=False)
    fig.colorbar(im, ax=list(axes), label="load / fair share (1 = balanced)")
    fig.suptitle("Expert load per layer across checkpoints")
    return _save(fig, path)


def coactivation_heatmaps(coact: pd.DataFrame, path: Path) -> Path:
    """Per layer, row i / column j: % of expert i's tokens that expert j also processed (OLMoE)."""
    layers = sorted(coact["layer"].unique())
    size = max(3.6, 0.25 * coact["expert"].nunique() + 1.2)
    fig, axes = _figure(len(layers), size, size - 0.3)
    vmax = max(100 * float(coact["coactivation"].max()), 1e-4)
    for ax, layer in zip(axes, layers):
        rows = coact[coact["layer"] == layer]
        num_experts = int(max(rows["expert"].max(), rows["other"].max())) + 1
        grid_EE = 100 * rows.pivot(index="expert", columns="other", values="coactivation")
        grid_EE = grid_EE.reindex(index=range(num_experts), columns=range(num_experts))  # diagonal: NaN, drawn blank
        im = ax.imshow(grid_EE.to_numpy(), cmap="viridis", vmin=0.0, vmax=vmax)
        _annotate(ax, im, grid_EE.to_numpy(), ".0f", limit=100)
        ax.set(title=f"layer {layer}", xlabel="co-activated expert j", ylabel="expert i")
        _integer_ticks(ax)
    _percent_colorbar(fig, im, axes, "N(i, j) / N(i): % of expert i's tokens")
    fig.suptitle("Expert co-activation (%)")
    return _save(fig, path)


def specialisation_heatmaps(spec: pd.DataFrame, path: Path, what: str = "domain") -> Path:
    """Per layer, group x expert: % of the group's tokens each expert processed; white is the
    uniform K / E of an unspecialised router, red above, blue below (OLMoE's domain specialisation)."""
    from matplotlib.colors import TwoSlopeNorm

    layers = sorted(spec["layer"].unique())
    uniform = 100 * float(spec["uniform"].iloc[0])
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(min(2 * uniform, 100.0), 100 * float(spec["share"].max()), uniform + 1e-3))
    groups = list(dict.fromkeys(spec["group"]))
    width = max(4.4, 0.3 * spec["expert"].nunique() + 2.5)  # room for the group names
    fig, axes = _figure(len(layers), width, 0.32 * len(groups) + 1.8, max_cols=2)
    for ax, layer in zip(axes, layers):
        grid_NE = 100 * spec[spec["layer"] == layer].pivot(index="group", columns="expert", values="share").reindex(groups)
        im = ax.imshow(grid_NE.to_numpy(), cmap="RdBu_r", norm=norm, aspect="auto")
        _annotate(ax, im, grid_NE.to_numpy(), ".0f")
        ax.set(title=f"layer {layer}", xlabel="expert", yticks=range(len(groups)))
        ax.set_yticklabels(groups)
        _integer_ticks(ax, y=False)
    _percent_colorbar(fig, im, axes, f"% of the {what}'s tokens")
    fig.suptitle(f"Expert specialisation by {what} (% of its tokens; white = uniform K / E = {uniform:.0f}%)")
    return _save(fig, path)


def saturation_curve(sat: pd.DataFrame, path: Path, baseline: float | None = None) -> Path:
    """Router saturation (%) of each checkpoint against the last one, per layer and averaged, over the
    training step (OLMoE). ``baseline``: the chance level K / E as a fraction (default: the table's)."""
    from matplotlib.ticker import PercentFormatter

    fig, (ax,) = _figure(1, 6.5, 3.8)
    x = "step" if "step" in sat else "index"
    for layer, rows in sat.groupby("layer"):
        ax.plot(rows[x], 100 * rows["saturation"], marker="o", alpha=0.6, label=f"layer {layer}")
    mean = sat.groupby(x)["saturation"].mean()
    ax.plot(mean.index, 100 * mean.to_numpy(), color="black", linewidth=2.5, label="mean")
    if baseline is None and "chance" in sat:
        baseline = float(sat["chance"].mean())
    if baseline is not None:
        ax.axhline(100 * baseline, color="grey", linestyle="--", label=f"chance (K / E = {baseline:.0%})")
    ax.set(ylim=(0, 102), xlabel="training step" if x == "step" else "checkpoint",
           ylabel="top-k shared with the final router")
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    if x == "index":
        order = sat.drop_duplicates("index").sort_values("index")
        ax.set_xticks(order["index"], order["checkpoint"], rotation=30, ha="right")
    ax.legend(fontsize=7, ncols=2)
    one = sat["checkpoint"].nunique() == 1 if "checkpoint" in sat else len(mean) == 1
    ax.set_title("Router saturation against the final checkpoint"
                 + (" (one checkpoint: compared with itself; give two or more)" if one else ""), fontsize=9 if one else None)
    return _save(fig, path)
