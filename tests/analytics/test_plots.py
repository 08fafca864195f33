"""Plots render from the tables alone, at debug and at published sizes (E=64: no cell labels)."""

import pandas as pd
import pytest

from moe_engine.analytics import plots


@pytest.mark.parametrize("num_experts", [4, 64])
def test_every_plot_renders(tmp_path, num_experts):
    e = list(range(num_experts))
    experts = pd.DataFrame([
        {"checkpoint": c, "layer": layer, "expert": i, "relative_load": 1.0 + (i % 3) / 2}
        for c in ("a", "b") for layer in (0, 1) for i in e
    ])
    coact = pd.DataFrame([{"layer": 0, "expert": i, "other": j, "coactivation": (i + j) / (2 * num_experts)} for i in e for j in e if i != j])
    spec = pd.DataFrame([
        {"layer": 0, "group": g, "expert": i, "share": 0.1 * (i % 4), "uniform": 2 / num_experts} for g in ("code", "verse") for i in e
    ])
    sat = pd.DataFrame({"checkpoint": ["a", "a", "b", "b"], "index": [0, 0, 1, 1], "layer": [0, 1, 0, 1], "saturation": [0.3, 0.4, 1.0, 1.0]})
    paths = [
        plots.load_heatmap(experts, tmp_path / "load.png"),
        plots.coactivation_heatmaps(coact, tmp_path / "co.png"),
        plots.specialisation_heatmaps(spec, tmp_path / "spec.png"),
        plots.saturation_curve(sat, tmp_path / "sat.png", baseline=2 / num_experts),
    ]
    for path in paths:
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5_000
