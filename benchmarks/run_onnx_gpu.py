"""Run an exported model (`moe-lab export`) on onnxruntime's TensorRT / CUDA execution providers:
parity against stock transformers in torch, then latency against torch eager on the same GPU.

Needs the GPU build of onnxruntime (it replaces the CPU one; do not install both) and, for TensorRT,
TensorRT's libraries on LD_LIBRARY_PATH:

    pip uninstall -y onnxruntime && pip install 'open-moe-trainer-lab[gpu]'      # onnxruntime-gpu
    moe-lab export --model outputs/pretrain/model --out outputs/export --params params.yaml   # on any machine
    python benchmarks/run_onnx_gpu.py --export outputs/export --model outputs/pretrain/model \
        --params params.yaml --providers tensorrt,cuda,cpu --out benchmarks/results/onnx_gpu.json

Provider settings come from params.yaml ``export.providers`` (moe_engine/export/config.py: device id,
TensorRT fp16, workspace, engine cache and shape profiles, CUDA arena); ``--providers`` overrides the
order (onnxruntime falls back node by node to the next provider in it). ``--fused`` runs ``cuda/model.onnx``
(written with ``--fused-moe cuda``: onnxruntime's com.microsoft::MoE) instead of the portable graph.
The script prints the providers onnxruntime really used: TensorRT silently falling back to CUDA or CPU is
visible there. ``--smoke`` runs the CPU provider on a tiny freshly exported model (this script's own check).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _graphs(export_dir: Path, fused: bool):
    from moe_engine.export.graphs import Graph

    manifest = json.loads((export_dir / "export.json").read_text())
    if fused:
        if "fused_moe" not in manifest:
            raise SystemExit(f"{export_dir} has no fused graphs: export with --fused-moe cuda")
        return [Graph(name, export_dir / rel, [], []) for name, rel in manifest["fused_moe"]["graphs"].items()]
    return [Graph(name, export_dir / g["file"], g["inputs"], g["outputs"]) for name, g in manifest["graphs"].items()]


@torch.no_grad()
def run(export_dir: Path, model_dir: Path, config, fused: bool, repeats: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from moe_engine.export.latency import interleaved
    from moe_engine.export.parity import parity
    from moe_engine.export.runtime import provider_options, session

    graphs = _graphs(export_dir, fused)
    is_seq2seq = AutoConfig.from_pretrained(model_dir).is_encoder_decoder
    cls = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
    stock_cpu = cls.from_pretrained(model_dir, dtype=torch.float32).eval()  # the parity reference, fp32
    sess = session(graphs[0].path, config.providers)
    result = {"requested_providers": provider_options(config.providers), "used_providers": sess.get_providers(),
              "graphs": {g.name: str(g.path) for g in graphs}}
    # parity on the configured providers (fp16 TensorRT engines differ from fp32 torch by ~1e-3, not 1e-7)
    result["parity"] = parity(stock_cpu, graphs, config.parity, config.providers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stock = cls.from_pretrained(model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device).eval()
    rows = []
    for batch, length in ((1, 128), (8, 128)):
        ids = torch.randint(0, stock.config.vocab_size, (batch, length))
        mask = torch.ones_like(ids)
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if is_seq2seq:
            feed["decoder_input_ids"] = ids.numpy()
            kwargs["decoder_input_ids"] = kwargs["input_ids"]

        def torch_forward():
            stock(**kwargs, use_cache=False)
            if device == "cuda":
                torch.cuda.synchronize()

        timing = interleaved({"onnxruntime": lambda: sess.run(["logits"], feed), f"torch_{device}_eager": torch_forward},
                             repeats, 3, baseline=f"torch_{device}_eager")
        rows.append({"batch": batch, "length": length,
                     **{f"{k}_ms": round(v["median_s"] * 1e3, 3) for k, v in timing.items()},
                     "onnxruntime_over_torch": round(timing["onnxruntime"]["ratio"], 3)})
    result["latency"] = rows
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", type=Path, help="the --out directory of `moe-lab export`")
    p.add_argument("--model", type=Path, help="the model directory it was exported from (the parity reference)")
    p.add_argument("--params", type=Path, help="params.yaml with an `export` section (providers, parity)")
    p.add_argument("--providers", help="comma-separated order, e.g. tensorrt,cuda,cpu (overrides export.providers.order)")
    p.add_argument("--tolerance", type=float, default=1e-2, help="parity tolerance here (TensorRT fp16 is not fp32)")
    p.add_argument("--fused", action="store_true", help="run cuda/model.onnx (onnxruntime's fused MoE op)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, help="write the result JSON here")
    p.add_argument("--smoke", action="store_true", help="CPU provider, tiny freshly exported model")
    args = p.parse_args()

    from moe_engine.config import load_section
    from moe_engine.export.config import ExportConfig

    sets = [f"parity.tolerance={args.tolerance}"]
    if args.providers:
        sets.append(f"providers.order=[{args.providers}]")
    config = load_section(ExportConfig, args.params, "export", sets)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            import moe_engine as me
            from moe_engine.export.export import export_onnx

            config = config.override({"providers.order": ["cpu"]})
            me.build_model("mixtral", "tiny", seed=0).save_pretrained(Path(tmp) / "model")
            export_onnx(Path(tmp) / "model", Path(tmp) / "onnx", latency={"enabled": False}, with_past=False)
            args.model, args.export, args.repeats = Path(tmp) / "model", Path(tmp) / "onnx", 3
        if args.export is None or args.model is None:
            p.error("--export and --model are required (or --smoke)")
        result = run(args.export, args.model, config, args.fused, args.repeats)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result = {"benchmark": "run_onnx_gpu", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": {"gpu": gpu, "cuda": torch.version.cuda},
              "versions": {k: _version(k) for k in ("torch", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt")},
              **result}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    bad = {k: v for k, v in result["parity"].items() if v > args.tolerance}
    if bad:
        raise SystemExit(f"parity above {args.tolerance}: {bad}")


if __name__ == "__main__":
    main()
