"""Quality per FLOP: an MoE against its dense baselines at equal training FLOPs and at equal tokens.

For one MoE configuration (a params.yaml section plus ``--set`` overrides, the grammar of ``moe-lab
pretrain``), over N seeds, the project's own trainer (``training.trainer.Trainer``) trains:

* ``moe``: the MoE;
* ``dense_active``: the dense model matched on active parameters (``dense_baseline: active``, MLP
  width K x F): the same FLOPs per token, so equal steps are equal FLOPs (up to the router's D x E
  matmul, which the FLOP counts include);
* ``dense_total``: matched on total parameters (width E x F), the same steps: equal tokens, more FLOPs;
* ``dense_total_flops``: the same dense-total model trained for the steps whose cumulative FLOPs equal
  the MoE run's (``flop_matched_steps``), with its own full warmup + cosine schedule, so the
  equal-FLOPs point is a finished run, not the middle of a longer one.

Every run has the same seed-determined data order as its MoE. During training, validation and
out-of-domain loss are measured every ``--eval-every`` steps on ``--curve-batches`` batches (the
curves, against cumulative training FLOPs); at the end each model is scored on the whole held-out
splits by ``evaluation.evaluate.evaluate_model`` (the numbers the margins use), and optionally on
lm-eval tasks (``--tasks``). Tokens/s is training time only (the curve evaluations excluded); $ per
million tokens is ``training.flops.usd_per_million_tokens`` at a stated $/hour for the device.

    python benchmarks/quality_per_flop.py --data outputs/data --params params.yaml --section pretrain \\
        --set steps=1000 --seeds 0 1 2 --out benchmarks/results/quality_per_flop_cpu.json
    python benchmarks/quality_per_flop.py --smoke          # seconds, CPU: checks the script end to end

Writes ``OUT`` (JSON: device, versions, date, config, per seed per model, the MoE-minus-baseline margins
with mean, std, min and max over seeds), ``OUT.png`` (loss against training FLOPs, every model and
seed), ``OUT.csv`` (the curves, long form) and, with ``--plots-dir``, one CSV per model (seed means)
for a DVC plot over several files. With ``MLFLOW_TRACKING_URI`` set every training run is an MLflow run
(the trainer's own tracking, with the curves as ``val/loss`` and ``ood/loss``) and the summary is one
more (``tracking.lineage.stage_run``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_engine.training.loop import Callback  # noqa: E402

MODELS = ("moe", "dense_active", "dense_total", "dense_total_flops")
DENSE = {"moe": "", "dense_active": "active", "dense_total": "total", "dense_total_flops": "total"}
BASELINES = ("dense_active", "dense_total", "dense_total_flops")
# $ per device-hour when --usd-per-hour is not given: the trainer's GPU default, and a 2-vCPU cloud VM
# (on-demand prices of that size are about $0.07-0.10/hour) for CPU runs
DEFAULT_USD_PER_HOUR = {"cuda": 2.5, "cpu": 0.10}
SMOKE_SETS = ["steps=6", "micro_batch_size=4", "warmup_steps=2", "log_every=3", "model.num_local_experts=4",
              "model.intermediate_size=32"]


# ----------------------------------------------------------------------------- FLOP matching
def flop_matched_steps(target_flops: float, flops_per_token: float, tokens_per_step: int) -> int:
    """Optimizer steps after which a run spending ``flops_per_token * tokens_per_step`` per step has
    spent ``target_flops``: the nearest whole step, at least one."""
    return max(1, round(target_flops / (flops_per_token * tokens_per_step)))


def build(config, vocab_size: int):
    """The model a PretrainConfig describes (dense baselines included), as the trainer builds it."""
    from moe_engine.models.build import build_model
    from moe_engine.training.trainer import dense_baseline

    model = build_model(config.arch, config.preset, seed=0, router=config.router.set_values(),
                        **{"vocab_size": vocab_size, **config.model})
    return dense_baseline(model, config.dense_baseline) if config.dense_baseline else model


def flops_per_token(config, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token of the model ``config`` (a PretrainConfig) builds, as the trainer counts
    them (PaLM's 6N + 12LDS over active parameters, ``training.flops``)."""
    from moe_engine.training.flops import train_flops_per_token

    return train_flops_per_token(build(config, vocab_size), seq_len)


