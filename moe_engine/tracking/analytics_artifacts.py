"""Log a router-analytics output folder (report, PNGs, CSVs) and its metrics to MLflow."""

from __future__ import annotations

import time
from pathlib import Path


def log_analysis(
    out_dir: str | Path,
    tracking_uri: str,
    experiment: str = "router-analytics",
    *,
    metrics: dict[str, float] | None = None,
    run_id: str | None = None,
    run_name: str | None = None,
    artifact_path: str = "router_analytics",
    artifact_location: str | None = None,
) -> str:
    """Upload ``out_dir`` under ``artifact_path`` and log ``metrics``; returns the run id.

    With ``run_id`` the files go to that (e.g. the training) run, which is left open; otherwise a new
    run in ``experiment`` is created and closed. Uses an explicit ``MlflowClient``, so no global
    tracking URI or active run is changed in the caller's process.
    """
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir}: analytics output folder not found")
    client = MlflowClient(tracking_uri=tracking_uri)
    own_run = run_id is None
    if own_run:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment, artifact_location)
        run_id = client.create_run(exp_id, run_name=run_name).info.run_id
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in sorted((metrics or {}).items())]
    for start in range(0, len(items), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=items[start : start + 1000])
    client.log_artifacts(run_id, str(out_dir), artifact_path)
    if own_run:
        client.set_terminated(run_id)
    return run_id
