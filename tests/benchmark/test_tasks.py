"""The task YAMLs in moe_engine/benchmark/tasks are plain lm-eval tasks: TaskManager loads them."""

import json
from pathlib import Path

import yaml

from moe_engine.benchmark.config import FILE_TASKS, BenchmarkConfig
from moe_engine.benchmark.run import TASK_DIR, datasets_cache, write_tasks

REPO = Path(__file__).resolve().parents[2]


def test_lm_eval_loads_the_committed_yamls_from_the_repository_root(monkeypatch, tmp_path):
    """The usual way: `lm_eval --include_path moe_engine/benchmark/tasks` run from the repository root."""
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)
    manifest = json.loads((REPO / "data" / "tasks" / "manifest.json").read_text())
    with datasets_cache(tmp_path / "datasets"):  # the datasets cache in tmp_path, not the home folder
        manager = TaskManager(include_path=str(TASK_DIR.relative_to(REPO)), include_defaults=False)
        assert set(FILE_TASKS) | {"moe_lab"} <= set(manager.all_tasks)
        tasks = manager.load(["moe_lab"])["tasks"]
    by_name = {t.config.task: t for t in tasks.values()}
    assert set(by_name) == set(FILE_TASKS)
    for name, task in by_name.items():
        docs = list(task.test_docs())
        assert len(docs) == manifest["benchmark"][name]
        for doc in docs[:20]:
            choices = task.doc_to_choice(doc)
            assert len(choices) == 4 and len(set(choices)) == 4
            assert 0 <= task.doc_to_target(doc) < 4
            assert task.doc_to_text(doc).endswith(":")


def test_run_time_copies_name_absolute_paths_wherever_the_command_runs(monkeypatch, demo_data, tmp_path):
    monkeypatch.chdir(tmp_path)
    tasks_dir = write_tasks(BenchmarkConfig(), demo_data, tmp_path / "work")
    names = sorted(p.stem for p in tasks_dir.glob("*.yaml"))
    assert names == sorted([*FILE_TASKS, "passage_ood", "passage_val"])
    for path in tasks_dir.glob("*.yaml"):
        kwargs = yaml.safe_load(path.read_text())["dataset_kwargs"]
        assert all(Path(f).is_absolute() and Path(f).is_file() for f in kwargs["data_files"].values())
        assert kwargs["cache_dir"] == str(tmp_path / "work" / "datasets")