def run_identity(config: dict, vocab_size: int) -> dict:
    """What determines a run: for a dense baseline its own shape replaces the MoE's model and router
    settings, so MoE configurations with the same active width share one dense-active run."""
    from moe_engine.training.config import PretrainConfig

    if not config["dense_baseline"]:
        return config
    shape = build(PretrainConfig.from_dict(config), vocab_size).config.to_dict()
    shape.pop("transformers_version", None)
    return {**{k: v for k, v in config.items() if k not in ("model", "router", "router_monitor")}, "dense_shape": shape}


# ----------------------------------------------------------------------------- the curve
class Curve(Callback):
    """Validation and out-of-domain loss every ``every`` steps and at the last one, with the cumulative
    training FLOPs; also the training time without these evaluations (for tokens/s)."""

    name = "quality_curve"

    def __init__(self, every: int, batches: int):
        self.every, self.batches = every, batches
        self.rows: list[dict] = []
        self.started = self.ended = None
        self.eval_s = 0.0

    def pre_step(self, loop):
        if self.started is None:
            self.started = time.perf_counter()

    def post_step(self, loop):
        self.ended = time.perf_counter()
        if loop.step % self.every and loop.step != loop.config.steps:
            return
        t = time.perf_counter()
        val, ood = loop.evaluate("val", self.batches), loop.evaluate("ood", self.batches)
        self.eval_s += time.perf_counter() - t
        tokens = loop.tokens_per_step * loop.step
        self.rows.append({"step": loop.step, "tokens": tokens, "flops": tokens * loop.flops_per_token,
                          "val_loss": val, "ood_loss": ood, "train_loss": loop.losses[-1]})
        points = {k: v for k, v in (("val/loss", val), ("ood/loss", ood)) if v is not None}
        for cb in loop.callbacks:  # the MLflow run (when tracking is on) records the curve at this step
            if cb is not self:
                cb.on_log(loop, points)
        self.ended += time.perf_counter() - t  # evaluation is not training time

    def train_seconds(self) -> float:
        return (self.ended - self.started - self.eval_s) if self.started is not None else 0.0


def _trainer_with(curve: Curve, **kwargs):
    from moe_engine.training.trainer import Trainer

    class CurveTrainer(Trainer):  # the project's trainer with one more callback
        def _callbacks(self):
            return [*super()._callbacks(), curve]

    return CurveTrainer(**kwargs)


