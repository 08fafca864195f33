"""The export stage: ONNX graphs of a checkpoint, checked against stock transformers, optionally the
quantized checkpoint as ONNX under the quantization gate, and fused-MoE variants (onnxruntime's
``com.microsoft::MoE`` / ``QMoE``) for its CPU provider (checked here) or CUDA provider.

    import moe_engine as me
    result = me.export_onnx("outputs/pretrain/model", "outputs/export", quantized="outputs/quantize/model",
                            data="outputs/data")
    result.metrics["parity"]     # {"model": 3e-07, "model_with_past": 3e-07}

Layout of ``out_dir``: the graphs of ``graphs.py`` (``model.onnx`` ...), ``quantized/`` (the same
graphs of the quantized checkpoint), ``cpu/`` or ``cuda/`` (``fused_moe``: the graphs with the fused
MoE op; ``quantized/cpu/`` with QMoE holding the checkpoint's integers),
the model's ``config.json`` and tokenizer, ``export.json`` (graphs, their inputs and outputs,
versions), ``metrics.json`` and ``report.md``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from moe_engine.errors import ConfigError, UserError
from moe_engine.export.config import ExportConfig
from moe_engine.export.graphs import Graph


class ExportParityError(UserError):
    """An exported graph computes other numbers than stock transformers."""


@dataclass
class ExportResult:
    metrics: dict
    report: str
    graphs: list[Graph]


def export_onnx(model_dir: str | Path, out_dir: str | Path, *, quantized: str | Path | None = None,
                data: str | Path | None = None, **settings) -> ExportResult:
    """``me.export_onnx``: :func:`run` with ``settings`` as the ``export`` section (``with_past=False``,
    ``parity={"tolerance": 1e-5}``, ...). Without ``data`` the quantized model's gate is skipped."""
    settings.setdefault("gate", {})
    if data is None:
        settings["gate"] = {**settings["gate"], "enabled": False}
    return run(ExportConfig.from_dict(settings), model_dir, out_dir, quantized, data)


def _bytes(graph: Graph) -> int:
    return sum(p.stat().st_size for p in (graph.path, graph.path.with_name(graph.path.name + ".data")) if p.exists())


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _check_parity(errors: dict[str, float], tolerance: float, what: str) -> None:
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    if bad:
        rows = "\n".join(f"| {k} | {v:.3e} | {tolerance:.1e} |" for k, v in errors.items())
        raise ExportParityError(f"{what} ONNX graphs differ from the torch model on onnxruntime (CPU, fp32):\n"
                                f"| graph | max rel. error | tolerance |\n|---|---:|---:|\n{rows}\n"
                                "this is a bug in the export (or the installed onnxruntime); the previous outputs are intact")


def _copy_model_files(model_dir: Path, out: Path) -> None:
    """config.json, generation_config.json and tokenizer files (no weights) beside the graphs."""
    for f in Path(model_dir).iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            shutil.copy2(f, out / f.name)


def _check_fused_moe(config: ExportConfig, model_config) -> None:
    """Before any export work: the fused MoE op needs a fixed onnxruntime and a softmax/top-k router."""
    import onnxruntime as ort
    from packaging.version import Version

    if config.fused_moe == "none":
        return
    if Version(ort.__version__) < Version("1.28"):
        raise ConfigError(f"export.fused_moe = {config.fused_moe} needs onnxruntime >= 1.28 (installed {ort.__version__}): "
                          "before it the MoE op's swiglu used other constants than SwiGLU, silently")
    if model_config.is_encoder_decoder:
        raise ConfigError(f"export.fused_moe = {config.fused_moe} applies to decoder models (Switch's top-1 router with "
                          "capacity is not onnxruntime's MoE); set export.fused_moe = none")


