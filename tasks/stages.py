"""One Prefect task per DVC stage of dvc.yaml. Each runs ``dvc repro --single-item <stage>`` through
DVC's API (``dvc_stage.run_stage``), so an unchanged stage is skipped; retries what may be
transient (not a stage that rejected its inputs); returns the stage's outputs (md5s from dvc.lock)
and metrics (its dvc.yaml metrics files); publishes a markdown artifact; records MLflow lineage
when given a ``Tracking``. ``artifacts``: small files that document the stage in its MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.dvc_stage import StageFailed, StageResult, Tracking, publish, run_stage, transient

# DVC decides what is up to date: Prefect's own result cache would bypass it, so it is off.
OPTIONS = dict(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=transient, cache_policy=NO_CACHE)


@task(name="data", **OPTIONS)
def data(root: str, tracking: Tracking | None = None) -> StageResult:
    """Raw text -> tokenizer -> validated token shards (``moe-lab data prepare``)."""
    return run_stage(root, "data", tracking, artifacts=("outputs/data/manifest.json",))


@task(name="pretrain", **OPTIONS)
def pretrain(root: str, tracking: Tracking | None = None) -> StageResult:
    """Pretrain the MoE (``moe-lab pretrain --section pretrain``)."""
    return run_stage(root, "pretrain", tracking, artifacts=("outputs/pretrain/tokens_per_expert.json",))


@task(name="pretrain_dense", **OPTIONS)
def pretrain_dense(root: str, tracking: Tracking | None = None) -> StageResult:
    """Pretrain the dense baseline matched on active parameters (``--section pretrain_dense``)."""
    return run_stage(root, "pretrain_dense", tracking)


@task(name="evaluate", **OPTIONS)
def evaluate(root: str, tracking: Tracking | None = None) -> StageResult:
    """Held-out and out-of-domain loss, MoE vs dense (``moe-lab evaluate``)."""
    return run_stage(root, "evaluate", tracking, artifacts=("outputs/evaluate/compare.md",))


@task(name="analyze", **OPTIONS)
def analyze(root: str, tracking: Tracking | None = None) -> StageResult:
    """Router analytics of the snapshots and the final model (``moe-lab analyze``)."""
    return run_stage(root, "analyze", tracking, artifacts=("outputs/analyze/report.html",))


GATE_REPORT = ("outputs/gate/report.md", "outputs/gate/report.json")


@task(name="gate", **OPTIONS)
def gate(root: str, tracking: Tracking | None = None) -> StageResult:
    """The benchmark gate (``moe-lab gate``). A regression (exit code 1 with a fresh report) is a result,
    ``passed=False``, not an error: it is not retried, and DVC leaves the stage out of dvc.lock."""
    report = Path(root) / GATE_REPORT[1]
    try:
        result = run_stage(root, "gate", tracking, artifacts=GATE_REPORT)
    except StageFailed as exc:
        if exc.exit_code != 1 or not report.exists():  # DVC deleted the old report before the run
            raise
        result = StageResult("gate", ran=True, exit_code=1)
        if tracking is not None:
            from moe_engine.tracking.lineage import stage_run

            result.run_id = stage_run("gate", {}, {"passed": 0}, [Path(root) / f for f in GATE_REPORT], uri=tracking.uri,
                                      parent_run_id=tracking.parent_run_id, flow_run_id=tracking.flow_run_id, status="failed")
        publish(result, tracking, note=(Path(root) / GATE_REPORT[0]).read_text())
    result.passed = bool(json.loads(report.read_text())["passed"])
    return result


PIPELINE = (data, pretrain, pretrain_dense, evaluate, analyze)  # dvc.yaml order, the gate last (flows/gate.py)
