"""Fine-tune one base model on one task with one (or each of several) methods, on the shared loop.

    result = finetune("outputs/pretrain/model", "data/tasks/chatterbot_qa", "outputs/finetune", method="lora",
                      retention="outputs/data")

Outputs in ``out_dir`` (one folder per method when several are given, and ``compare.md`` beside them):
``model/`` (a Hugging Face checkpoint with the tokenizer; LoRA merged, loads in stock transformers),
``adapter/`` (LoRA: peft's format, loads with stock ``PeftModel.from_pretrained`` onto the stock base),
``experts.json`` (ESFT: the experts trained per layer and their scores), ``metrics.json`` (before/after:
task loss, token accuracy, exact match, general-domain retention, router drift), ``compare.md``,
``history.csv`` and ``validation/index.html`` (the task data's Data Docs).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_engine.errors import ConfigError, InputError
from moe_engine.finetune import esft, methods
from moe_engine.finetune.config import METHODS, FinetuneConfig
from moe_engine.finetune.data import TaskDataset, TaskEncoder, collate, fitting, load_task, validate_records
from moe_engine.finetune.evaluate import measure, router_choices, router_drift
from moe_engine.models.adapters import moe_layers


@dataclass
class FinetuneResult:
    method: str
    out_dir: Path
    model_dir: Path | None
    adapter_dir: Path | None
    metrics: dict[str, Any]
    losses: list[float] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)  # to MLflow at the end
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    mlflow_run_id: str | None = None


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise InputError(f"no usable tokenizer in {path} ({str(exc).splitlines()[0][:200]}); pass --tokenizer DIR "
                         "(a Hugging Face tokenizer folder)") from None


def _check_base(base: Path) -> None:
    from moe_engine.models.io import check_weight_files

    if not (base / "config.json").is_file():
        raise InputError(f"base model {base} is not a model directory (no config.json); pass a Hugging Face checkpoint "
                         "folder, e.g. outputs/pretrain/model")
    check_weight_files(base)


def finetune(base: str | Path, data: str | Path, out_dir: str | Path = "outputs/finetune", *,
             method: str | list[str] | None = None, config: FinetuneConfig | dict | None = None,
             tokenizer: str | Path | None = None, retention: str | Path | None = None, stage: str = "finetune",
             **overrides) -> FinetuneResult | dict[str, FinetuneResult]:
    """Fine-tune ``base`` (a Hugging Face MoE checkpoint directory) on task ``data``. ``retention``: a
    prepared pretraining data dir whose val/ood shards measure general-domain loss before and after."""
    if isinstance(config, FinetuneConfig):
        config = config.to_dict()
    chosen = [method] if isinstance(method, str) else list(method or [])
    cfg = FinetuneConfig.from_dict({**(config or {}), **overrides, **({"method": chosen[0]} if chosen else {})}, stage)
    chosen = chosen or [cfg.method]
    bad = [m for m in chosen if m not in METHODS]
    if bad:
        raise ConfigError(f"method {', '.join(bad)}: must be one of {', '.join(METHODS)}")
    base, data, out_dir = Path(base), Path(data), Path(out_dir)
    _check_base(base)
    if retention is not None and not (Path(retention) / "manifest.json").is_file():
        raise InputError(f"--retention {retention} has no manifest.json; pass a `moe-lab data prepare` folder (e.g. outputs/data)")
    if len(chosen) == 1:
        return _finetune_one(base, data, out_dir, cfg.replace(method=chosen[0]), tokenizer, retention, stage)
    results = {m: _finetune_one(base, data, out_dir / m, cfg.replace(method=m), tokenizer, retention, stage) for m in chosen}
    from moe_engine.io import write_json, write_text

    write_text(out_dir / "compare.md", compare_table({m: r.metrics for m, r in results.items()}))
    write_json(out_dir / "metrics.json", {m: dvc_metrics(r.metrics) for m, r in results.items()})
    return results


def _finetune_one(base: Path, data: Path, out: Path, cfg: FinetuneConfig, tokenizer, retention, stage) -> FinetuneResult:
    from moe_engine.io import atomic_output, ensure_writable_dir

    ensure_writable_dir(out)
    # the task data's report is built now and published after the model, adapter and metrics: a
    # fine-tune that fails leaves the last good run's outputs, its report included, as they were
    with atomic_output(out / "validation") as report:
        return _train_one(base, data, out, cfg, tokenizer, retention, stage, report)


def _train_one(base: Path, data: Path, out: Path, cfg: FinetuneConfig, tokenizer, retention, stage,
               report: Path) -> FinetuneResult:
    from moe_engine.models.loading import load
    from moe_engine.training import callbacks as cb
    from moe_engine.training.loop import TrainLoop
    from moe_engine.training.objectives import SupervisedObjective

    tok = _load_tokenizer(Path(tokenizer) if tokenizer else base)
    encoder = TaskEncoder(tok, cfg.task.max_length, cfg.task.template)
    train, test, source = load_task(data, cfg.task)
    summary = validate_records(train, encoder, cfg.task, str(data), report)
    summary["report"] = str(out / "validation" / "index.html")  # where it is now, not the temporary it was built in
    if not test:
        raise InputError(f"task data {data} has no held-out records (test.* file, or test_fraction); nothing to evaluate on")
    validate_records(test, encoder, cfg.task.replace(min_records=1, max_duplicate_share=1.0), f"{data} (held-out records)")
    train = fitting(train, encoder)
    train_encoded = [encoder.encode(r) for r in train]
    test_records = fitting(test, encoder)
    test_records = test_records[: cfg.eval.test_records] if cfg.eval.test_records else test_records
    test_encoded = [encoder.encode(r) for r in test_records]

    model = load(base)
    if cfg.method == "lora" and cfg.ep_size > 1:
        raise ConfigError("finetune: LoRA on experts runs with ep_size = 1 (use esft or full for expert parallelism)")
    before = measure(model, encoder, test_records, test_encoded, cfg.eval, retention)
    choices_before = router_choices(model, test_encoded, encoder.pad_id, cfg.eval.batch_size)

    selected, scores = None, None
    if cfg.method == "esft":
        scoring = [encoder.encode(r) for r in train[: cfg.esft.score_records]]
        batches = (collate(scoring[i:i + cfg.eval.batch_size], encoder.pad_id) for i in range(0, len(scoring), cfg.eval.batch_size))
        scores = esft.expert_scores(model, batches)
        selected = esft.selection(scores, cfg.esft.score, cfg.esft.threshold)

    def build():
        return methods.apply_lora(model, cfg) if cfg.method == "lora" else model

    def prepare(m):
        if cfg.method == "esft":
            methods.apply_esft(m, cfg, selected)
        elif cfg.method == "full":
            methods.apply_full(m, cfg)

    def make_data(rank, world):
        return TaskDataset(train_encoded, encoder.pad_id, cfg.task.max_length, rank=rank, world_size=world, seed=cfg.seed,
                           batch_size=cfg.micro_batch_size)

    def eval_data(split, rank, world):
        mine = test_encoded[rank::world]
        return (collate(mine[i:i + cfg.micro_batch_size], encoder.pad_id) for i in range(0, len(mine), cfg.micro_batch_size))

    calls = [cb.StopOnDivergence(), cb.RouterStats(), cb.History(out / "history.csv"), cb.Progress(f"{stage} ({cfg.method})")]
    uri = cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        calls.append(_mlflow(uri, cfg, base, data, out, stage))
    else:
        print("tracking: off (set MLFLOW_TRACKING_URI or mlflow_tracking_uri to log this run to MLflow)", flush=True)
    calls += [cb.PeriodicEval(cfg.eval_every), cb.Checkpointer(cfg.save_every, cfg.keep_checkpoints), cb.Profiler(cfg.profile_steps, out / "profile")]
    settings = {**cfg.to_dict(), "base": str(base), "data": hashlib.sha256(json.dumps(train, sort_keys=True).encode()).hexdigest()[:16]}
    loop = TrainLoop(cfg, build, make_data, SupervisedObjective(), calls, out, eval_data=eval_data, settings=settings, prepare=prepare)
    started = time.perf_counter()
    try:
        loop.setup()
        trained_params, total_params = methods.trainable(loop.module)
        routers_before = [p.detach().clone() for layer in moe_layers(loop.module) for p in layer.moe_router.parameters()]
        loop.run()
        seconds = time.perf_counter() - started
        after = measure(loop.module, encoder, test_records, test_encoded, cfg.eval, retention)
        drift = router_drift(choices_before, router_choices(loop.module, test_encoded, encoder.pad_id, cfg.eval.batch_size))
        router_same = all(torch.equal(a, b.detach()) for a, b in
                          zip(routers_before, [p for layer in moe_layers(loop.module) for p in layer.moe_router.parameters()]))
        metrics = {
            "method": cfg.method, "base": str(base), "data": source, "steps": cfg.steps, "train_records": len(train),
            "test_records": len(test_records), "trainable_params": trained_params, "total_params": total_params,
            "train_loss_first": loop.losses[0] if loop.losses else None, "train_loss_last": loop.losses[-1] if loop.losses else None,
            "train_seconds": seconds, "router_frozen": not cfg.train_router, "router_unchanged": router_same,
            "before": before, "after": after, "delta": {k: after[k] - before[k] for k in before if isinstance(before[k], float) and k in after},
            "router_drift": {**drift, "mean": sum(drift.values()) / max(len(drift), 1)}, "validation": summary,
        }
        if selected is not None:
            metrics["experts_trained"] = {layer: len(ids) for layer, ids in selected.items()}
        result = _outputs(loop, cfg, out, tok, metrics, selected, scores)
        result.final_metrics = _final(metrics)
        result.mlflow_run_id = next((c.run_id for c in calls if isinstance(c, cb.MLflowLogger)), None)
        loop.finish(result)
    except BaseException as exc:
        loop.close(exc)
        raise
    loop.close(None)
    return result


def _outputs(loop, cfg, out: Path, tok, metrics, selected, scores) -> FinetuneResult:
    from moe_engine.io import atomic_output, write_json, write_text
    from moe_engine.training.trainer import export_model

    adapter_dir = None
    module = loop.module
    with ExitStack() as staged:  # the adapter is published once the merged model is saved too
        if cfg.method == "lora":
            if loop.rank == 0:
                module.save_pretrained(staged.enter_context(atomic_output(out / "adapter")))
                adapter_dir = out / "adapter"
            module = module.merge_and_unload()
        model_dir = export_model(loop, out / "model", tok, module=module)
    result = FinetuneResult(cfg.method, out, model_dir, adapter_dir, metrics, losses=list(loop.losses))
    if loop.rank != 0:
        return result
    if selected is not None:
        write_json(out / "experts.json", {"score": cfg.esft.score, "threshold": cfg.esft.threshold, "selected": selected,
                                          "scores": {layer: {k: v.tolist() for k, v in s.items()} for layer, s in scores.items()}})
        result.artifacts.append((out / "experts.json", None))
    write_json(out / "report.json", metrics)  # everything, examples and sources included
    write_json(out / "metrics.json", dvc_metrics(metrics))  # numbers only, nested for `dvc metrics show`
    write_text(out / "compare.md", compare_table({cfg.method: metrics}))
    result.artifacts += [(out / "metrics.json", None), (out / "report.json", None), (out / "compare.md", None),
                         (out / "history.csv", None)]
    if adapter_dir is not None:
        result.artifacts.append((adapter_dir, "adapter"))
    if model_dir is not None:
        result.artifacts.append((model_dir, "model"))
    return result


def dvc_metrics(m: dict) -> dict:
    """The numbers of a fine-tune's report, nested by what they measure (`dvc metrics show` / `diff`)."""
    b, a = m["before"], m["after"]
    both = lambda key: {f"{key}_before": b.get(key), f"{key}_after": a.get(key)}  # noqa: E731
    return {
        "task": {**both("task_loss"), **both("task_token_accuracy"), **both("exact_match")},
        "retention": {**both("val_loss"), **both("ood_loss")},
        "train": {"steps": m["steps"], "loss_first": m["train_loss_first"], "loss_last": m["train_loss_last"],
                  "seconds": m["train_seconds"]},
        "params": {"trainable": m["trainable_params"], "total": m["total_params"]},
        "router": {"drift_mean": m["router_drift"]["mean"], "unchanged": int(bool(m["router_unchanged"]))},
    }