def _fused_moe(stock, out: Path, config: ExportConfig) -> tuple[dict, list[Graph]]:
    """Graphs with onnxruntime's ``com.microsoft::MoE``: for the CUDA provider (transformers' ``ort_fusions="cuda"``)
    or the CPU one (``fused.py``); ``batched_mm`` experts behind a softmax/top-k router are fused, DeepSeek-V3's
    grouped sigmoid router is not (its experts stay plain ops)."""
    import onnx
    import onnxruntime as ort

    from moe_engine.export.graphs import export_graphs
    from moe_engine.models.adapters import ADAPTERS

    graphs = export_graphs(stock, out, config, ort_fusions="cuda" if config.fused_moe == "cuda" else "cpu_moe")
    block = ADAPTERS[stock.config.model_type].block_class
    expected = sum(type(m).__name__ == block for m in stock.modules())
    counts = {}
    for g in graphs:
        nodes = onnx.load(str(g.path), load_external_data=False).graph.node
        counts[g.name] = sum(n.op_type in ("MoE", "QMoE") and n.domain == "com.microsoft" for n in nodes)
    return ({"provider": config.fused_moe, "moe_nodes": counts, "moe_layers": expected, "onnxruntime": ort.__version__,
             "graphs": {g.name: str(g.path.relative_to(out.parent)) for g in graphs}}, graphs)


def run(config: ExportConfig, model_dir: str | Path, out_dir: str | Path, quantized_dir: str | Path | None = None,
        data_dir: str | Path | None = None) -> ExportResult:
    """Export, check parity, and (with ``quantized_dir``) export and gate the quantized checkpoint.
    Nothing is published unless every check passes."""
    from moe_engine.export.graphs import export_graphs, load_stock
    from moe_engine.export.latency import onnx_vs_torch
    from moe_engine.export.parity import parity
    from moe_engine.export.runtime import session
    from moe_engine.io import atomic_output, write_json

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if quantized_dir is not None and config.gate.enabled and data_dir is None:
        raise ConfigError("export.gate.enabled = true needs prepared shards for the quantized model's gate: pass --data DIR "
                          "or --set gate.enabled=false")
    stock = load_stock(model_dir, config.experts_implementation)
    _check_fused_moe(config, stock.config)
    metrics: dict = {"versions": _versions(), "opset": config.opset, "experts_implementation": config.experts_implementation}
    with atomic_output(out_dir) as tmp:
        graphs = export_graphs(stock, tmp, config)
        errors = parity(stock, graphs, config.parity)
        _check_parity(errors, config.parity.tolerance, "the")
        metrics.update(parity=errors, parity_max=max(errors.values()), bytes={g.name: _bytes(g) for g in graphs})
        if config.latency.enabled:
            sess = session(graphs[0].path, config.providers)
            metrics["latency"] = {f"batch_{b}": onnx_vs_torch(stock, sess, b, config.latency.length, config.latency.repeats)
                                  for b in config.latency.batch_sizes}
        fused: list[Graph] = []
        if config.fused_moe != "none":
            metrics["fused_moe"], fused = _fused_moe(stock, tmp / config.fused_moe, config)
            if config.fused_moe == "cpu":  # runs here: checked like the portable graphs
                metrics["fused_moe"]["parity"] = parity(stock, fused, config.parity)
                _check_parity(metrics["fused_moe"]["parity"], config.parity.tolerance, "the CPU-fused MoE")
        qgraphs, rows = [], []
        if quantized_dir is not None:
            qmetrics, qgraphs, rows = _quantized(config, Path(quantized_dir), tmp / "quantized", stock, data_dir,
                                                 graphs, fused)
            metrics["quantized"] = qmetrics
        _copy_model_files(model_dir, tmp)
        manifest = {"format": "moe_lab.onnx", "format_version": 1, "source_model": str(model_dir),
                    "quantized_model": str(quantized_dir) if quantized_dir else None, **metrics,
                    "graphs": {g.name: {"file": g.path.name, "inputs": g.inputs, "outputs": g.outputs} for g in graphs},
                    "quantized_graphs": {g.name: {"file": f"quantized/{g.path.name}"} for g in qgraphs}}
        write_json(tmp / "export.json", manifest)
        report = markdown(metrics, model_dir, config, rows)
        write_json(tmp / "metrics.json", metrics)
        (tmp / "report.md").write_text(report)
        if rows:
            from moe_engine.quantize import gate as qgate

            qgate.enforce(rows, f"int{metrics['quantized']['bits']} ONNX", "raise export.gate limits or quantize with more "
                          "bits; the previous outputs are intact")
    graphs = [Graph(g.name, out_dir / g.path.name, g.inputs, g.outputs) for g in graphs]
    return ExportResult(metrics, report, graphs)