# ----------------------------------------------------------------------------- one run
def train_one(base: dict, data: Path, vocab_size: int, kind: str, seed: int, steps: int, work: Path, args) -> dict:
    """Train and score one model; the record is kept in ``work`` and reused when asked again (None:
    ``--no-train`` and no record)."""
    import torch

    from moe_engine.evaluation.evaluate import evaluate_model

    config = {**base, "seed": seed, "steps": steps, "dense_baseline": DENSE[kind], "eval_every": 0,
              "eval_batches": 0, "save_every": 0, "snapshot_every": 0, "profile_steps": []}
    identity = run_identity(config, vocab_size)
    data_id = hashlib.sha256((Path(data) / "manifest.json").read_bytes()).hexdigest()  # the data, wherever it lies
    key = hashlib.sha256(json.dumps([identity, data_id, args.eval_every, args.curve_batches],
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = work / f"{kind}_seed{seed}_{key}"
    record_path = out / "record.json"
    if record_path.exists():
        print(f"[qpf] {kind} seed {seed}: reusing {out}", flush=True)
        return json.loads(record_path.read_text())
    if args.no_train:
        print(f"[qpf] {kind} seed {seed}: no record in {work} (--no-train), left out", flush=True)
        return None
    curve = Curve(args.eval_every, args.curve_batches)
    trainer = _trainer_with(curve, data=data, config=config, out_dir=out, stage="quality_per_flop", fresh=True)
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    summary = json.loads((out / "metrics.json").read_text())
    t1 = time.perf_counter()
    scores = evaluate_model(out / "model", data, batch_size=args.eval_batch_size, expect_moe=kind == "moe")
    size, cost = summary["size"], summary["cost"]  # the trainer's nested metrics.json
    tokens_per_s = cost["tokens_trained"] / max(curve.train_seconds(), 1e-9)
    record = {
        "model": kind, "seed": seed, "steps": steps, "dense_baseline": DENSE[kind],
        "val_loss": scores.get("val_loss"), "ood_loss": scores.get("ood_loss"),
        "val_perplexity": scores.get("val_perplexity"), "ood_perplexity": scores.get("ood_perplexity"),
        "domains": {name: d["loss"] for name, d in scores["domains"].items()},
        "params_total": size["params_total"], "params_active": size["params_active"],
        "flops_per_token": size["flops_per_token"], "tokens_trained": cost["tokens_trained"],
        "train_flops": cost["train_flops"], "final_train_loss": summary["loss"]["train_final"],
        "tokens_per_s": tokens_per_s, "train_seconds": curve.train_seconds(), "fit_wall_seconds": wall,
        "score_seconds": time.perf_counter() - t1, "load_average_end": os.getloadavg()[0],
        "mlflow_run_id": result.mlflow_run_id, "model_dir": str(out / "model"),
        "device_type": "cuda" if torch.cuda.is_available() else "cpu",
        "environment": environment("cuda" if torch.cuda.is_available() else "cpu"), "curve": curve.rows,
    }
    record_path.write_text(json.dumps(record, indent=1))
    print(f"[qpf] {kind} seed {seed}: val {record['val_loss']:.4f} ood {record['ood_loss']:.4f} "
          f"{tokens_per_s:,.0f} tok/s, {wall:.0f} s", flush=True)
    return record


# ----------------------------------------------------------------------------- summary
def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def margins(runs: dict[str, dict[int, dict]], seeds: list[int]) -> dict:
    """MoE minus each baseline, per seed (paired: same seed, same data order), val and ood loss, with the
    seed spread and the paired t statistic; ``moe_better_every_seed`` and ``beyond_seed_spread`` (every
    seed below zero and the mean further from zero than the standard deviation of the margin and of
    either model's loss)."""
    out = {}
    for base in BASELINES:
        if base not in runs:
            continue
        row = {}
        for metric in ("val_loss", "ood_loss"):
            diffs = [runs["moe"][s][metric] - runs[base][s][metric] for s in seeds]
            stats = spread(diffs)
            noise = max(stats["std"], *(spread([runs[m][s][metric] for s in seeds])["std"] for m in ("moe", base)))
            # paired t statistic of the margin (Student's t with n - 1 degrees of freedom)
            t = stats["mean"] / (stats["std"] / math.sqrt(len(diffs))) if len(diffs) > 1 and stats["std"] > 0 else None
            row[metric] = {**stats, "paired_t": t, "per_seed": dict(zip(map(str, seeds), diffs)),
                           "moe_better_every_seed": stats["max"] < 0,
                           # one seed has no spread to judge against
                           "beyond_seed_spread": stats["max"] < 0 and -stats["mean"] > noise if len(seeds) > 1 else None}
        out[f"moe_minus_{base}"] = row
    return out


def per_model(runs: dict[str, dict[int, dict]], seeds: list[int], usd_per_hour: float) -> dict:
    from moe_engine.training.flops import usd_per_million_tokens

    table = {}
    for kind, by_seed in runs.items():
        first = by_seed[seeds[0]]
        tps = [by_seed[s]["tokens_per_s"] for s in seeds]
        table[kind] = {
            "steps": first["steps"], "params_total": first["params_total"], "params_active": first["params_active"],
            "flops_per_token": first["flops_per_token"], "tokens_trained": first["tokens_trained"],
            "train_flops": first["train_flops"],
            **{m: spread([by_seed[s][m] for s in seeds]) for m in ("val_loss", "ood_loss")},
            "tokens_per_s": spread(tps),
            "usd_per_million_tokens": usd_per_million_tokens(statistics.fmean(tps), 1, usd_per_hour),
            "fit_wall_seconds": spread([by_seed[s]["fit_wall_seconds"] for s in seeds]),
        }
    return table


def curve_rows(runs: dict[str, dict[int, dict]]) -> list[dict]:
    return [{"model": kind, "seed": seed, **row} for kind, by_seed in runs.items()
            for seed, rec in sorted(by_seed.items()) for row in rec["curve"]]


def mean_curves(rows: list[dict]) -> dict[str, list[dict]]:
    """Per model, the curve averaged over seeds at each step (all seeds share the steps)."""
    by: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        by.setdefault(r["model"], {}).setdefault(r["step"], []).append(r)
    return {kind: [{"step": step, "tokens": pts[0]["tokens"], "flops": pts[0]["flops"],
                    **{m: statistics.fmean(p[m] for p in pts) for m in ("val_loss", "ood_loss")
                       if all(p[m] is not None for p in pts)}}
                   for step, pts in sorted(steps.items())] for kind, steps in by.items()}


# ----------------------------------------------------------------------------- files
def write_csv(path: Path, rows: list[dict]) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_text(path, buf.getvalue())


def _write_text(path: Path, text: str) -> None:
    from moe_engine.io import write_text

    write_text(path, text)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Validation (left) and out-of-domain (right) loss against cumulative training FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_engine.io import atomic_output

    colours = {"moe": "tab:red", "dense_active": "tab:blue", "dense_total": "tab:green", "dense_total_flops": "tab:olive"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for ax, metric, name in ((axes[0], "val_loss", "validation (in domain)"), (axes[1], "ood_loss", "out of domain")):
        seen = set()
        for (kind, seed) in sorted({(r["model"], r["seed"]) for r in rows}):
            pts = [r for r in rows if r["model"] == kind and r["seed"] == seed and r[metric] is not None]
            if not pts:
                continue
            ax.plot([p["flops"] for p in pts], [p[metric] for p in pts], marker="o", ms=3, lw=1.2, alpha=0.8,
                    color=colours.get(kind), label=kind if kind not in seen else None)
            seen.add(kind)
        ax.set_xscale("log")
        ax.set_xlabel("cumulative training FLOPs")
        ax.set_ylabel(f"{name} loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_output(path, directory=False) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- the whole benchmark
def smoke_data(work: Path) -> Path:
    """A small shards directory from three files of the demo corpus (milton is the out-of-domain split)."""
    from moe_engine.data import DataConfig, prepare

    demo = Path(__file__).resolve().parents[1] / "data" / "demo"
    config = DataConfig.from_dict({"tokenizer": {"vocab_size": 512}, "shards": {"seq_len": 32},
                                   "ingest": {"domain_by": "file", "ood_domains": ["milton"]}})
    return prepare([str(demo / f) for f in ("milton.txt.xz", "sqlite_docs.txt.xz", "kjv_bible.txt.xz")],
                   out_dir=work / "data", config=config)


def environment(device: str) -> dict:
    import datetime
    import platform

    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")}
    for mod in ("transformers", "deepspeed"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:
            env[mod] = f"unavailable ({type(exc).__name__})"
    return env


def benchmark(args) -> dict:
    import torch

    from moe_engine.config import load_section
    from moe_engine.data.shards import read_manifest
    from moe_engine.training.config import PretrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="quality_per_flop."))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else smoke_data(work)
    manifest = read_manifest(data)
    sets = (SMOKE_SETS if args.smoke else []) + args.set
    config = load_section(PretrainConfig, args.params, args.section, sets)
    config.dense_baseline = ""
    base = config.to_dict()
    seq_len, vocab = int(manifest["seq_len"]), int(manifest["vocab_size"])
    tokens_per_step = config.micro_batch_size * config.grad_accum * seq_len  # one process
    moe_fpt = flops_per_token(config, vocab, seq_len)
    total_fpt = flops_per_token(config.override({"dense_baseline": "total"}, "pretrain"), vocab, seq_len)
    matched = flop_matched_steps(moe_fpt * tokens_per_step * config.steps, total_fpt, tokens_per_step)
    steps = {"moe": config.steps, "dense_active": config.steps, "dense_total": config.steps, "dense_total_flops": matched}
    if args.eval_every <= 0:
        args.eval_every = max(1, config.steps // 10)
    runs: dict[str, dict[int, dict]] = {}
    t0 = time.perf_counter()
    try:
        for seed in args.seeds:
            for kind in args.models:
                record = train_one(base, data, vocab, kind, seed, steps[kind], work, args)
                if record is not None:
                    runs.setdefault(kind, {})[seed] = record
        # seeds every model has (--no-train may find some missing): the margins are paired
        args.seeds = [s for s in args.seeds if all(s in by_seed for by_seed in runs.values())]
        if not runs or not args.seeds:
            raise SystemExit(f"no complete seed to report in {work}")
        task_scores = score_tasks(runs, data, work, args) if args.tasks else None
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    trained_on = next(iter(next(iter(runs.values())).values())).get("device_type", device)
    usd = args.usd_per_hour if args.usd_per_hour is not None else DEFAULT_USD_PER_HOUR[trained_on]
    rows = curve_rows(runs)
    result = {
        "benchmark": "quality_per_flop", "smoke": args.smoke,
        # where the models trained (from their records: --no-train aggregates runs made elsewhere)
        "environment": next(iter(next(iter(runs.values())).values())).get("environment", environment(device)),
        "aggregated_on": environment(device),
        "command": " ".join(sys.argv), "data": {"dir": str(data), "seq_len": seq_len, "vocab_size": vocab,
                                                "train_tokens": manifest["splits"]["train"]["tokens"]},
        "config": base, "seeds": args.seeds, "tokens_per_step": tokens_per_step,
        "flop_matching": {"moe_flops_per_token": moe_fpt, "dense_total_flops_per_token": total_fpt,
                          "dense_total_flops_steps": matched,
                          "dense_total_flops_train_flops_ratio": matched * total_fpt / (config.steps * moe_fpt)},
        "usd_per_device_hour": usd, "wall_seconds": time.perf_counter() - t0,
        "models": per_model(runs, args.seeds, usd), "runs": {k: {str(s): {x: y for x, y in r.items() if x != "curve"}
                                                                   for s, r in v.items()} for k, v in runs.items()},
    }
    if "moe" in runs:
        result["margins"] = margins(runs, args.seeds)
    if task_scores is not None:
        result["tasks"] = task_scores
    if args.tried:
        result["tried"] = json.loads(Path(args.tried).read_text())
    return result, rows


def score_tasks(runs, data: Path, work: Path, args) -> dict:
    """lm-eval accuracy of every final model (``moe_engine.benchmark``), mean over seeds per model."""
    from moe_engine.benchmark.config import BenchmarkConfig
    from moe_engine.benchmark.run import run as run_tasks

    models = {f"{kind}_seed{seed}": rec["model_dir"] for kind, by_seed in runs.items() for seed, rec in by_seed.items()}
    config = BenchmarkConfig(tasks=args.tasks, limit=args.task_limit, batch_size=args.eval_batch_size)
    metrics = run_tasks(config, models, data, work / "tasks")
    out: dict = {"per_run": {name: metrics[name] for name in models}, "mean_acc": {}}
    for kind in runs:
        for task in args.tasks:
            accs = [metrics[f"{kind}_seed{s}"][task]["acc"] for s in runs[kind] if task in metrics[f"{kind}_seed{s}"]]
            if accs:
                out["mean_acc"].setdefault(kind, {})[task] = spread(accs)
    return out


def write_outputs(result: dict, rows: list[dict], out: Path, plots_dir: Path | None) -> None:
    from moe_engine.io import write_json

    write_csv(out.with_suffix(".csv"), rows)
    cfg = result["config"]
    title = (f"{cfg['arch']} {cfg['preset']} {json.dumps(cfg['model'])}, {cfg['steps']} steps x "
             f"{result['tokens_per_step']} tokens, seeds {result['seeds']} ({result['environment']['device']})")
    try:
        plot(rows, out.with_suffix(".png"), title)
    except ImportError as exc:  # e.g. a GPU image without matplotlib: the CSV has the curves
        print(f"no plot ({exc}); the curves are in {out.with_suffix('.csv')}")
    if plots_dir is not None:
        for kind, points in mean_curves(rows).items():
            write_csv(plots_dir / f"{kind}.csv", points)
    write_json(out, result)


def log_mlflow(result: dict, out: Path) -> None:
    from moe_engine.tracking.lineage import flatten, stage_run

    metrics = {k: v for k, v in flatten(result.get("margins", {})).items() if isinstance(v, (int, float))}
    metrics.update({k: v for k, v in flatten({"models": result["models"]}).items() if isinstance(v, (int, float))})
    stage_run("quality_per_flop", {"config": result["config"], "seeds": str(result["seeds"])}, metrics,
              [out, out.with_suffix(".png"), out.with_suffix(".csv")])


def print_summary(result: dict) -> None:
    for kind, m in result["models"].items():
        print(f"{kind:18s} steps {m['steps']:5d}  FLOPs {m['train_flops']:.3e}  val {m['val_loss']['mean']:.4f} "
              f"(sd {m['val_loss']['std']:.4f})  ood {m['ood_loss']['mean']:.4f} (sd {m['ood_loss']['std']:.4f})  "
              f"{m['tokens_per_s']['mean']:,.0f} tok/s  ${m['usd_per_million_tokens']:.4f}/M tokens")
    for name, row in result.get("margins", {}).items():
        for metric, s in row.items():
            print(f"{name:28s} {metric}: mean {s['mean']:+.4f} sd {s['std']:.4f} [{s['min']:+.4f}, {s['max']:+.4f}]"
                  f"{'  beyond seed spread' if s['beyond_seed_spread'] else ''}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a shards directory made by `moe-lab data prepare` (--smoke makes a small one)")
    ap.add_argument("--params", type=Path, help="params.yaml holding the MoE's section (default: built-in defaults)")
    ap.add_argument("--section", default="pretrain", help="the MoE's params section; the baselines take the same settings")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one setting of the section (repeatable), e.g. --set model.num_local_experts=8")
    ap.add_argument("--seeds", type=int, nargs="+", help="model-init and data-order seeds (default: 0 1 2; --smoke: 0 1)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="which models to train")
    ap.add_argument("--eval-every", type=int, default=0, help="curve point every N steps (default: steps / 10)")
    ap.add_argument("--curve-batches", type=int, default=8, help="micro-batches of val and of ood per curve point")
    ap.add_argument("--eval-batch-size", type=int, default=32, help="sequences per forward in the final scoring")
    ap.add_argument("--tasks", nargs="*", default=[], help="lm-eval tasks to score every final model on (e.g. passage_val passage_ood)")
    ap.add_argument("--task-limit", type=int, default=0, help="items per task (0 = all)")
    ap.add_argument("--usd-per-hour", type=float, help="$ per device-hour (default: 2.5 on GPU, 0.10 on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    ap.add_argument("--work", help="keep runs here and reuse finished ones (default: a temporary folder, removed)")
    ap.add_argument("--no-train", action="store_true",
                    help="only gather runs already recorded in --work (e.g. made on another machine); train nothing")
    ap.add_argument("--tried", help="a JSON file of configurations tried, copied into the result")
    ap.add_argument("--out", type=Path, help="result JSON (the .png and .csv go beside it)")
    ap.add_argument("--plots-dir", type=Path, help="also write one CSV per model (seed means) here, for DVC plots")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps, small data: checks the script on CPU")
    args = ap.parse_args(argv)
    if not args.smoke and not args.data:
        ap.error("--data is required (or --smoke)")
    if args.seeds is None:
        args.seeds = [0, 1] if args.smoke else [0, 1, 2]
    result, rows = benchmark(args)
    out = args.out or Path(tempfile.gettempdir()) / "quality_per_flop_smoke.json"
    write_outputs(result, rows, out, args.plots_dir)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        log_mlflow(result, out)
    print_summary(result)
    print(f"result: {out} (+ {out.with_suffix('.png').name}, {out.with_suffix('.csv').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