def _final(metrics: dict) -> dict[str, float]:
    out = {}
    for when in ("before", "after"):
        for key, value in metrics[when].items():
            if isinstance(value, (int, float)):
                out[f"eval/{when}/{key}"] = float(value)
    out["router/drift_mean"] = metrics["router_drift"]["mean"]
    return out


def _mlflow(uri, cfg, base, data, out, stage):
    from moe_engine.training import callbacks as cb

    tags = {"moe_lab.stage": stage, "moe_lab.finetune_method": cfg.method, "moe_lab.model_kind": "finetune",
            "moe_lab.base_model": str(base), "moe_lab.task_data": str(data)}
    base_run = base.parent / "run.json"
    if base_run.exists():  # lineage to the run that trained the base (pretrain writes run.json beside model/)
        tags["moe_lab.base_run_id"] = json.loads(base_run.read_text()).get("mlflow_run_id") or ""
    description = f"Stage `{stage}`: {cfg.method} fine-tune of `{base}` on `{data}` for {cfg.steps} steps (lr {cfg.lr:g})."
    return cb.MLflowLogger(uri, cfg.experiment, run_name=f"{stage} · {cfg.method} · {Path(data).name}",
                           tags={k: v for k, v in tags.items() if v}, params=cfg.to_dict(), description=description,
                           fallback_dir=out)