def _quantized(config: ExportConfig, quantized_dir: Path, out: Path, stock, data_dir, float_graphs: list[Graph],
               fused: list[Graph]) -> tuple[dict, list[Graph], list]:
    """The quantized checkpoint's graphs: float graphs of its dequantised weights (``float_graphs``, exported from
    ``stock``, with those weights swapped in: ``reweight.py``; exported afresh when that does not apply), then the
    integers put back."""
    from moe_engine.export.graphs import export_graphs
    from moe_engine.export.parity import parity
    from moe_engine.export.quantized import quantize_graph, quantized_arrays
    from moe_engine.export.reweight import reweighted
    from moe_engine.export.runtime import OrtLM
    from moe_engine.models.loading import load
    from moe_engine.quantize import gate as qgate
    from moe_engine.quantize.format import quantization_of, stock_model
    from moe_engine.quantize.modules import IncompleteQuantization, dequantized_state_dict

    qmodel = load(quantized_dir)
    qc = quantization_of(qmodel.config)
    if qc is None:
        raise ConfigError(f"--quantized {quantized_dir} is not a `moe-lab quantize` checkpoint")
    plain = stock_model(qmodel.config, dequantized_state_dict(qmodel))
    if not plain.config.is_encoder_decoder:
        plain.set_experts_implementation(config.experts_implementation)
    graphs = reweighted(float_graphs, out, stock, plain) or export_graphs(plain, out, config)
    arrays = quantized_arrays(qmodel)
    replaced = {g.name: quantize_graph(g.path, arrays, require_all=g.name in ("model", "model_with_past")) for g in graphs}
    parts = [r.pop("names") for name, r in replaced.items() if name in ("encoder", "decoder")]
    if parts and set().union(*parts) != {qa.name for qa in arrays}:
        missing = sorted({qa.name for qa in arrays} - set().union(*parts))
        raise IncompleteQuantization(f"quantized weights in neither encoder.onnx nor decoder.onnx: {missing[:8]}")
    for r in replaced.values():
        r.pop("names", None)
    errors = parity(qmodel, graphs, config.parity)  # against the engine's quantized model: the same integers
    _check_parity(errors, config.parity.tolerance, "the quantized")
    fp32 = {g.name: _bytes(Graph(g.name, out.parent / g.path.name, [], [])) for g in graphs}
    sizes = {g.name: _bytes(g) for g in graphs}
    result = {"bits": qc["bits"], "group_size": qc["group_size"], "replaced": replaced, "parity": errors,
              "parity_max": max(errors.values()), "bytes": sizes,
              "bytes_ratio": {k: sizes[k] / fp32[k] for k in sizes if fp32.get(k)}}
    if config.fused_moe == "cpu":
        result["fused_moe"] = _quantized_fused_cpu(plain, qmodel, arrays, out / "cpu", config, stock, fused)
    g, rows = config.gate, []
    if g.enabled:
        splits = qgate.available_splits(Path(data_dir), g.splits)
        original = qgate.perplexities(stock, Path(data_dir), splits, g.batch_size, g.max_sequences)
        onnx_lm = OrtLM(out / "model.onnx", stock.config, config.providers)
        quantized = qgate.perplexities(onnx_lm, Path(data_dir), splits, g.batch_size, g.max_sequences)
        rows = qgate.judge(original, quantized, g.limit(qc["bits"]))
        result["gate"] = {**{r.split: r.to_dict() for r in rows}, "passed": all(r.passed for r in rows)}
    return result, graphs, rows


