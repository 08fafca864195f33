"""onnxruntime (CPU) latency and throughput of the exported MoE against torch eager, on this machine.

What CPU users get: the same fp32 weights run as
  - onnx_grouped_mm: model.onnx / model_with_past.onnx as `moe-lab export` writes them (the default),
  - onnx_batched_mm: the same graphs with transformers' batched_mm experts (a weight gather per routed token),
  - onnx_fused_cpu:  onnxruntime's fused com.microsoft::MoE op (`moe-lab export --fused-moe cpu`),
  - torch_stock:     stock transformers eager (its default grouped_mm experts) - the baseline,
  - torch_engine:    the engine-patched model (me.load / me.patch),
for two workloads at batch 1 and 8: a prefill (full forward over `--length` tokens) and one decode step
(1 new token over a `--past`-token cache: model_with_past.onnx vs transformers' DynamicCache). All four are
timed in turn within each round (A B C D A B C D ...), after warm-up; figures are medians of the rounds,
ratios are medians of per-round ratios to torch_stock. Both runtimes use the same number of threads,
1 and then all cores by default (each a run in the JSON, with the machine's load average around it).

    python benchmarks/onnx_latency.py            # demo size and a larger CPU-feasible Mixtral-like model
    python benchmarks/onnx_latency.py --smoke    # seconds: demo size, batch 1, short sequences

Writes benchmarks/results/onnx_cpu.json (device, versions, date, settings, rows); --smoke prints only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# (name, build_model overrides): the demo model's shape (params.yaml: tiny Mixtral, vocab 4096) and a larger one
MODELS = {
    "demo": dict(vocab_size=4096),
    "mixtral-90m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def export(model, out: Path, formulation: str) -> tuple[Path, Path]:
    from moe_engine.export.config import ExportConfig
    from moe_engine.export.graphs import experts_implementation, export_graphs

    if formulation == "fused_cpu":  # onnxruntime's com.microsoft::MoE for its CPU provider (export.fused_moe = cpu)
        graphs = export_graphs(model, out, ExportConfig(), ort_fusions="cpu_moe")
    else:
        with experts_implementation(model, formulation):
            graphs = export_graphs(model, out, ExportConfig.from_dict({"experts_implementation": formulation}))
    return graphs[0].path, graphs[1].path


@torch.no_grad()
def bench_model(name: str, overrides: dict, batches: list[int], length: int, past: int, repeats: int, threads: int,
                formulations: list[str], tmp: Path) -> list[dict]:
    import copy

    from transformers import AutoModelForCausalLM

    import moe_engine as me
    from moe_engine.export.latency import interleaved
    from moe_engine.export.runtime import session

    me.build_model("mixtral", "tiny", seed=0, **overrides).save_pretrained(tmp / name)
    stock = AutoModelForCausalLM.from_pretrained(tmp / name).eval()
    engine = me.patch(copy.deepcopy(stock)).eval()
    params = sum(p.numel() for p in stock.parameters())
    sessions = {}
    for f in formulations:
        model_path, past_path = export(stock, tmp / f"{name}-{f}", f)
        sessions[f] = (session(model_path, threads=threads), session(past_path, threads=threads))
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        ids = torch.randint(0, stock.config.vocab_size, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        fns = {f"onnx_{f}": (lambda s=s: s[0].run(["logits"], feed)) for f, s in sessions.items()
               if f != "batched_mm" or _gather_bytes(stock, batch * length) <= GATHER_LIMIT}
        fns["torch_stock"] = lambda: stock(input_ids=ids, attention_mask=mask, use_cache=False)
        fns["torch_engine"] = lambda: engine(input_ids=ids, attention_mask=mask, use_cache=False)
        rows.append(_row(name, params, "prefill", batch, length, 0, interleaved(fns, repeats, 2, "torch_stock")))

        # one decode step over a `past`-token cache
        prompt = torch.randint(0, stock.config.vocab_size, (batch, past), generator=g)
        new = torch.randint(0, stock.config.vocab_size, (batch, 1), generator=g)
        full_mask = torch.ones(batch, past + 1, dtype=torch.long)
        pos = torch.full((batch, 1), past)
        caches = {k: m(input_ids=prompt, use_cache=True).past_key_values for k, m in (("stock", stock), ("engine", engine))}
        # the same prompt's cache for every onnx graph, from torch (a batched_mm prefill would copy weights per token)
        layers = caches["stock"].layers
        pasts = {f"past_key_values.{i}.{kv}": getattr(layer, f"{kv}s").numpy() for i, layer in enumerate(layers)
                 for kv in ("key", "value")}
        step = {"input_ids": new.numpy(), "attention_mask": full_mask.numpy(), "position_ids": pos.numpy(), **pasts}
        fns = {f"onnx_{f}": (lambda s=with_past: s.run(["logits"], step)) for f, (_, with_past) in sessions.items()}

        def torch_step(model, cache):
            model(input_ids=new, attention_mask=full_mask, position_ids=pos, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the new token: back to the prompt for the next round

        fns["torch_stock"] = lambda: torch_step(stock, caches["stock"])
        fns["torch_engine"] = lambda: torch_step(engine, caches["engine"])
        rows.append(_row(name, params, "decode", batch, 1, past, interleaved(fns, repeats, 2, "torch_stock")))
        print(json.dumps(rows[-2:], indent=1), flush=True)
    return rows


GATHER_LIMIT = 2 << 30  # batched_mm copies one expert weight per routed token: skip prefills past 2 GiB of copies


def _gather_bytes(model, tokens: int) -> int:
    c = model.config
    return tokens * c.num_experts_per_tok * 3 * c.intermediate_size * c.hidden_size * 4


def _row(model, params, workload, batch, length, past, timing) -> dict:
    tokens = batch * length
    return {"model": model, "params": params, "workload": workload, "batch": batch, "new_tokens": length,
            "past": past,
            "ms": {k: round(v["median_s"] * 1e3, 3) for k, v in timing.items()},
            "ms_range": {k: [round(v["min_s"] * 1e3, 3), round(v["max_s"] * 1e3, 3)] for k, v in timing.items()},
            "ratio_to_torch_stock": {k: round(v["ratio"], 3) for k, v in timing.items()},
            "tokens_per_s": {k: round(tokens / v["median_s"], 1) for k, v in timing.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="demo size only, batch 1, short sequences; prints, writes nothing")
    p.add_argument("--models", default="demo,mixtral-90m", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--batches", default="1,8", help="batch sizes")
    p.add_argument("--length", type=int, default=128, help="prefill tokens per sequence")
    p.add_argument("--past", type=int, default=128, help="cache length of the decode step")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (after 2 warm-up rounds)")
    p.add_argument("--threads", default=f"1,{os.cpu_count()}", help="onnxruntime intra-op and torch threads; a comma list "
                   "runs each (one thread is far less disturbed by other load on a shared machine)")
    p.add_argument("--formulations", default="grouped_mm,batched_mm,fused_cpu",
                   help="experts formulations of the ONNX graphs (fused_cpu: onnxruntime's MoE op)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "onnx_cpu.json")
    args = p.parse_args()
    if args.smoke:
        args.models, args.batches, args.length, args.past, args.repeats, args.threads = "demo", "1", 16, 16, 2, "1"
    runs = []
    for threads in (int(t) for t in str(args.threads).split(",")):
        torch.set_num_threads(threads)
        load = os.getloadavg()[0]
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models.split(","):
                rows += bench_model(name, MODELS[name], [int(b) for b in args.batches.split(",")], args.length, args.past,
                                    args.repeats, threads, args.formulations.split(","), Path(tmp))
        runs.append({"threads": threads, "load_avg_1min_before": round(load, 2),
                     "load_avg_1min_after": round(os.getloadavg()[0], 2), "rows": rows})
    result = {
        "benchmark": "onnx_latency", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": {k: version(k) for k in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")},
        "settings": {k: getattr(args, k) for k in ("length", "past", "repeats", "batches", "formulations")},
        "baseline": "torch_stock (stock transformers eager, default experts implementation), timed in the same rounds",
        "runs": runs,
    }
    if args.smoke:
        print(json.dumps(result, indent=1))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
