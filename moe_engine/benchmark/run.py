"""Benchmark Hugging Face model directories on lm-eval multiple-choice tasks, side by side.

    metrics = run(BenchmarkConfig(limit=100), {"moe": "outputs/pretrain/model",
                  "dense": "outputs/pretrain_dense/model"}, data_dir="outputs/data", out_dir="outputs/benchmark")

The harness is EleutherAI's lm-evaluation-harness (``lm_eval.simple_evaluate``): each model is loaded
here (MoE checkpoints with the engine's layers through ``models.build.load``, anything else with stock
transformers) and handed to lm-eval's ``HFLM`` wrapper as an object, so patched models are what lm-eval
scores; encoder-decoder models (Switch) go through HFLM's seq2seq backend (context into the encoder,
choice scored by the decoder). Tasks are lm-eval task YAMLs: the project's own in ``tasks/`` (over
``data/tasks/benchmark``), the next-passage tasks written at run time (``passage.py``) and any in
``config.include_path``. Everything runs offline: the hub is switched off before transformers, datasets
or lm-eval are imported, lm-eval's built-in task index (whose data comes from the hub) is not loaded, and the
datasets cache lives in a work folder beside the output that is deleted before the output is published.

Writes ``out_dir/metrics.json`` ({model: {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}} and
``<first>_minus_<other>`` paired differences), ``compare.md`` and ``results/<model>.json`` (lm-eval's
own results; ``results/<model>.samples.jsonl`` with ``log_samples``), atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from moe_engine.benchmark.config import PASSAGE_TASKS, BenchmarkConfig
from moe_engine.errors import ConfigError, InputError

TASK_DIR = Path(__file__).with_name("tasks")
REPO = Path(__file__).resolve().parents[2]  # data_files in tasks/*.yaml are relative to it
TAG = "moe_lab"  # the tag every project task carries: `tasks: [moe_lab]` runs them all
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def check_model_dir(name: str, path: str | Path) -> Path:
    """Refuse, before any heavy work, a model directory lm-eval could not score."""
    from moe_engine.models.io import check_weight_files

    path = Path(path)
    where = f"--model {name}={path}"
    if not path.is_dir():
        raise InputError(f"{where}: no such directory; pass a folder written by save_pretrained (e.g. outputs/pretrain/model)")
    if not (path / "config.json").is_file():
        raise InputError(f"{where}: not a Hugging Face model directory (no config.json)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(f"{where}: no tokenizer in it (none of {', '.join(TOKENIZER_FILES)}); lm-eval needs the "
                         f"model's own tokenizer: save it beside the model (moe-lab pretrain does), e.g. copy the "
                         f"files of outputs/data/tokenizer into {path}")
    check_weight_files(path)
    return path


def load_model(path: str | Path):
    """An MoE checkpoint with the engine's layers installed, or any other model as stock transformers loads it."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from moe_engine.models.adapters import ADAPTERS
    from moe_engine.models.loading import load, read_config

    config = read_config(path)
    if config.model_type in ADAPTERS:
        return load(path, local_files_only=True)
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return model_class.from_pretrained(path, use_safetensors=True, local_files_only=True)


@contextmanager
def datasets_cache(cache_dir: Path) -> Iterator[None]:
    """The datasets cache in ``cache_dir`` while inside (not ~/.cache/huggingface)."""
    previous = os.environ.get("HF_DATASETS_CACHE")
    os.environ["HF_DATASETS_CACHE"] = str(cache_dir)
    import datasets

    # datasets reads its cache folder from the environment once, at import; tasks from include_path
    # that name no cache_dir use this attribute at load time
    saved, datasets.config.HF_DATASETS_CACHE = datasets.config.HF_DATASETS_CACHE, cache_dir
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_CACHE = saved
        if previous is None:
            os.environ.pop("HF_DATASETS_CACHE", None)
        else:
            os.environ["HF_DATASETS_CACHE"] = previous


