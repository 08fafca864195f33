"""One MLflow run, logged in batches from a background thread, that loses no metric when the
tracking server is briefly unreachable.

The training loop only appends to an in-memory queue (no network on the hot path). A thread
sends the queue with ``log_batch`` every ``flush_every_s``; when a send fails the points stay
queued and are retried with backoff. ``close()`` flushes what is left; points that still cannot be
sent are written to ``<fallback_dir>/unsent_metrics.jsonl`` (and the path is printed), never dropped.
MLflow is imported here only, and only when a run is asked for.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from moe_engine.errors import UserError

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call


class MLflowRun:
    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        system_metrics: bool = True,
        flush_every_s: float = 2.0,
        fallback_dir: str | Path = ".",
    ):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        exp_id = experiment_id(self.client, experiment, tracking_uri)
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        self.fallback_dir = Path(fallback_dir)
        self._queue: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flush_every_s = flush_every_s
        self._failures = 0
        self._thread = threading.Thread(target=self._loop, name="mlflow-logger", daemon=True)
        self._thread.start()
        self._monitor = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, tracking_uri=tracking_uri)
                self._monitor.start()
            except Exception as exc:  # psutil missing etc.: system metrics are optional
                log.warning("system metrics disabled: %s", exc)

    # --- the hot path: queue only
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        with self._lock:
            self._queue.extend(points)

    # --- rare calls, sent directly with retries
    def _retry(self, fn, *args, attempts: int = 5, **kwargs):
        for i in range(attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if i == attempts - 1:
                    raise
                log.warning("MLflow call %s failed (%s); retrying", getattr(fn, "__name__", fn), exc)
                time.sleep(min(2**i, 10))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._retry(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._retry(self.client.set_tag, self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._retry(self.client.log_artifacts, self.run_id, str(path), artifact_path)
        else:
            self._retry(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._retry(self.client.log_dict, self.run_id, data, artifact_file)

    def log_input(self, dataset, context: str = "training") -> None:
        from mlflow.entities import InputTag

        self._retry(self.client.log_inputs, self.run_id, [_dataset_input(dataset, context, InputTag)])

    def log_manifest(self, manifest_path: str | Path, context: str = "training") -> None:
        """The shards' manifest as an MLflow dataset input (one row per split x domain), so the
        run's lineage names the exact data, plus the manifest itself as an artifact."""
        import mlflow.data
        import pandas as pd

        manifest_path = Path(manifest_path)
        manifest = json.loads(manifest_path.read_text())
        rows = [
            {"split": split, "domain": domain, "sequences": v.get("sequences", 0), "tokens": v.get("tokens", 0)}
            for split, info in manifest.get("splits", {}).items()
            for domain, v in info.get("domains", {}).items()
        ]
        digest = "".join(shard.get("sha256", "") for info in manifest.get("splits", {}).values() for shard in info.get("shards", []))
        import hashlib

        dataset = mlflow.data.from_pandas(
            pd.DataFrame(rows), source=str(manifest_path.resolve()), name=manifest_path.parent.name,
            digest=hashlib.sha256(digest.encode()).hexdigest()[:16],
        )
        self.log_input(dataset, context)
        self.log_dict(manifest, "data/manifest.json")

    # --- background sending
    def _send_some(self) -> bool:
        with self._lock:
            batch = self._queue[:MAX_BATCH]
        if not batch:
            return True
        try:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
        except Exception as exc:
            self._failures += 1
            if self._failures in (1, 10, 100):
                log.warning("MLflow unreachable (%s); %d metric points queued, retrying", exc, len(self._queue))
            return False
        with self._lock:
            del self._queue[: len(batch)]
        self._failures = 0
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self._flush_every_s * min(2**self._failures, 16)):
            while self._queue and self._send_some():
                pass

    def flush(self, timeout_s: float = 30.0) -> bool:
        deadline = time.time() + timeout_s
        while self._queue and time.time() < deadline:
            if not self._send_some():
                time.sleep(1.0)
        return not self._queue

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as exc:
                log.warning("system metrics monitor did not stop cleanly: %s", exc)
        if not self.flush(timeout_s):
            self.fallback_dir.mkdir(parents=True, exist_ok=True)
            path = self.fallback_dir / "unsent_metrics.jsonl"
            with open(path, "a") as f:
                for m in self._queue:
                    f.write(json.dumps({"run_id": self.run_id, "key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}) + "\n")
            print(f"MLflow stayed unreachable: {len(self._queue)} metric points saved to {path}")
        try:
            self._retry(self.client.set_terminated, self.run_id, status, attempts=3)
        except Exception as exc:
            print(f"could not mark MLflow run {self.run_id} {status}: {exc}")


class TrackingUnavailable(UserError):
    """The configured MLflow tracking server cannot be reached."""


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail within seconds, with what to do, when an http(s) tracking server does not answer
    (MLflow's own client would retry for minutes before the first step). Local stores need a
    writable folder."""
    if tracking_uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - the user's own server
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                return  # it answers; authentication is MLflow's business
            problem = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            problem = str(getattr(exc, "reason", exc))
        raise TrackingUnavailable(
            f"MLflow tracking server {tracking_uri} is unreachable ({problem}, {timeout_s:.0f} s timeout); start it "
            "(make services-up), or unset MLFLOW_TRACKING_URI / mlflow_tracking_uri to train without tracking")
    db = sqlite_path(tracking_uri)
    if db is not None:
        from moe_engine.io import ensure_writable_dir

        ensure_writable_dir(db.parent, "MLflow store folder")


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI; None for any other store."""
    return Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None


def artifact_store_for(tracking_uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside the database (``<db dir>/artifacts``), not in
    ./mlruns of whatever directory a stage happened to run in. Servers choose their own."""
    db = sqlite_path(tracking_uri)
    return (db.parent / "artifacts").resolve().as_uri() if db is not None else None


def experiment_id(client, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (with :func:`artifact_store_for`) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_store_for(tracking_uri))
    except Exception as exc:  # another run created it between the lookup and now (runs started at once)
        if "RESOURCE_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
            raise
        return client.get_experiment_by_name(name).experiment_id


def _dataset_input(dataset, context, InputTag):
    from mlflow.entities import DatasetInput

    return DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
