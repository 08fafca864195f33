"""One Prefect task per DVC stage, made from the stage registry (``moe_engine.stages.PIPELINE``): a new
stage added there, in params.yaml and dvc.yaml gets its task here without code. Each task runs
``dvc repro --single-item <stage>`` (``dvc_stage.run_stage``: an unchanged stage is skipped), streams
the stage's output into the Prefect log, retries only what may be transient, returns the stage's
outputs (md5s from dvc.lock) and metrics, publishes a markdown artifact, and records MLflow lineage
when given a ``Tracking``. A gate regression is a result (``passed=False``), not an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from moe_engine.stages import PIPELINE, Stage
from tasks.dvc_stage import StageFailed, StageResult, Tracking, publish, run_stage, transient

# DVC decides what is up to date: Prefect's own result cache would bypass it, so it is off.
OPTIONS = dict(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=transient, cache_policy=NO_CACHE)


def _stage_task(stage: Stage):
    def run(root: str, tracking: Tracking | None = None) -> StageResult:
        return run_stage(root, stage.name, tracking, artifacts=stage.artifacts)

    run.__name__ = stage.name
    run.__doc__ = f"DVC stage `{stage.name}`: {stage.description}"
    return task(name=stage.name, **OPTIONS)(run)


def _result_task(stage: Stage):
    """A stage whose exit code 1 with a fresh report is its verdict (the gate)."""
    report_json = next(a for a in stage.artifacts if a.endswith(".json"))
    report_md = next(a for a in stage.artifacts if a.endswith(".md"))

    def run(root: str, tracking: Tracking | None = None) -> StageResult:
        report = Path(root) / report_json
        try:
            result = run_stage(root, stage.name, tracking, artifacts=stage.artifacts)
        except StageFailed as exc:
            if exc.exit_code != 1 or not report.exists() or report_json in exc.restored:
                raise  # no verdict of this run: it failed before writing one (a report there is the last good run's)
            result = StageResult(stage.name, ran=True, exit_code=1)
            if tracking is not None:
                from moe_engine.tracking.lineage import stage_run

                result.run_id = stage_run(stage.name, {}, {"passed": 0}, [Path(root) / f for f in stage.artifacts],
                                          uri=tracking.uri, parent_run_id=tracking.parent_run_id,
                                          flow_run_id=tracking.flow_run_id, status="failed")
            publish(result, tracking, note=(Path(root) / report_md).read_text())
        result.passed = json.loads(report.read_text()).get("passed")
        return result

    run.__name__ = stage.name
    run.__doc__ = f"DVC stage `{stage.name}`: {stage.description}; a regression is a result, not retried"
    return task(name=stage.name, **{**OPTIONS, "retries": 0})(run)


TASKS = {s.name: (_result_task(s) if s.result else _stage_task(s)) for s in PIPELINE}
PIPELINE_TASKS = tuple(TASKS[s.name] for s in PIPELINE if not s.result)  # dvc.yaml order; the gate runs in flows/gate.py
gate = TASKS["gate"]
GATE_REPORT = next(s for s in PIPELINE if s.name == "gate").artifacts
