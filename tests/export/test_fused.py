"""The fused-MoE option: onnxruntime's com.microsoft::MoE, for the CPU provider (run and checked here)
and the CUDA one (structure only here: this machine's onnxruntime has no CUDA provider)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM

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


def test_cpu_fused_moe_runs_here_and_matches_stock_transformers(tiny_dir, tmp_path):
    src = tiny_dir("olmoe")  # top-8 of 64 would be slow; the tiny OLMoE: 8 experts, top-2, no renormalisation
    result = run(ExportConfig.from_dict(fast_export(fused_moe="cpu")), src, tmp_path / "o")
    fused = result.metrics["fused_moe"]
    assert fused["moe_nodes"] == {"model": 2, "model_with_past": 2} and max(fused["parity"].values()) <= 1e-4
    graph = onnx.load(str(tmp_path / "o" / "cpu" / "model.onnx"), load_external_data=False).graph
    experts_3d = {i.name for i in graph.initializer if len(i.dims) == 3}
    gathered = {x for n in graph.node if n.op_type == "GatherND" for x in n.input}
    assert not experts_3d & gathered  # no batched_mm weight gather is left: the experts live in the MoE nodes
    node = next(n for n in graph.node if n.op_type == "MoE")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["activation_type"] == b"swiglu" and attrs["swiglu_fusion"] == 1 and attrs["normalize_routing_weights"] == 0
    stock = AutoModelForCausalLM.from_pretrained(src).eval()
    sess = ort.InferenceSession(str(tmp_path / "o" / "cpu" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, stock.config.vocab_size, (5, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = stock(input_ids=ids).logits.numpy()
    (logits,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})
    assert np.abs(logits - ref).max() / np.abs(ref).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_as_qmoe_on_cpu(bits, tiny_dir, tmp_path):
    import moe_engine as me
    from moe_engine.cli import main

    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir("mixtral")), "--out", str(q), "--bits", str(bits),
                 "--set", "attention=true", "--set", "gate.enabled=false"]) == 0
    result = run(ExportConfig.from_dict(fast_export(fused_moe="cpu", with_past=False)), tiny_dir("mixtral"), tmp_path / "o",
                 quantized_dir=q / "model")
    fused = result.metrics["quantized"]["fused_moe"]
    assert fused["replaced"]["model"] == {"qmoe_experts": 4, "experts": 0, "linear": 8}
    graph = onnx.load(str(tmp_path / "o" / "quantized" / "cpu" / "model.onnx")).graph
    qmoe = [n for n in graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == 2 and not [n for n in graph.node if n.op_type == "MoE"]
    assert not [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 3
                and not i.name.endswith("_scale")]
    qmodel = me.load(q / "model")
    ids = torch.randint(0, 512, (4, 15), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = qmodel(input_ids=ids).logits.numpy()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(str(tmp_path / "o" / "quantized" / "cpu" / "model.onnx"), options,
                                providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})
    assert np.abs(logits - ref).max() / np.abs(ref).max() <= 1e-4
