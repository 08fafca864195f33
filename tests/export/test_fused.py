"""The fused-MoE option: onnxruntime's com.microsoft::MoE for the CUDA provider (structure only here:
this machine's onnxruntime has no CUDA provider, and the CPU MoE kernel has no fc3)."""

import onnx
import pytest

from moe_engine.errors import ConfigError
from moe_engine.export.config import ExportConfig
from moe_engine.export.export import run

from .conftest import fast_export


def test_fused_graph_has_one_moe_node_per_layer(tiny_dir, tmp_path):
    result = run(ExportConfig.from_dict(fast_export(fused_moe="cuda", with_past=False)), tiny_dir("mixtral"), tmp_path / "o")
    fused = result.metrics["fused_moe"]
    assert fused["moe_layers"] == 2 and fused["moe_nodes"] == {"model": 2}
    nodes = [n for n in onnx.load(str(tmp_path / "o" / "cuda" / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MoE"]
    assert all(n.domain == "com.microsoft" for n in nodes)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["k"] == 2 and attrs["normalize_routing_weights"] == 1  # Mixtral: top-2, renormalised
    assert result.metrics["parity"]["model"] <= 1e-4  # the portable graph beside it is checked as always


def test_old_onnxruntime_and_switch_are_refused(tiny_dir, tmp_path, monkeypatch):
    import onnxruntime

    with pytest.raises(ConfigError, match="applies to decoder models"):
        run(ExportConfig.from_dict(fast_export(fused_moe="cuda", with_past=False)), tiny_dir("switch"), tmp_path / "s")
    monkeypatch.setattr(onnxruntime, "__version__", "1.27.0")
    with pytest.raises(ConfigError, match="needs onnxruntime >= 1.28"):
        run(ExportConfig.from_dict(fast_export(fused_moe="cuda", with_past=False)), tiny_dir("mixtral"), tmp_path / "m")
