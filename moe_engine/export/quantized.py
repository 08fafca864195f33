"""A quantized checkpoint as ONNX: the very integers of ``moe-lab quantize``, dequantised in the graph.

The graphs are exported from a stock transformers model holding the checkpoint's *dequantised*
weights; then every quantized weight's float initializer (found by its exact bytes, as stored or
transposed, since the exporter folds transposes into the weights) is replaced by its integers, scales
and zero points behind a standard ``DequantizeLinear`` (opset 21, blocked along the input width:
int8 per output row, uint4 with uint4 zero points per group). So onnxruntime computes what the
engine's quantized model computes, the file holds 1 or 0.5 bytes per weight, and no expert tensor can
stay in float unnoticed: a quantized weight missing from a graph raises.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from moe_engine.quantize.modules import IncompleteQuantization, QuantizedExpertDict, QuantizedExperts, QuantLinear


@dataclass
class QuantArrays:
    """One quantized weight ``[..., O, I]`` as numpy: integers (unpacked), float32 scales, zero points."""

    name: str
    kind: str  # experts | linear
    ints: np.ndarray  # int8, or uint8 holding 0..15
    scales: np.ndarray  # float32 [..., O, I/G]
    zeros: np.ndarray | None  # uint8 [..., O, I/G] (4 bits)
    bits: int
    group: int

    def dequantized(self) -> np.ndarray:
        *lead, o, i = self.ints.shape
        grouped = self.ints.reshape(*lead, o, i // self.group, self.group).astype(np.float32)
        if self.zeros is not None:
            grouped = grouped - self.zeros.astype(np.float32)[..., None]
        return (grouped * self.scales[..., None]).reshape(self.ints.shape)


def _arrays(name: str, kind: str, weights) -> QuantArrays:
    """From one QuantizedWeight, or a list of them stacked (Switch's per-expert linears)."""
    many = list(weights) if isinstance(weights, (list, tuple)) else [weights]
    ints = np.stack([w.int_values().cpu().numpy() for w in many])
    scales = np.stack([w.scales.float().cpu().numpy() for w in many])
    zeros = np.stack([w.zeros.cpu().numpy() for w in many]) if many[0].bits == 4 else None
    if not isinstance(weights, (list, tuple)):
        ints, scales, zeros = ints[0], scales[0], None if zeros is None else zeros[0]
    return QuantArrays(name, kind, ints, scales, zeros, many[0].bits, many[0].group_size)


def quantized_arrays(model: nn.Module) -> list[QuantArrays]:
    """Every quantized weight of an engine model, the experts of each layer as one 3-D tensor per projection."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedExperts):
            w_in, w_out = module.quantized_weights()
            out += [_arrays(f"{name}.w_in", "experts", w_in), _arrays(f"{name}.w_out", "experts", w_out)]
        elif isinstance(module, QuantizedExpertDict):
            w_in, w_out = module.quantized_weights()
            out += [_arrays(f"{name}.w_in", "experts", w_in), _arrays(f"{name}.w_out", "experts", w_out)]
        elif isinstance(module, QuantLinear) and not _inside_experts(model, name):
            out.append(_arrays(f"{name}.weight", "linear", module.weight))
    return out


def _inside_experts(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), QuantizedExpertDict) for i in range(1, len(parts)))


def _digest(a: np.ndarray) -> tuple:
    return a.shape, hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def _uint4(name: str, values: np.ndarray):
    from onnx import TensorProto, helper

    flat = values.astype(np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)  # element 2j in the low nibble (ONNX's order)
    return helper.make_tensor(name, TensorProto.UINT4, values.shape, packed.tobytes(), raw=True)


def quantize_graph(path: Path, arrays: list[QuantArrays], require_all: bool = True) -> dict:
    """Replace each quantized weight's float initializer in the ONNX file at ``path`` (in place).

    ``require_all``: the graph holds the whole model, so every quantized weight must be found (Switch's
    encoder and decoder graphs hold a part each; their union is checked by the caller). Either way a
    float initializer left with the shape of a quantized expert tensor raises."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    by_digest = {}
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 2:
            by_digest.setdefault(_digest(numpy_helper.to_array(init)), init)
    new_nodes, replaced, missing = [], {"experts": 0, "linear": 0}, []
    for qa in arrays:
        w = qa.dequantized()
        init, transposed = by_digest.get(_digest(w)), False
        if init is None:
            init, transposed = by_digest.get(_digest(np.swapaxes(w, -1, -2))), True
        if init is None:
            missing.append(qa.name)
            continue
        ints, scales, zeros = qa.ints, qa.scales, qa.zeros
        axis = len(ints.shape) - 1  # the input width, which the blocks run along
        if transposed:
            ints, scales = np.swapaxes(ints, -1, -2), np.swapaxes(scales, -1, -2)
            zeros = None if zeros is None else np.swapaxes(zeros, -1, -2)
            axis -= 1
        base = init.name
        tensors = [_uint4(f"{base}_q", ints) if qa.bits == 4 else numpy_helper.from_array(np.ascontiguousarray(ints), f"{base}_q"),
                   numpy_helper.from_array(np.ascontiguousarray(scales, dtype=np.float32), f"{base}_scale")]
        if zeros is not None:
            tensors.append(_uint4(f"{base}_zero", zeros))
        graph.initializer.remove(init)
        graph.initializer.extend(tensors)
        new_nodes.append(helper.make_node("DequantizeLinear", [t.name for t in tensors], [base], name=f"{base}_dequantize",
                                          axis=axis, block_size=qa.group))
        by_digest = {k: v for k, v in by_digest.items() if v is not init}
        replaced[qa.kind] += 1
    expert_shapes = {s for qa in arrays if qa.kind == "experts" for s in (qa.ints.shape, np.swapaxes(qa.ints, -1, -2).shape)}
    left = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and tuple(i.dims) in expert_shapes]
    if left:
        raise IncompleteQuantization(f"{path.name}: float initializers shaped like expert weights are left: {left[:8]}")
    if missing and require_all:
        kinds = {qa.name: qa.kind for qa in arrays}
        raise IncompleteQuantization(f"{path.name}: quantized weights not found in the graph (they would stay float): "
                                     + ", ".join(f"{n} ({kinds[n]})" for n in missing[:8]))
    for node in reversed(new_nodes):  # their inputs are initializers: valid first in topological order
        graph.node.insert(0, node)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 21:
            raise ValueError(f"{path.name} has opset {opset.version}; blocked DequantizeLinear needs 21 (export.opset)")
    data = f"{path.name}.data"
    (path.parent / data).unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    (path.parent / data).chmod(0o644)  # onnx writes it owner-only; the graph beside it is world-readable
    replaced["names"] = [qa.name for qa in arrays if qa.name not in missing]
    return replaced