def write_tasks(config: BenchmarkConfig, data_dir: Path | None, work: Path) -> Path:
    """The project's task YAMLs with absolute data paths, and the passage tasks, in ``work/tasks``."""
    import yaml

    from moe_engine.benchmark.passage import write_passage_task

    tasks_dir, cache = work / "tasks", work / "datasets"
    tasks_dir.mkdir(parents=True)
    wanted = set(config.tasks)
    for source in sorted(TASK_DIR.glob("*.yaml")):
        task = yaml.safe_load(source.read_text(encoding="utf-8"))
        files = {split: REPO / f for split, f in task["dataset_kwargs"]["data_files"].items()}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing and (task["task"] in wanted or TAG in wanted):
            raise InputError(f"task {task['task']}: data file(s) {', '.join(missing)} missing; rebuild them with "
                             "`python -m moe_engine.benchmark.build_data` (needs ../shared/data)")
        task["dataset_kwargs"] = {**task["dataset_kwargs"], "data_files": {k: str(v) for k, v in files.items()},
                                  "cache_dir": str(cache)}
        (tasks_dir / source.name).write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True), encoding="utf-8")
    for name in PASSAGE_TASKS:
        if name in wanted or (TAG in wanted and data_dir is not None):
            if data_dir is None:
                raise ConfigError(f"benchmark.tasks has {name}, which is built from prepared shards: pass --data "
                                  "(the folder of `moe-lab data prepare`), or drop it from the tasks")
            write_passage_task(data_dir, name.removeprefix("passage_"), config.passage_items, config.seed, tasks_dir, cache)
    return tasks_dir


def task_manager(config: BenchmarkConfig, tasks_dir: Path):
    """lm-eval's TaskManager over the project's tasks and ``include_path``; unknown task names are refused."""
    from lm_eval.tasks import TaskManager

    extra = [Path(p) for p in config.include_path]
    for p in extra:
        if not p.exists():
            raise InputError(f"benchmark.include_path: {p} does not exist (a folder of lm-eval task YAMLs)")
    # built-in tasks are left out: their data comes from the hub, which this project never reaches
    manager = TaskManager(include_path=[str(tasks_dir), *map(str, extra)], include_defaults=False)
    unknown = [t for t in config.tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"benchmark.tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(manager.all_tasks)} "
                          "(add your own lm-eval YAMLs with benchmark.include_path)")
    return manager


def evaluate(name: str, model_dir: Path, config: BenchmarkConfig, manager) -> dict:
    """lm-eval's results for one model (with its samples), plus the seconds it took."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    start = time.perf_counter()
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir).to(device=device, dtype=getattr(torch, config.dtype)).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_dir, local_files_only=True), batch_size=config.batch_size,
              max_length=config.max_length or None)
    seed = config.seed
    results = simple_evaluate(
        model=lm, tasks=list(config.tasks), num_fewshot=config.num_fewshot, limit=config.limit or None,
        bootstrap_iters=config.bootstrap_iters, log_samples=True, task_manager=manager,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    results["moe_lab"] = {"model": name, "model_dir": str(model_dir), "device": device, "dtype": config.dtype,
                          "num_fewshot": config.num_fewshot, "seconds": time.perf_counter() - start, "params": _params(model)}
    del lm, model
    return results


def _params(model) -> dict:
    from moe_engine.training.flops import count_params

    counts = count_params(model)
    return {"total": counts.total, "active": counts.active}


def run(config: BenchmarkConfig, models: dict[str, str | Path], data_dir: str | Path | None,
        out_dir: str | Path) -> dict:
    """Benchmark every model on ``config.tasks``; writes ``out_dir`` and returns the metrics."""
    from moe_engine.benchmark.report import compare_markdown, metrics_of, write_results
    from moe_engine.io import atomic_output

    # the hub off before transformers, huggingface_hub, datasets or lm_eval are imported (they read these
    # once, at import); left set: this project never reaches a hub
    os.environ.update(OFFLINE)
    if not models:
        raise ConfigError("no models to benchmark: pass --model NAME=DIR at least once")
    model_dirs = {name: check_model_dir(name, path) for name, path in models.items()}
    data_dir = Path(data_dir) if data_dir is not None else None
    raw: dict[str, dict] = {}
    with atomic_output(out_dir) as tmp:
        work = tmp / "_work"  # task files and the datasets cache; removed before the output is published
        with datasets_cache(work / "datasets"):
            tasks_dir = write_tasks(config, data_dir, work)
            manager = task_manager(config, tasks_dir)
            manager.load(list(config.tasks))  # reads every task's data once (and fails here on bad data), so
            # each model's seconds below are its own, not the first model paying for the datasets cache
            for name, model_dir in model_dirs.items():
                raw[name] = evaluate(name, model_dir, config, manager)
        shutil.rmtree(work)
        metrics = metrics_of(raw)
        write_results(tmp / "results", raw, config.log_samples)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "compare.md").write_text(compare_markdown(raw, metrics, model_dirs))
    return metrics
