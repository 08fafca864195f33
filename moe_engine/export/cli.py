"""``moe-lab export``: ONNX graphs of a checkpoint (and of its quantized version), checked on onnxruntime."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run_export(args: argparse.Namespace) -> int:
    from moe_engine.config import load_section
    from moe_engine.export.config import ExportConfig
    from moe_engine.export.export import run
    from moe_engine.stages import sections
    from moe_engine.tracking.lineage import stage_run  # a no-op unless MLFLOW_TRACKING_URI is set

    sets = list(args.set)  # command-line flags win over params.yaml and --set
    if args.no_past:
        sets.append("with_past=false")
    if args.fused_moe is not None:
        sets.append(f"fused_moe={args.fused_moe}")
    config = load_section(ExportConfig, args.params, args.section, sets,
                          known_sections=sections() if args.params is not None else None)
    result = run(config, args.model, args.out, args.quantized, args.data)
    out = Path(args.out)
    run_id = stage_run("export", config.to_dict(), result.metrics, [out / "metrics.json", out / "report.md", out / "export.json"])
    if run_id is not None:
        from moe_engine.tracking.onnx_model import log_onnx_model, record_sources

        sources = {"pretrain": args.model, **({"quantize": args.quantized} if args.quantized else {})}
        try:  # like stage_run, tracking never fails a finished stage
            record_sources(run_id, sources)
            info = log_onnx_model(run_id, out / "model.onnx", sources={"pretrain": args.model})
            print(f"registered: {info['model_uri']} as version {info['version']} of moe-lab (alias onnx)")
        except Exception as exc:
            print(f"warning: the ONNX model was not logged to MLflow: {exc}", file=sys.stderr)
    print(result.report)
    print(f"graphs: {', '.join(str(g.path) for g in result.graphs)}\nmetrics: {out / 'metrics.json'}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="ONNX graphs (with past, Switch encoder/decoder), parity-checked against stock transformers",
        description="Export a checkpoint through transformers' OnnxExporter with an exportable experts formulation, check "
        "every graph against stock transformers on onnxruntime (CPU, fp32) on new shapes, and with --quantized also the "
        "quantized checkpoint (its integers behind DequantizeLinear) under the quantization gate. Settings: params.yaml "
        "'export' (moe_engine.export.config.ExportConfig). Run the graphs on CUDA/TensorRT: benchmarks/run_onnx_gpu.py.",
    )
    p.add_argument("--model", type=Path, required=True, help="the (unquantized) Hugging Face model directory")
    p.add_argument("--out", type=Path, default=Path("outputs/export"),
                   help="output folder: *.onnx (+ .onnx.data), quantized/, export.json, metrics.json, report.md")
    p.add_argument("--quantized", type=Path, help="a `moe-lab quantize` model directory to export too (into OUT/quantized)")
    p.add_argument("--data", type=Path, help="prepared shards for the quantized ONNX model's perplexity gate")
    p.add_argument("--no-past", action="store_true", help="skip the generation graphs (model_with_past; Switch encoder/decoder)")
    p.add_argument("--fused-moe", choices=("none", "cuda", "cpu"), help="also write OUT/cuda/ or OUT/cpu/ with onnxruntime's "
                   "fused MoE op for that provider (the CPU one is parity-checked here; overrides export.fused_moe)")
    p.add_argument("--params", type=Path, help="params.yaml to read the section from (default: the built-in defaults)")
    p.add_argument("--section", default="export", help="params.yaml section (default: export)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set parity.tolerance=1e-5 or --set providers.order=[cuda,cpu]")
    p.set_defaults(func=run_export)
