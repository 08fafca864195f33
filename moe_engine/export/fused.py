"""onnxruntime's fused ``com.microsoft::MoE`` op for its CPU provider.

transformers' ONNX fusions turn each ``batched_mm`` experts block behind a softmax/top-k router into
one ``MoE`` node, but only for the CUDA provider (gate and up projections as separate fc1/fc3 and a
``silu`` activation), and the CPU kernel refuses fc3: "FC3 is not implemented for CPU MoE". onnxruntime's
CPU kernel takes fc1 as interleaved gate/up rows with its ``swiglu`` activation,
``G * sigmoid(alpha * G) * (L + beta)`` (onnxruntime's MoE schema), which with ``alpha = 1, beta = 0``
and no limit is SiLU(gate) * up. :func:`fuse_moe_for_cpu` runs transformers' matcher and rewrites
each node into that form. Measured on onnxruntime 1.32 (CPU): 2.7e-7 relative error against a numpy
reference with the node's input produced by and its output consumed by other nodes, the case
transformers notes as wrong (microsoft/onnxruntime#33866) for earlier versions; the export's parity
check runs on every fused graph regardless. DeepSeek-V3's grouped sigmoid router is not matched.
"""

from __future__ import annotations

import numpy as np

from moe_engine.errors import ConfigError


def _matcher():
    try:  # a private helper of transformers' ONNX exporter (transformers >= 5.24)
        from transformers.exporters.onnxruntime_fusions import _fuse_mixture_of_experts
    except ImportError as exc:
        raise ConfigError(f"export.fused_moe = cpu needs transformers' ONNX MoE fusion (transformers >= 5.24): {exc}") from None
    return _fuse_mixture_of_experts


def fuse_moe_for_cpu(program) -> int:
    """Fuse the experts of ``program`` (an ``onnx_ir.Model`` exported with ``batched_mm`` experts) into
    CPU ``MoE`` nodes, in place; returns how many."""
    import onnx_ir as ir
    from onnx_ir.passes import common as common_passes

    _matcher()(program)
    graph, count = program.graph, 0
    for node in [n for n in graph.all_nodes() if n.op_type == "MoE" and n.domain == "com.microsoft"]:
        gate_v, up_v = node.inputs[2], node.inputs[6] if len(node.inputs) > 6 else None
        if up_v is None or any(node.inputs[i] is not None for i in (3, 5, 7) if i < len(node.inputs)):
            raise ConfigError(f"{node.name}: a fused MoE with expert biases or no up projection is not supported on CPU")
        gate, up = gate_v.const_value.numpy(), up_v.const_value.numpy()  # [E, F, D] each
        e, f, d = gate.shape
        fc1 = np.ascontiguousarray(np.stack([gate, up], axis=2).reshape(e, 2 * f, d))  # rows g0, u0, g1, u1, ...
        value = ir.Value(name=f"{gate_v.name}_interleaved_up", const_value=ir.tensor(fc1))
        value.dtype, value.shape = ir.DataType.FLOAT, ir.Shape(fc1.shape)
        graph.register_initializer(value)
        node.replace_input_with(2, value)
        node.resize_inputs(5)  # input, router_probs, fc1, fc1_bias, fc2: no fc3
        node.attributes["activation_type"] = ir.AttrString("activation_type", "swiglu")
        node.attributes["swiglu_fusion"] = ir.AttrInt64("swiglu_fusion", 1)
        node.attributes["activation_alpha"] = ir.AttrFloat32("activation_alpha", 1.0)
        node.attributes["activation_beta"] = ir.AttrFloat32("activation_beta", 0.0)
        count += 1
    common_passes.RemoveUnusedNodesPass()(program)  # the batched_mm gathers the fusion replaced, and their weights
    return count


