"""Exported graphs given another model's weights, instead of a second export of the same architecture.

The quantized checkpoint's graphs are those of a stock model holding its dequantised weights
(``export._quantized``): the same config, the same modules, so torch.export and onnxscript produce the
same graph as for the float checkpoint exported just before, and only the weights it changed differ.
Exporting is the expensive part of the stage (torch.export, decompositions, translation and onnxscript's
optimizer: 20-40 s per graph of a debug-size model on one CPU core, about twice that under coverage), so
the float graphs are copied with those weights swapped. The exporter keeps every weight as is,
transposed (folded transposes), or, in a CPU-fused MoE node, as the gate/up-interleaved fc1
(``fused.fuse_moe_for_cpu``); a weight is swapped only where exactly one weight of the float model
has that form. Anything else (another config, dtype or attention, a changed weight missing from a graph
or ambiguous among the weights) returns None and the caller exports the model as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from moe_engine.export.fused import _interleave_rows
from moe_engine.export.graphs import Graph
from moe_engine.export.quantized import _digest


def _forms(a: np.ndarray) -> list[np.ndarray]:
    """The forms the exporter stores a weight in: as is, transposed, gate/up rows interleaved (3-D experts)."""
    out = [a]
    if a.ndim >= 2:
        out.append(np.swapaxes(a, -1, -2))
    if a.ndim == 3 and a.shape[1] % 2 == 0:
        out.append(_interleave_rows(a))
    return out


def _same_architecture(source: nn.Module, target: nn.Module) -> bool:
    def config(m):
        d = m.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "transformers_version"):
            d.pop(key, None)
        return d

    return (config(source) == config(target)
            and source.config._attn_implementation == target.config._attn_implementation
            and (source.config.is_encoder_decoder
                 or source.get_experts_implementation() == target.get_experts_implementation()))


def _swaps(source: nn.Module, target: nn.Module) -> tuple[dict[tuple, tuple[str, np.ndarray]], set] | None:
    """(digest of a changed weight's form in ``source`` -> (weight name, the same form of ``target``'s weight),
    digests of every form of every ``source`` weight); None when the models differ in more than weights
    (or in a 1-D weight), or a changed form is not unique on either side."""
    src, dst = source.state_dict(), target.state_dict()
    if src.keys() != dst.keys() or not _same_architecture(source, target):
        return None
    if any(src[k].shape != dst[k].shape or src[k].dtype != dst[k].dtype for k in src):
        return None
    src_np = {k: v.detach().cpu().numpy() for k, v in src.items()}
    dst_np = {k: v.detach().cpu().numpy() for k, v in dst.items()}
    # tied weights are one tensor under two names: each name's forms count once per tensor
    owners_src: dict[tuple, set] = {}
    owners_dst: dict[tuple, set] = {}
    for k in src_np:
        for f in _forms(src_np[k]):
            owners_src.setdefault(_digest(f), set()).add(src[k].data_ptr())
        for f in _forms(dst_np[k]):
            owners_dst.setdefault(_digest(f), set()).add(dst[k].data_ptr())
    swaps: dict[tuple, tuple[str, np.ndarray]] = {}
    for k in src_np:
        if np.array_equal(src_np[k], dst_np[k]):
            continue
        if src_np[k].ndim < 2:
            return None
        for old, new in zip(_forms(src_np[k]), _forms(dst_np[k])):
            key = _digest(old)
            if len(owners_src[key]) != 1 or len(owners_dst[_digest(new)]) != 1:
                return None  # the optimizer may have merged it with an equal weight: not one initializer per weight
            swaps[key] = (k, new)
    return swaps, set(owners_src)


def reweighted(graphs: list[Graph], out_dir: Path, source: nn.Module, target: nn.Module) -> list[Graph] | None:
    """``graphs`` (exported from ``source``) with ``target``'s weights, saved in ``out_dir`` under the same
    names; None (nothing written) when that is not exactly what exporting ``target`` would give."""
    import onnx
    from onnx import numpy_helper

    found_swaps = _swaps(source, target)
    if found_swaps is None:
        return None
    swaps, weight_forms = found_swaps
    changed = {name for name, _ in swaps.values()}
    models = []
    for g in graphs:
        model = onnx.load(str(g.path))
        found = set()
        for init in model.graph.initializer:
            if init.data_type != onnx.TensorProto.FLOAT:
                continue
            key = _digest(numpy_helper.to_array(init))
            if len(init.dims) >= 2 and key not in weight_forms:
                return None  # a matrix computed from weights (a slice, a product): it could hold a changed one
            hit = swaps.get(key)
            if hit is not None:
                found.add(hit[0])
                init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(hit[1]), init.name))
        if found != changed:  # a changed weight in some other form (or in a graph holding part of the model)
            return None
        models.append(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for g, model in zip(graphs, models):
        path, data = out_dir / g.path.name, f"{g.path.name}.data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
        (out_dir / data).chmod(0o644)  # onnx writes it owner-only; the graph beside it is world-readable
        out.append(Graph(g.name, path, list(g.inputs), list(g.outputs)))
    return out