def compare_table(by_method: dict[str, dict]) -> str:
    """Markdown: before and after for each method, side by side."""
    def f(x, spec="{:.4f}"):
        return spec.format(x) if isinstance(x, (int, float)) else "-"

    names = list(by_method)
    rows = [("", *[f"{m}: before -> after" for m in names])]
    for key, label in (("task_loss", "task loss (held-out responses)"), ("task_token_accuracy", "response token accuracy"),
                       ("exact_match", "exact match (greedy)"), ("val_loss", "general domain: val loss"),
                       ("ood_loss", "general domain: out-of-domain loss")):
        cells = []
        for m in names:
            b, a = by_method[m]["before"].get(key), by_method[m]["after"].get(key)
            cells.append(f"{f(b)} -> {f(a)}" if b is not None else "-")
        rows.append((label, *cells))
    rows.append(("router drift (tokens with another top-k)", *[f(by_method[m]["router_drift"]["mean"], "{:.1%}") for m in names]))
    rows.append(("trainable / total params", *[f"{by_method[m]['trainable_params']:,} / {by_method[m]['total_params']:,}" for m in names]))
    rows.append(("steps, seconds", *[f"{by_method[m]['steps']}, {by_method[m]['train_seconds']:.0f}" for m in names]))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|---|" + "---:|" * len(names))
    return "\n".join(lines) + "\n"
