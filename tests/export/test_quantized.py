"""The quantized demo model as ONNX: its own integers behind DequantizeLinear, no expert tensor left in
float, the same numbers as the torch quantized model, and the quantization gate on onnxruntime."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import moe_engine as me
from moe_engine.cli import main
from moe_engine.evaluation.evaluate import sequence_losses
from moe_engine.export.config import ExportConfig
from moe_engine.export.quantized import quantize_graph, quantized_arrays
from moe_engine.export.runtime import OrtLM
from moe_engine.quantize.modules import IncompleteQuantization


@pytest.fixture(scope="module", params=[8, pytest.param(4, marks=pytest.mark.slow)])
def exported(request, demo_model, demo_data, tmp_path_factory):
    bits = request.param
    root = tmp_path_factory.mktemp(f"qexport{bits}")
    assert main(["quantize", "--model", str(demo_model), "--out", str(root / "q"), "--bits", str(bits),
                 "--set", "attention=true", "--set", "gate.enabled=false"]) == 0
    past = [] if bits == 8 else ["--no-past"]  # the generation graphs once is enough (they add ~25 s)
    assert main(["export", "--model", str(demo_model), "--quantized", str(root / "q" / "model"), "--data", str(demo_data),
                 "--out", str(root / "onnx"), "--set", "latency.enabled=false", "--set", "gate.max_sequences=48", *past]) == 0
    return bits, root


def _exact_session(path):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # fp32 MatMulNBits
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_no_expert_tensor_left_in_float(exported):
    bits, root = exported
    for name in ("model", "model_with_past") if bits == 8 else ("model",):
        graph = onnx.load(str(root / "onnx" / "quantized" / f"{name}.onnx")).graph
        inits = {i.name: i for i in graph.initializer}
        dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
        ints = [inits[n.input[0]] for n in dq]
        want = onnx.TensorProto.INT8 if bits == 8 else onnx.TensorProto.UINT4
        assert all(i.data_type == want for i in ints)
        assert sum(len(i.dims) == 3 for i in ints) == 4  # 2 MoE layers x (gate_up, down)
        assert sum(len(i.dims) == 2 for i in ints) == 8  # q, k, v, o of 2 layers (attention=true)
        scales = {x for n in dq for x in n.input[1:]}
        left = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 3
                and i.name not in scales]
        assert not left
    m = json.loads((root / "onnx" / "metrics.json").read_text())["quantized"]
    assert m["bits"] == bits and m["replaced"]["model"] == {"experts": 4, "linear": 8}
    assert m["bytes_ratio"]["model"] < 1


def test_onnx_computes_what_the_torch_quantized_model_computes(exported):
    bits, root = exported
    qmodel = me.load(root / "q" / "model")
    sess = _exact_session(root / "onnx" / "quantized" / "model.onnx")
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, qmodel.config.vocab_size, (3, 21), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = qmodel(input_ids=ids, attention_mask=mask).logits.numpy()
    (logits,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert np.abs(logits - ref).max() / np.abs(ref).max() <= 1e-4


def test_gate_on_onnxruntime_passes_and_onnx_perplexity_is_the_torch_one(exported, demo_model, demo_data):
    bits, root = exported
    gate = json.loads((root / "onnx" / "metrics.json").read_text())["quantized"]["gate"]
    limit = 0.005 if bits == 8 else 0.03
    assert gate["passed"] and gate["val"]["increase"] <= limit and gate["ood"]["increase"] <= limit
    # the fp32 graph scores the data exactly as the torch model does (the gate's ONNX side is sound)
    stock = me.load(demo_model).eval()
    onnx_lm = OrtLM(root / "onnx" / "model.onnx", stock.config)
    a = sequence_losses(stock, demo_data, "val", batch_size=8, max_sequences=16)
    b = sequence_losses(onnx_lm, demo_data, "val", batch_size=8, max_sequences=16)
    np.testing.assert_allclose(b, a, rtol=1e-5)


def test_a_quantized_weight_missing_from_a_graph_raises(exported, tmp_path):
    bits, root = exported
    src = root / "onnx" / "model.onnx"  # the fp32 graph of the *unquantized* model: none of the integers match
    for f in (src, src.with_name("model.onnx.data")):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    arrays = quantized_arrays(me.load(root / "q" / "model"))
    with pytest.raises(IncompleteQuantization, match="expert"):
        quantize_graph(tmp_path / "model.onnx", arrays)


@pytest.mark.slow
def test_failing_onnx_gate_exits_2(exported, demo_model, demo_data, tmp_path, capsys):
    bits, root = exported
    if bits == 8:
        pytest.skip("one failing configuration is enough")
    code = main(["export", "--model", str(demo_model), "--quantized", str(root / "q" / "model"), "--data", str(demo_data),
                 "--out", str(tmp_path / "o"), "--no-past", "--set", "latency.enabled=false",
                 "--set", "gate.int4_max_ppl_increase=0", "--set", "gate.max_sequences=48"])
    assert code == 2 and "quality gate failed for the int4 ONNX model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_rules():
    with pytest.raises(Exception, match="opset"):
        ExportConfig.from_dict({"opset": 18})
    with pytest.raises(Exception, match="profile_min_shapes"):
        ExportConfig.from_dict({"providers": {"tensorrt": {"profile_min_shapes": "input_ids:1x1"}}})