def _quantized_fused_cpu(plain, qmodel, arrays, out: Path, config: ExportConfig, stock, fused: list[Graph]) -> dict:
    """The quantized checkpoint with onnxruntime's ``QMoE`` on CPU: its fused float graphs (``fused``, the float
    model's, with the dequantised weights swapped in, as in :func:`_quantized`), then each MoE node
    given the checkpoint's integers (``fused.qmoe_graph``) and the other quantized weights behind
    DequantizeLinear; an unfused layer's experts (DeepSeek-V3) take the DequantizeLinear path too."""
    from moe_engine.export.fused import qmoe_graph
    from moe_engine.export.graphs import export_graphs
    from moe_engine.export.parity import parity
    from moe_engine.export.quantized import quantize_graph
    from moe_engine.export.reweight import reweighted
    from moe_engine.quantize.modules import IncompleteQuantization

    graphs = reweighted(fused, out, stock, plain) or export_graphs(plain, out, config, ort_fusions="cpu_moe")
    nodes = {}
    for g in graphs:
        in_qmoe = qmoe_graph(g.path, arrays)
        rest = quantize_graph(g.path, [qa for qa in arrays if qa.name not in in_qmoe], require_all=False)
        left = {qa.name for qa in arrays} - in_qmoe - set(rest.pop("names"))
        if left:
            raise IncompleteQuantization(f"{g.path.name}: quantized weights neither in QMoE nor dequantised: {sorted(left)[:8]}")
        nodes[g.name] = {"qmoe_experts": len(in_qmoe), **rest}
    errors = parity(qmodel, graphs, config.parity)
    _check_parity(errors, config.parity.tolerance, "the quantized CPU-fused (QMoE)")
    return {"replaced": nodes, "parity": errors, "bytes": {g.name: _bytes(g) for g in graphs}}


def markdown(metrics: dict, model_dir: Path, config: ExportConfig, gate_rows: list | None = None) -> str:
    lines = [f"# ONNX export of {model_dir}", "",
             f"opset {metrics['opset']}, experts `{metrics['experts_implementation']}`; "
             + ", ".join(f"{k} {v}" for k, v in metrics["versions"].items()), "",
             "## Parity with stock transformers (onnxruntime CPU, fp32, inputs unlike the export example)", "",
             "| graph | max rel. error | bytes |", "|---|---:|---:|"]
    for name, err in metrics["parity"].items():
        lines.append(f"| {name} | {err:.3e} | {metrics['bytes'][name]:,} |")
    lines.append(f"\ntolerance {config.parity.tolerance:.0e}")
    if "latency" in metrics:
        lines += ["", "## Latency (full forward, this machine, median; benchmarks/onnx_latency.py measures carefully)", "",
                  "| batch x length | onnxruntime ms | torch eager ms | onnx / torch |", "|---|---:|---:|---:|"]
        for row in metrics["latency"].values():
            lines.append(f"| {row['batch']} x {row['length']} | {row['onnx_ms']:.2f} | {row['torch_ms']:.2f} | "
                         f"{row['onnx_over_torch']:.2f} |")
    q = metrics.get("quantized")
    if q:
        lines += ["", f"## Quantized model (int{q['bits']}) as ONNX", "",
                  "| graph | max rel. error vs torch quantized | bytes | vs fp32 ONNX |", "|---|---:|---:|---:|"]
        for name, err in q["parity"].items():
            lines.append(f"| {name} | {err:.3e} | {q['bytes'][name]:,} | {q['bytes_ratio'].get(name, float('nan')):.3f} |")
        if gate_rows:
            from moe_engine.quantize import gate as qgate

            lines += ["", qgate.table(gate_rows, f"int{q['bits']} ONNX")]
    f = metrics.get("fused_moe")
    if f:
        ran = f"parity {f['parity']}" if "parity" in f else "not run on this machine"
        lines += ["", f"## Fused MoE for onnxruntime's {f['provider'].upper()} provider ({f['provider']}/)", "",
                  f"MoE nodes {f['moe_nodes']} of {f['moe_layers']} MoE layers; onnxruntime {f['onnxruntime']}; {ran}"]
    return "\n".join(lines) + "\n"
