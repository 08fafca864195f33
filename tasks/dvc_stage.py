"""Run one DVC stage through DVC's Python API, record its lineage, and summarise it for Prefect.

``Repo.reproduce(stage, single_item=True)`` is ``dvc repro --single-item <stage>``: DVC runs the
stage's command only when its deps, params or outs changed since dvc.lock (or restores it from its
run cache), and returns the stages it reproduced, so an empty list means "skipped, unchanged". The
flow calls the stage tasks in pipeline order, which is what ``dvc repro`` itself would do.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


class StageFailed(RuntimeError):
    """The stage failed (crash, kill, repo lock held, tracking store down): worth a retry."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code  # the stage command's exit code, when it ran and failed


class StageInputError(StageFailed):
    """The stage command rejected its inputs (exit code 2, the moe-lab convention): a retry cannot help."""


@dataclass
class Tracking:
    """Where a stage's MLflow run goes: the pipeline parent run, its store, the Prefect flow run."""

    uri: str
    parent_run_id: str
    flow_run_id: str | None = None

    def env(self) -> dict[str, str]:
        from moe_engine.tracking.lineage import pipeline_env

        return pipeline_env(self.parent_run_id, self.uri, self.flow_run_id)


@dataclass
class StageResult:
    stage: str
    ran: bool  # False: DVC skipped it (unchanged)
    outs: dict[str, str | None] = field(default_factory=dict)  # path -> md5 in dvc.lock
    metrics: dict[str, dict] = field(default_factory=dict)  # metrics file -> its content
    run_id: str | None = None  # the MLflow run that holds this stage's outputs
    exit_code: int | None = None  # the command's exit code when it failed
    passed: bool | None = None  # the gate stage only: did every check pass


def transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the stage rejected its inputs."""
    return not isinstance(state.result(raise_on_failure=False), StageInputError)


def reproduce(root: Path, stage: str, env: dict[str, str] | None = None) -> tuple[bool, list[str], list[str]]:
    """Reproduce one stage; returns (ran, outs, metrics files) as dvc.yaml declares them.

    ``env`` reaches the stage command through DVC's ``run_env`` (e.g. the lineage contract); DVC
    adds ``DVC_STAGE`` and ``DVC_ROOT`` itself.
    """
    from dvc.exceptions import ReproductionError
    from dvc.lock import LockError
    from dvc.repo import Repo

    # DVC resolves stage names, and names them to the command ($DVC_STAGE), relative to the cwd: work
    # from the root like the dvc CLI does (the flow runs one stage at a time; DVC locks the repo anyway)
    with _cwd(root), Repo(str(root)) as repo:
        (spec,) = repo.stage.collect(stage)
        outs = [o.def_path for o in spec.outs]
        metrics = [o.def_path for o in spec.outs if o.metric]
        try:
            done = repo.reproduce(stage, single_item=True, run_env=env or {})
        except LockError as exc:
            raise StageFailed(f"stage {stage}: {exc} (another dvc process holds the repo)") from exc
        except ReproductionError as exc:
            code = re.search(r"exited with (-?\d+)", str(exc.__cause__ or ""))
            code = int(code.group(1)) if code else None
            error = StageInputError if code == 2 else StageFailed
            raise error(f"stage {stage} failed: {exc.__cause__ or exc}", code) from exc
    return any(s.path == spec.path and s.name == spec.name for s in done), outs, metrics


@contextmanager
def _cwd(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def read_metrics(root: Path, files: list[str]) -> dict[str, dict]:
    return {f: json.loads((root / f).read_text()) for f in files if (root / f).exists()}


def record_lineage(root: Path, result: StageResult, tracking: Tracking | None, artifacts: list[str]) -> str | None:
    """Tag the stage's MLflow run with dvc.lock hashes; log a run here when no tracked run made the outputs."""
    if tracking is None:
        return None
    from moe_engine.tracking import lineage

    lock = root / "dvc.lock"
    run_id = lineage.tag_from_dvc_lock(tracking.parent_run_id, result.stage, lock, tracking.uri)
    if run_id is None:  # the command does not log itself, or its outputs predate any tracked run
        entry = lineage.read_lock(result.stage, lock)
        files = [root / f for f in [*result.metrics, *artifacts]]
        metrics = {k: v for content in result.metrics.values() for k, v in lineage.flatten(content).items()}
        made = lineage.stage_run(result.stage, entry["params"], metrics, files, uri=tracking.uri,
                                 parent_run_id=tracking.parent_run_id, flow_run_id=tracking.flow_run_id,
                                 status="ran" if result.ran else "adopted")
        if made is None:
            raise StageFailed(f"stage {result.stage}: could not log its MLflow run at {tracking.uri}")
        run_id = lineage.tag_from_dvc_lock(made, result.stage, lock, tracking.uri)
    return run_id


def run_stage(root: str | Path, stage: str, tracking: Tracking | None = None,
              artifacts: tuple[str, ...] = ()) -> StageResult:
    """The body of every stage task: reproduce, read metrics and dvc.lock hashes, record lineage, publish."""
    from moe_engine.tracking.lineage import read_lock

    root = Path(root).resolve()
    ran, outs, metrics_files = reproduce(root, stage, tracking.env() if tracking else None)
    result = StageResult(stage, ran, outs=dict.fromkeys(outs), metrics=read_metrics(root, metrics_files))
    result.outs.update(read_lock(stage, root / "dvc.lock")["outs"])
    result.run_id = record_lineage(root, result, tracking, list(artifacts))
    publish(result, tracking)
    return result


def publish(result: StageResult, tracking: Tracking | None = None, note: str = "") -> None:
    """A markdown Prefect artifact per stage: what DVC did, the outputs' md5s, the metrics, the MLflow run."""
    from prefect.artifacts import create_markdown_artifact

    from moe_engine.tracking.lineage import flatten

    status = "ran" if result.ran else "skipped by DVC (unchanged)"
    if result.exit_code is not None:
        status = f"failed (exit code {result.exit_code})"
    lines = [f"### DVC stage `{result.stage}`: {status}", note, "", "| output | md5 (dvc.lock) |", "|---|---|"]
    lines += [f"| `{path}` | `{md5 or '-'}` |" for path, md5 in result.outs.items()]
    for name, values in result.metrics.items():
        lines += ["", f"**{name}**", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in flatten(values).items()]
    if tracking is not None:
        lines += ["", f"MLflow: stage run `{result.run_id}` under pipeline run `{tracking.parent_run_id}` ({tracking.uri})"]
    create_markdown_artifact("\n".join(lines), key=f"stage-{result.stage.replace('_', '-')}",
                             description=f"DVC stage {result.stage}: {status}")
