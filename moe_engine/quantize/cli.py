"""``moe-lab quantize``: weight-only int8/int4 of an MoE checkpoint, its error report and quality gate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run_quantize(args: argparse.Namespace) -> int:
    from moe_engine.config import load_section
    from moe_engine.quantize.config import QuantizeConfig
    from moe_engine.quantize.quantize import run
    from moe_engine.stages import sections
    from moe_engine.tracking.lineage import stage_run  # a no-op unless MLFLOW_TRACKING_URI is set

    sets = list(args.set)  # command-line flags win over params.yaml and --set
    if args.bits is not None:
        sets.append(f"bits={args.bits}")
    if args.group_size is not None:
        sets.append(f"group_size={args.group_size}")
    config = load_section(QuantizeConfig, args.params, args.section, sets,
                          known_sections=sections() if args.params is not None else None)
    result = run(config, args.model, args.out, args.data)
    out = Path(args.out)
    run_id = stage_run("quantize", config.to_dict(), result.metrics,
                       [out / "metrics.json", out / "report.md", out / "errors.csv"])
    if run_id is not None:
        from moe_engine.tracking.onnx_model import record_sources

        try:  # like stage_run, tracking never fails a finished stage
            record_sources(run_id, {"pretrain": args.model})
        except Exception as exc:
            print(f"warning: the source model was not recorded in MLflow: {exc}", file=sys.stderr)
    print(result.report)
    print(f"model: {result.model_dir}\nmetrics: {out / 'metrics.json'}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="weight-only int8/int4 quantization of the experts (and optionally attention/dense linears)",
        description="Quantize an MoE checkpoint (every expert tensor; attention and other linears when asked), report "
        "each expert's weight and output error on calibration tokens, save it (me.load reads it) and gate on perplexity "
        "against the unquantized model. Settings: params.yaml 'quantize' (moe_engine.quantize.config.QuantizeConfig). "
        "A failed gate exits 2 with the table; the previous outputs stay.",
    )
    p.add_argument("--model", type=Path, required=True, help="the Hugging Face model directory to quantize")
    p.add_argument("--out", type=Path, default=Path("outputs/quantize"),
                   help="output folder: model/, metrics.json (DVC metrics), errors.csv, report.md")
    p.add_argument("--data", type=Path, help="prepared shards (moe-lab data prepare): calibration tokens and the gate's "
                   "val/ood perplexity; without it, random calibration ids and --set gate.enabled=false")
    p.add_argument("--bits", type=int, choices=(4, 8), help="8: int8 per output row; 4: int4 groups (overrides quantize.bits)")
    p.add_argument("--group-size", type=int, help="int4 input columns per scale (overrides quantize.group_size)")
    p.add_argument("--params", type=Path, help="params.yaml to read the section from (default: the built-in defaults)")
    p.add_argument("--section", default="quantize", help="params.yaml section (default: quantize)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set attention=true or --set gate.int4_max_ppl_increase=0.05")
    p.set_defaults(func=run_quantize)
