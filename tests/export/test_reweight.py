"""The quantized graphs reuse the float export with the changed weights swapped in (moe_engine/export/reweight.py):
every form the exporter stores a weight in is swapped, and anything it cannot vouch for falls back to an export.
That the quantized graphs compute what the torch quantized model computes is checked end to end in
test_quantized.py and test_fused.py (they go through this path); here, on small hand-made graphs, what it
swaps and what it refuses."""

import copy

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from moe_engine.export.fused import _interleave_rows
from moe_engine.export.graphs import Graph, load_stock
from moe_engine.export.reweight import reweighted


def _graph(path, arrays: dict[str, np.ndarray]) -> Graph:
    """A graph returning each initializer (the shape of an export: weights as initializers)."""
    inits = [numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32), name) for name, a in arrays.items()]
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in arrays]
    outputs = [helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, list(a.shape)) for name, a in arrays.items()]
    model = helper.make_model(helper.make_graph(nodes, "g", [], outputs, inits))
    onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    return Graph(path.stem, path, [], [o.name for o in outputs])


def _weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_changed_weights_are_swapped_in_every_stored_form(tiny_dir, tmp_path):
    stock = load_stock(tiny_dir("mixtral"))
    target = copy.deepcopy(stock)
    with torch.no_grad():
        target.model.layers[0].mlp.experts.gate_up_proj.add_(0.5)
        target.model.layers[0].self_attn.q_proj.weight.mul_(2)
    w, t = _weights(stock), _weights(target)
    up, q = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.self_attn.q_proj.weight"
    embed, norm = "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"
    arrays = {"experts_t": np.swapaxes(w[up], -1, -2), "fc1": _interleave_rows(w[up]), "q_t": w[q].T,
              "embed": w[embed], "norm": w[norm]}
    out = reweighted([_graph(tmp_path / "model.onnx", arrays)], tmp_path / "q", stock, target)
    got = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out[0].path)).graph.initializer}
    assert np.array_equal(got["experts_t"], np.swapaxes(t[up], -1, -2)) and np.array_equal(got["fc1"], _interleave_rows(t[up]))
    assert np.array_equal(got["q_t"], t[q].T)
    assert np.array_equal(got["embed"], w[embed]) and np.array_equal(got["norm"], w[norm])  # unchanged weights kept
    assert out[0].outputs == [f"{name}_out" for name in arrays]

    # refused (the caller exports): a changed weight missing from a graph, a matrix it cannot trace to one weight,
    # another config, a changed 1-D weight
    no_q = {k: v for k, v in arrays.items() if k != "q_t"}
    assert reweighted([_graph(tmp_path / "a.onnx", no_q)], tmp_path / "r1", stock, target) is None
    half = {**arrays, "gate_half": w[up][:, : w[up].shape[1] // 2]}
    assert reweighted([_graph(tmp_path / "b.onnx", half)], tmp_path / "r2", stock, target) is None
    other = copy.deepcopy(target)
    other.config.rope_theta = 1234.0
    assert reweighted([_graph(tmp_path / "c.onnx", arrays)], tmp_path / "r3", stock, other) is None
    with torch.no_grad():
        other = copy.deepcopy(target)
        other.model.layers[0].input_layernorm.weight.add_(1)
    assert reweighted([_graph(tmp_path / "d.onnx", arrays)], tmp_path / "r4", stock, other) is None
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 5))
