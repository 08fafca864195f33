"""One MLflow run per training run (rank 0): settings and constants as params, ``train/*``, ``val/*``,
``router/*`` and ``cost/*`` metrics as they are logged, the final summary and artifacts at the end,
status FAILED when the run fails. Nothing happens unless a tracking URI is configured; an unreachable
server is detected within seconds at start (a clear error, before any training), and a server that
goes away mid-run loses no point (``tracking.mlflow_run``: queued, retried, kept on disk)."""

from __future__ import annotations

from pathlib import Path

from moe_engine.training.loop import Callback


# one colour per kind of run in the MLflow UI's charts (the tag its UI reads): MoE and dense baseline apart
COLORS = {"moe": "#1f77b4", "dense": "#ff7f0e", "finetune": "#2ca02c", "other": "#7f7f7f"}


class MLflowLogger(Callback):
    name = "mlflow"

    def __init__(self, uri: str, experiment: str, *, run_name: str, tags: dict[str, str], params: dict,
                 description: str = "", manifest: Path | None = None, fallback_dir: Path = Path(".")):
        self.uri, self.experiment, self.run_name, self.tags = uri, experiment, run_name, dict(tags)
        self.params, self.description, self.manifest, self.fallback_dir = params, description, manifest, fallback_dir
        self.run = None

    def setup(self, loop):
        if loop.rank != 0:
            return
        from moe_engine.tracking.lineage import flatten
        from moe_engine.tracking.mlflow_run import MLflowRun, check_reachable

        from moe_engine.tracking.lineage import stage_tags

        check_reachable(self.uri)
        lineage = stage_tags(self.tags.get("moe_lab.stage", "train"), description=self.description or None)
        self.tags = {**lineage, **self.tags}
        self.tags.setdefault("mlflow.runColor", COLORS.get(self.tags.get("moe_lab.model_kind", ""), COLORS["other"]))
        self.run = MLflowRun(self.uri, self.experiment, run_name=self.run_name, tags=self.tags,
                             parent_run_id=self.tags.get("mlflow.parentRunId"), fallback_dir=self.fallback_dir)
        constants = {"params_total": loop.param_counts.total, "params_active": loop.param_counts.active,
                     "flops_per_token": loop.flops_per_token, "world_size": loop.world, "seq_len": loop.seq_len,
                     "tokens_per_step": loop.tokens_per_step}
        self.run.log_params({**flatten(self.params), **constants})
        print(f"tracking: MLflow run {self.run.run_id} in {self.uri} (experiment {self.experiment})", flush=True)
        if self.manifest is not None and Path(self.manifest).exists():
            self.run.log_manifest(self.manifest)

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run is not None else None

    def on_log(self, loop, metrics):
        if self.run is not None:
            self.run.log_metrics(metrics, step=loop.step)

    def end(self, loop, result):
        if self.run is None:
            return
        final = {k: v for k, v in getattr(result, "final_metrics", {}).items() if isinstance(v, (int, float)) and v is not None}
        if final:
            self.run.log_metrics(final, step=loop.step)
        for path, artifact_path in getattr(result, "artifacts", []):
            if Path(path).exists():
                self.run.log_artifact(path, artifact_path)

    def close(self, loop, error):
        if self.run is not None:
            run, self.run = self.run, None
            run.close(status="FAILED" if error is not None else "FINISHED")
