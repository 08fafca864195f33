"""Model-registry tasks: register a stage's model as ``candidate``; promote it to ``champion``."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from moe_engine.stages import stage as _stage
from tasks.dvc_stage import Tracking

MODEL_DIR = _stage("pretrain").model_dir  # the pretrain stage's model out (dvc.yaml)


@task(name="register-candidate", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def register_candidate(root: str, tracking: Tracking, model_name: str, stage: str = "pretrain") -> str:
    """Register ``stage``'s model under ``model_name`` with alias ``candidate``; returns the version."""
    from moe_engine.tracking.lineage import register_model

    model_dir = _stage(stage).model_dir
    version = register_model(Path(root) / model_dir, model_name, tracking.parent_run_id, stage=stage,
                             alias="candidate", lock_path=Path(root) / "dvc.lock", uri=tracking.uri)
    create_markdown_artifact(f"`{model_name}` version {version} is `@candidate` (`{model_dir}`, stage `{stage}`, "
                             f"MLflow {tracking.uri}).\n\nLineage: `moe-lab lineage models:/{model_name}@candidate`",
                             key=f"model-candidate-{stage.replace('_', '-')}", description=f"registered candidate model ({stage})")
    return version


@task(name="promote-champion", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def promote_champion(root: str, tracking: Tracking, model_name: str, gate_run_id: str | None = None,
                     stage: str = "pretrain") -> str:
    """Move ``champion`` to the ``candidate`` version, only if it holds the model bytes in dvc.lock now
    (the model the gate just judged)."""
    from moe_engine.tracking.lineage import promote, read_lock

    model_dir = _stage(stage).model_dir
    md5 = read_lock(stage, Path(root) / "dvc.lock")["outs"][model_dir]
    version = promote(model_name, from_alias="candidate", to_alias="champion", expect_md5=md5,
                      gate_run_id=gate_run_id, uri=tracking.uri)
    create_markdown_artifact(f"`{model_name}` version {version} is now `@champion` (gate passed; model md5 `{md5}`).",
                             key="model-champion", description="champion promotion")
    return version
