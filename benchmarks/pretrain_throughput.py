"""Pretraining throughput of the real trainer (DeepSpeed engine, bf16, ZeRO-1) on GPUs.

Each run is one ``Trainer.fit``: ``2 * --measure`` optimizer steps, tokens/s taken over the last
``--measure`` (the first half warms up: allocator, autotuning, Triton compilation). A run is named
``MODEL[:OPTION...]``: MODEL is ``moe``, ``dense-active`` or ``dense-total`` (Llama models matched on
active or total parameters) or ``dense-sameattn`` (the MoE model with a dense MLP in each MoE block,
``same_attention_dense``); options are ``gaN``
(micro-batches per optimizer step, default 1), ``epN`` (expert-parallel ranks), ``z2`` (ZeRO-2
instead of ZeRO-1), ``z0`` (no ZeRO: the engine's fused master-weight AdamW, ``training/master_adamw.py``), ``foreach`` (torch's multi-tensor AdamW instead of the
fused kernel), ``profile`` (torch.profiler over three warm-up steps; the tables and trace are kept;
profiled runs are left out of the merged timings: launches stay slower after the profiler stops),
``torchrouter`` (the PyTorch router instead of its fused kernel: the before of that change),
``unfusedmonitor`` (the router monitor's own PyTorch statistics instead of the sums from the fused router), and
``f32acc`` (a probe: DeepSpeed's BF16_Optimizer with fp32 gradient accumulation instead of ZeRO's
bf16 gradients; the trainer does not offer it), ``dssync`` (DeepSpeed's throughput timer left on: two
device syncs per micro-batch, the trainer's default before 2026-12-02), ``selfreduce`` (at ZeRO-0 on one
GPU, DeepSpeed's all-reduce of every gradient with itself left on: the before of that change),
``int64sort`` (the dispatch plan sorts int64 expert ids instead of uint8/int16 ones: the before of that),
``eagernorm`` (``fused_norms: false``: transformers' eager RMSNorms instead of ``models/norms.py``'s kernels: the before of that),
``indexsel`` (the forward permute as an ``index_select`` instead of ``dispatch_kernels.scatter_rows``: the before of that),
``graphs`` (``cuda_graphs: true``: the MoE layers replayed from CUDA graphs after step 1; a no-op for dense models),
``bf16moments`` (``moment_dtype: bf16``: AdamW's moments stored in bf16, with ``z0``; dense runs take it too),
``cutlass`` (the expert GEMMs on the per-shape tuned CUTLASS kernels of ``moe/cutlass_gemm.py``, built from the
CUTLASS checkout in ``$CUTLASS_DIR``; a no-op for dense models) and ``deepgemm`` (the expert GEMMs' forward and input
gradients on DeepGEMM, ``moe/deepgemm_gemm.py``, from the source tree in ``$DEEPGEMM_DIR``; a no-op for dense models).

    # one process, runs in the order given (interleave MoE and dense so drift hits both)
    python benchmarks/pretrain_throughput.py --data D --out rows/ --runs moe dense-active moe:ga4 dense-active:ga4
    # several GPUs: one process per GPU, a row per run from rank 0
    torchrun --nproc_per_node 2 benchmarks/pretrain_throughput.py --data D --out rows/ --runs moe:ep2
    deepspeed --num_gpus 2 benchmarks/pretrain_throughput.py --data D --out rows/ --runs moe:ep2
    # the committed result: every MoE/dense pair with the same options, and EP=N vs one GPU
    python benchmarks/pretrain_throughput.py --merge rows/*.json --out benchmarks/results/pretrain_h100.json

MFU uses PaLM's 6N + 12LDS FLOPs per token (``training/flops.py``), N the active parameters.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {"moe": "", "dense-active": "active", "dense-total": "total", "dense-sameattn": "sameattn"}


def same_attention_dense(arch: str, preset: str, data: str, seed: int = 0):
    """The MoE model itself with every MoE block replaced by a SwiGLU MLP of the active width
    (K * F_expert + shared): the same attention (OLMoE's q/k norms included), norms and embeddings,
    so the step ratio against it is the MoE blocks' own cost. ``dense-active`` is a Llama model."""
    import torch

    from moe_engine.models.adapters import moe_layers
    from moe_engine.models.build import build_model
    from moe_engine.moe.layer import SharedExpert
    from moe_engine.training.trainer import dense_width

    vocab = json.loads((Path(data) / "manifest.json").read_text())["vocab_size"]
    model = build_model(arch, preset, seed=seed, vocab_size=vocab)
    targets = set(moe_layers(model))
    torch.manual_seed(seed)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child in targets:
                setattr(parent, name, SharedExpert(model.config.hidden_size, dense_width(child, "active", model.config)))
    assert not moe_layers(model)
    return model


def parse_run(name: str) -> dict:
    model, *options = name.split(":")
    if model not in MODELS:
        raise SystemExit(f"run {name!r}: model must be one of {sorted(MODELS)}")
    spec = {"name": name, "dense": MODELS[model], "grad_accum": 1, "ep_size": 1, "fused": True, "profile": False, "zero": 1,
            "fused_router": True, "fused_monitor": True, "f32acc": False,
            "dssync": False, "selfreduce": False, "int64sort": False, "graphs": False, "bf16moments": False,
            "cutlass": False, "deepgemm": False, "eagernorm": False, "indexsel": False}
    for opt in options:
        if opt.startswith("ga") and opt[2:].isdigit():
            spec["grad_accum"] = int(opt[2:])
        elif opt.startswith("ep") and opt[2:].isdigit():
            spec["ep_size"] = int(opt[2:])
        elif opt == "foreach":
            spec["fused"] = False
        elif opt == "profile":
            spec["profile"] = True
        elif opt == "torchrouter":
            spec["fused_router"] = False
        elif opt == "unfusedmonitor":
            spec["fused_monitor"] = False
        elif opt in ("f32acc", "dssync", "selfreduce", "int64sort", "graphs", "bf16moments", "cutlass", "deepgemm", "eagernorm",
                     "indexsel"):
            spec[opt] = True
        elif opt.startswith("z") and opt[1:] in ("0", "1", "2"):
            spec["zero"] = int(opt[1:])
        else:
            raise SystemExit(f"run {name!r}: unknown option {opt!r} (gaN, epN, z0, z1, z2, foreach, profile, torchrouter, unfusedmonitor, f32acc, dssync, selfreduce, int64sort, graphs, bf16moments, cutlass, deepgemm, eagernorm, indexsel)")
    return spec


def run_one(args, spec: dict, out_dir: Path, index: int) -> None:
    import torch
    import torch.distributed as dist

    from benchmarks.moe_layer import environment
    from moe_engine.moe import dispatch, router_kernels
    from moe_engine.training import loop as loop_mod
    from moe_engine.training.trainer import Trainer

    ds_config, reduces = loop_mod.TrainLoop._ds_config, loop_mod.TrainLoop._reduces_gradients
    router_kernels.FUSED.update(enabled=spec["fused_router"], monitor=spec["fused_monitor"])
    extra = {}
    if spec["f32acc"]:
        extra["data_types"] = {"grad_accum_dtype": "fp32"}
    if spec["dssync"]:
        extra["timers"] = {"throughput": {"enabled": True, "synchronized": True}}
    if extra:
        loop_mod.TrainLoop._ds_config = lambda self: {**ds_config(self), **extra}
    if spec["selfreduce"]:
        loop_mod.TrainLoop._reduces_gradients = lambda self, cfg: True
    narrow_keys = dispatch.sort_key_dtype
    if spec["int64sort"]:
        dispatch.sort_key_dtype = lambda num_ids: torch.int64
    dispatch.SCATTER["enabled"] = not spec["indexsel"]
    if spec["cutlass"]:
        from moe_engine.moe import cutlass_gemm

        cutlass_gemm.enable(os.environ["CUTLASS_DIR"], Path(".cache/moe-lab-kernels"))
    if spec["deepgemm"]:
        from moe_engine.moe import deepgemm_gemm

        deepgemm_gemm.enable(os.environ["DEEPGEMM_DIR"], Path(".cache/moe-lab-kernels"))
    try:
        _run_one(args, spec, out_dir, index, Trainer, environment)
    finally:
        if spec["cutlass"]:
            cutlass_gemm.disable()
        if spec["deepgemm"]:
            deepgemm_gemm.disable()
        router_kernels.FUSED.update(enabled=True, monitor=True)
        loop_mod.TrainLoop._ds_config, loop_mod.TrainLoop._reduces_gradients = ds_config, reduces
        dispatch.sort_key_dtype = narrow_keys
        dispatch.SCATTER["enabled"] = True


def _run_one(args, spec, out_dir, index, Trainer, environment) -> None:
    import torch
    import torch.distributed as dist

    steps = 2 * args.measure
    held_before = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None  # leak check across runs
    with tempfile.TemporaryDirectory() as tmp:
        model = same_attention_dense(args.arch, args.preset, args.data) if spec["dense"] == "sameattn" else None
        trainer = Trainer(
            model, data=args.data, out_dir=tmp, arch=args.arch, preset=args.preset, steps=steps,
            micro_batch_size=args.micro_batch_size, grad_accum=spec["grad_accum"], ep_size=spec["ep_size"], zero_stage=spec["zero"],
            precision="auto", fused_adamw=spec["fused"], log_every=args.measure, save_every=0, eval_batches=0,
            warmup_steps=5, lr=3e-4, dense_baseline="" if spec["dense"] == "sameattn" else spec["dense"], router={"aux_loss_coef": 0.01},
            profile_steps=[args.measure // 2, args.measure // 2 + 2] if spec["profile"] else [],
            cuda_graphs=spec["graphs"], moment_dtype="bf16" if spec["bf16moments"] else "float32",
            fused_norms=not spec["eagernorm"],
        )
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        result = trainer.fit()
        world, rank = dist.get_world_size(), dist.get_rank()
        label = spec["name"].replace(":", "_")
        if spec["profile"] and rank == 0:
            shutil.copytree(Path(tmp) / "profile", out_dir / f"profile_{args.preset}_{label}", dirs_exist_ok=True)
    if rank == 0:
        m = result.metrics
        seq_len = json.loads((Path(args.data) / "manifest.json").read_text())["seq_len"]
        row = {
            "run": spec["name"], "order": index, "arch": args.arch, "preset": args.preset, "dense_baseline": spec["dense"],
            "fused_adamw": spec["fused"], "fused_router": spec["fused_router"], "fused_monitor": spec["fused_monitor"], "fp32_grad_accum": spec["f32acc"],
            "deepspeed_timer_syncs": spec["dssync"], "self_all_reduce": spec["selfreduce"], "int64_sort_keys": spec["int64sort"],
            "cuda_graphs": spec["graphs"], "expert_gemms": "deepgemm" if spec["deepgemm"] else "cutlass" if spec["cutlass"] else "torch",
            "fused_norms": not spec["eagernorm"], "moment_dtype": "bf16" if spec["bf16moments"] else "float32",
            "zero_stage": spec["zero"], "profiled_steps": spec["profile"], "world_size": world, "ep_size": spec["ep_size"],
            "micro_batch_size": args.micro_batch_size, "grad_accum": spec["grad_accum"], "seq_len": seq_len,
            "steps": steps, "timed_steps": args.measure,
            "tokens_per_s": m["train/tokens_per_s"], "tokens_per_s_per_gpu": m["train/tokens_per_s"] / world,
            "mfu": m.get("cost/mfu"), "tflops_per_s_per_gpu": m["cost/tflops_per_s"] / world,
            "usd_per_million_tokens": m.get("cost/usd_per_million_tokens"),
            "loss_first": result.losses[0], "loss_last": result.losses[-1], "losses": result.losses,
            "memory_held_before_gib": held_before,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "env": environment(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        }
        row["step_time_s"] = args.micro_batch_size * spec["grad_accum"] * seq_len / row["tokens_per_s_per_gpu"]
        path = out_dir / f"{args.preset}_mb{args.micro_batch_size}_{label}_w{world}_{index:02d}.json"
        path.write_text(json.dumps(row, indent=2))
        print(json.dumps({k: v for k, v in row.items() if k != "env"}), flush=True)
    del trainer, result
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.warmup_run and args.runs:  # the first run of a process was the fastest in the third session: spend it on nothing
        with tempfile.TemporaryDirectory() as scratch:
            run_one(args, parse_run(args.runs[0]), Path(scratch), -1)
    for index, name in enumerate(args.runs):
        run_one(args, parse_run(name), out_dir, index)
    return 0


BEFORE_OPTIONS = {"torchrouter", "unfusedmonitor", "dssync", "selfreduce", "int64sort", "eagernorm", "indexsel"}  # code as it was before a change
AFTER_OPTIONS = {"graphs", "bf16moments", "cutlass", "deepgemm"}  # opt-in features: compared with the same run without them
MOE_ONLY_OPTIONS = {"torchrouter", "unfusedmonitor", "int64sort", "graphs", "cutlass", "deepgemm"}  # dense models have no router (nothing to graph): their pair is the run without it


def _options(run: str) -> str:
    return ":".join(o for o in run.split(":")[1:] if o not in MOE_ONLY_OPTIONS)


def merge(files: list[str], out: str, note: str) -> int:
    """Every MoE run against the dense-active (and dense-sameattn) runs with the same options and micro-batch
    (median over repeats); a run with a before-option (``BEFORE_OPTIONS``) against the same run without it
    (``change_speedup``, tokens/s after / before), and each multi-GPU MoE run against the one-GPU MoE run
    with its other options equal.
    Rows are only compared within one folder: put each device call's rows in its own folder."""
    rows = []
    for f in sorted(files):
        row = json.loads(Path(f).read_text())
        row["source"] = Path(f).parent.name
        rows.append(row)
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r["profiled_steps"]:  # CUPTI keeps slowing kernel launches after the profiler stops
            by.setdefault((r["source"], r["preset"], r["micro_batch_size"], r["run"], r["world_size"]), []).append(r)

    def median(rs, key):
        return statistics.median(r[key] for r in rs)

    summary = {}
    for (source, preset, mb, run, world), rs in sorted(by.items()):
        name = f"{source}: {preset} mb{mb} {run}"
        if run.startswith("moe") and world == 1:
            opts = _options(run)
            dense = by.get((source, preset, mb, "dense-active" + (":" + opts if opts else ""), 1))
            entry = {
                "device": rs[0]["env"]["device"], "tokens_per_s": [r["tokens_per_s"] for r in rs], "mfu": [r["mfu"] for r in rs],
                "step_time_s_median": median(rs, "step_time_s"),
            }
            if dense:
                entry["dense_active_tokens_per_s"] = [r["tokens_per_s"] for r in dense]
                entry["step_time_vs_dense_active"] = median(rs, "step_time_s") / median(dense, "step_time_s")
                entry["step_time_vs_dense_active_range"] = [
                    min(r["step_time_s"] for r in rs) / max(d["step_time_s"] for d in dense),
                    max(r["step_time_s"] for r in rs) / min(d["step_time_s"] for d in dense),
                ]
            same = by.get((source, preset, mb, "dense-sameattn" + (":" + opts if opts else ""), 1))
            if same:
                entry["dense_sameattn_tokens_per_s"] = [r["tokens_per_s"] for r in same]
                entry["step_time_vs_dense_sameattn"] = median(rs, "step_time_s") / median(same, "step_time_s")
            model, *run_opts = run.split(":")
            after = ":".join([model] + [o for o in run_opts if o not in BEFORE_OPTIONS])
            if after != run and (after_rs := by.get((source, preset, mb, after, 1))):  # a change's before and after
                entry["change_speedup"] = median(after_rs, "tokens_per_s") / median(rs, "tokens_per_s")
            without = ":".join([model] + [o for o in run_opts if o not in AFTER_OPTIONS])
            if without != run and (without_rs := by.get((source, preset, mb, without, 1))):  # an opt-in feature's effect
                entry["option_speedup"] = median(rs, "tokens_per_s") / median(without_rs, "tokens_per_s")
            plain = by.get((source, preset, mb, "moe", 1))
            if plain and run != "moe":  # an option's effect on the MoE itself, measured in the same call
                entry["tokens_per_s_vs_moe_default"] = median(rs, "tokens_per_s") / median(plain, "tokens_per_s")
            summary[name] = entry
        elif run.startswith("moe") and world > 1:
            base_opts = ":".join(o for o in _options(run).split(":") if o and not o.startswith("ep"))
            single = by.get((source, preset, mb, "moe" + (":" + base_opts if base_opts else ""), 1))
            if single:
                summary[f"{name} x{world}"] = {
                    "device": rs[0]["env"]["device"], "world_size": world,
                    "tokens_per_s_per_gpu": [r["tokens_per_s_per_gpu"] for r in rs],
                    "per_gpu_vs_1gpu": median(rs, "tokens_per_s_per_gpu") / median(single, "tokens_per_s_per_gpu"),
                }
    Path(out).write_text(json.dumps({"note": note, "summary": summary, "runs": rows}, indent=2))
    print(json.dumps({k: {m: v[m] for m in v if "vs" in m} for k, v in summary.items()}, indent=2))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a prepared data dir (moe-lab data prepare --seq-len 2048)")
    ap.add_argument("--runs", nargs="*", default=["moe", "dense-active"], help="MODEL[:gaN][:epN][:z2][:foreach][:profile] ...")
    ap.add_argument("--arch", default="mixtral")
    ap.add_argument("--preset", default="mixtral-0.8b")
    # 16 x 2048 tokens: what fits an 80 GB card with its optimizer state; at 8 the MoE forward is
    # launch-bound on some hosts (see benchmarks/NOTES.md)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--measure", type=int, default=30, help="optimizer steps timed, after as many warm-up steps")
    ap.add_argument("--warmup-run", action="store_true",
                    help="run the first run's settings once before the listed runs and discard it (in the third session the "
                         "first run of a process was ~10%% faster than later ones; not in the tenth: NOTES.md)")
    ap.add_argument("--merge", nargs="*", help="row files to merge into --out")
    ap.add_argument("--note", default="", help="what the merged result is (machine, calls, code state)")
    ap.add_argument("--out", required=True, help="a directory for rows, or the merged JSON file with --merge")
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.note)
    if not args.data:
        ap.error("--data is required to run")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