def _pack_uint4(values: np.ndarray) -> np.ndarray:
    """[..., n] of 0..15 -> [..., ceil(n / 2)] bytes, element 2j in the low nibble (padded with 0)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], -1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _interleave_rows(a: np.ndarray) -> np.ndarray:
    """[E, 2F, ...] with gate rows then up rows -> rows g0, u0, g1, u1, ... (the CPU kernel's fc1)."""
    e, two_f = a.shape[:2]
    return np.stack([a[:, : two_f // 2], a[:, two_f // 2:]], axis=2).reshape(a.shape)


def qmoe_graph(path, arrays) -> set[str]:
    """Replace each CPU ``MoE`` node of the ONNX file at ``path`` (in place) by ``QMoE`` holding the
    quantized checkpoint's own integers: int8 rows as uint8 with onnxruntime's default zero point 128
    (``q + 128``), int4 groups as packed uint4 with their uint4 zero points and ``block_size`` = the
    group size. The float experts are matched by their exact bytes; one left unmatched raises. Returns
    the names of the quantized weights now inside QMoE nodes."""
    import onnx
    from onnx import helper, numpy_helper

    from moe_engine.quantize.modules import IncompleteQuantization

    experts = {}
    for qa in arrays:
        if qa.kind == "experts":
            experts[qa.name] = qa
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_bytes = {}
    for qa in experts.values():
        w = qa.dequantized()
        w = _interleave_rows(w) if qa.name.endswith(".w_in") else w
        by_bytes[(w.shape, w.tobytes())] = qa
    replaced: set[str] = set()
    for idx, node in enumerate(list(graph.node)):
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            continue
        found = []
        for name in (node.input[2], node.input[4]):
            a = numpy_helper.to_array(inits[name])
            found.append(by_bytes.get((a.shape, a.tobytes())))
        if None in found:
            raise IncompleteQuantization(f"{path.name}: the experts of MoE node {node.name} are not the quantized ones")
        tensors, names = [], []
        for role, qa in zip(("fc1", "fc2"), found):
            ints, scales, zeros = qa.ints, qa.scales, qa.zeros
            if role == "fc1":
                ints, scales = _interleave_rows(ints), _interleave_rows(scales)
                zeros = None if zeros is None else _interleave_rows(zeros)
            base = f"{node.name}_{role}"
            if qa.bits == 8:
                w = (ints.astype(np.int16) + 128).astype(np.uint8)
                s, z = scales[..., 0], None
            else:
                w, s, z = _pack_uint4(ints), scales, _pack_uint4(zeros)
            tensors += [numpy_helper.from_array(np.ascontiguousarray(w), f"{base}_q"),
                        numpy_helper.from_array(np.ascontiguousarray(s, dtype=np.float32), f"{base}_scale")]
            if z is not None:
                tensors.append(numpy_helper.from_array(np.ascontiguousarray(z), f"{base}_zero"))
            names.append((f"{base}_q", f"{base}_scale", f"{base}_zero" if z is not None else ""))
        (w1, s1, z1), (w2, s2, z2) = names
        bits = found[0].bits
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs["expert_weight_bits"] = bits
        if bits == 4:
            group = found[0].group
            if group < 16 or group & (group - 1):
                raise IncompleteQuantization(f"QMoE needs a power-of-two block size >= 16; quantize.group_size is {group}")
            attrs["block_size"] = group
        inputs = [node.input[0], node.input[1], w1, s1, "", w2, s2, "", "", "", "", z1, z2]
        qmoe = helper.make_node("QMoE", inputs, list(node.output), name=f"{node.name}_quantized", domain="com.microsoft",
                                **{k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()})
        graph.node.remove(node)
        graph.node.insert(idx, qmoe)
        graph.initializer.extend(tensors)
        replaced.update(qa.name for qa in found)
    used = {x for n in graph.node for x in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:  # the float experts just replaced
        graph.initializer.remove(init)
    data = f"{path.name}.data"
    (path.parent / data).unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    (path.parent / data).chmod(0o644)  # onnx writes it owner-only; the graph beside it is world-readable
    return replaced
