"""The full pipeline as a Prefect flow: every DVC stage in dvc.yaml order (DVC skips the unchanged
ones), the trained model registered as ``candidate``, then the benchmark gate (flows/gate.py), which
promotes it to ``champion`` when it passes. Each run is one MLflow pipeline run with one child run
per stage (moe_engine.tracking.lineage), its effective parameters logged on it.

With no overrides the flow runs in the project's workspace (the nightly schedule). With any
(steps, lr, ... or ``overrides``) it runs in its own workspace, ``outputs/runs/<flow run name>`` (a git
worktree at HEAD sharing the DVC cache: tasks/workspace.py): the tracked params.yaml and the
project's outputs are never touched, and the result is also saved as a DVC experiment.

    python flows/pipeline.py --steps 50 --set pretrain.micro_batch_size=8
    prefect deployment run 'moe-lab-pipeline/on-demand' -p steps=50 --watch
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# `python flows/pipeline.py` without `make`: Prefect's temporary server keeps its database in the
# project (as the Makefile and mlflow/services.sh do), not under $HOME; set before prefect is imported
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / "mlflow" / "store" / "prefect"))

from prefect import flow
from prefect.runtime import flow_run

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python flows/pipeline.py` puts flows/ first on sys.path, not the project
    sys.path.insert(0, str(ROOT))

from flows.gate import benchmark_gate  # noqa: E402
from moe_engine.tracking import lineage  # noqa: E402
from tasks import stages  # noqa: E402
from tasks.dvc_stage import Tracking  # noqa: E402
from tasks.params import apply_params, check_overrides, save_experiment  # noqa: E402
from tasks.registry import register_candidate  # noqa: E402
from tasks.workspace import run_workspace  # noqa: E402

# Flow parameter -> the params.yaml keys it sets. steps and arch also go to the dense baseline, which
# must stay matched to the MoE (same tokens, same attention shape) for the comparison to hold.
KNOBS = {
    "steps": ("pretrain.steps", "pretrain_dense.steps"),
    "arch": ("pretrain.arch", "pretrain_dense.arch"),
    "lr": ("pretrain.lr",),
    "aux_loss_coef": ("pretrain.router.aux_loss_coef",),
}


def as_overrides(knobs: dict, extra: list[str] | None = None) -> list[str]:
    return [f"{key}={value}" for name, value in knobs.items() if value is not None for key in KNOBS[name]] + list(extra or [])


@flow(name="moe-lab-pipeline", log_prints=True)
def pipeline(steps: int | None = None, arch: str | None = None, lr: float | None = None,
             aux_loss_coef: float | None = None, overrides: list[str] | None = None, model_name: str = "moe-lab",
             gate: bool = True, tracking_uri: str | None = None, root: str | None = None) -> dict:
    """Run the DVC pipeline stage by stage, register the model as ``candidate``, then gate it.

    Args:
        steps: pretraining steps of the MoE and of its dense baseline (empty: params.yaml's).
        arch: architecture of both: mixtral, olmoe, qwen2_moe, deepseek_v3 or switch (empty: params.yaml's).
        lr: the MoE's peak learning rate (empty: params.yaml's).
        aux_loss_coef: the router load-balancing loss coefficient (empty: params.yaml's).
        overrides: more SECTION.KEY=VALUE settings of params.yaml keys, e.g. ["finetune.steps=20"].
        model_name: the registered model name in MLflow.
        gate: run the benchmark gate (and promote to champion when it passes).
        tracking_uri: MLflow tracking URI (empty: $MLFLOW_TRACKING_URI, else mlflow/mlflow.db).
        root: the project folder (empty: this checkout).
    """
    root = str(Path(root or ROOT).resolve())
    sets = as_overrides({"steps": steps, "arch": arch, "lr": lr, "aux_loss_coef": aux_loss_coef}, overrides)
    if sets:
        check_overrides(root, sets)  # a typo fails now, before a workspace is made
        workdir = run_workspace(root, f"{flow_run.name or 'run'}-{(flow_run.id or '')[:8]}")
        params = apply_params(workdir, sets)
        print(f"overrides {params} run in {workdir}; the project's params.yaml and outputs stay as they are")
    else:
        workdir, params = root, {}
    uri = lineage.tracking_uri(tracking_uri, root)
    parent = lineage.start_pipeline(uri, run_name=f"pipeline {flow_run.name}", flow_run_id=flow_run.id, root=workdir,
                                    params={**params, "model_name": model_name, "workspace": workdir})
    tracking = Tracking(uri, parent, flow_run.id)
    status = "FAILED"
    try:
        results = {t.name: t(workdir, tracking) for t in stages.PIPELINE_TASKS}
        version = register_candidate(workdir, tracking, model_name)
        finetuned = register_candidate(workdir, tracking, f"{model_name}-finetuned", stage="finetune") \
            if "finetune" in results else None
        summary = {"mlflow_run_id": parent, "candidate": version, "finetuned_candidate": finetuned, "workspace": workdir,
                   "stages": {name: "ran" if r.ran else "skipped" for name, r in results.items()}}
        if gate:
            summary["gate"] = benchmark_gate(model_name=model_name, tracking_uri=uri, parent_run_id=parent, root=workdir)
        if sets:
            summary["experiment"] = save_experiment(workdir, f"prefect-{(flow_run.id or 'run')[:8]}",
                                                    [*results, *(["gate"] if gate else [])])
        status = "FINISHED"
        return summary
    finally:
        lineage.end_pipeline(parent, uri, status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python flows/pipeline.py",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, help="pretrain steps (MoE and dense baseline)")
    p.add_argument("--arch", help="model architecture (MoE and dense baseline), e.g. mixtral, olmoe")
    p.add_argument("--lr", type=float, help="MoE peak learning rate")
    p.add_argument("--aux-loss-coef", type=float, help="router load-balancing loss coefficient")
    p.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE", help="any params.yaml key, e.g. finetune.steps=20")
    p.add_argument("--model-name", default="moe-lab", help="registered model name")
    p.add_argument("--no-gate", action="store_true", help="stop after registering the candidate")
    p.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else mlflow/mlflow.db)")
    a = p.parse_args(argv)
    pipeline(steps=a.steps, arch=a.arch, lr=a.lr, aux_loss_coef=a.aux_loss_coef, overrides=a.set,
             model_name=a.model_name, gate=not a.no_gate, tracking_uri=a.tracking_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
