"""MLflowRun against a real MLflow server: batched logging, an outage without loss, live training metrics."""

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from moe_engine.tracking.mlflow_run import MLflowRun

pytestmark = pytest.mark.slow


def _history(uri, run_id, key):
    q = urllib.parse.urlencode({"run_id": run_id, "metric_key": key, "max_results": 10000})
    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/metrics/get-history?{q}", timeout=10) as r:
        return json.loads(r.read()).get("metrics", [])


def test_a_server_outage_loses_no_metric(mlflow_server, tmp_path):
    run = MLflowRun(mlflow_server.uri, "outage", system_metrics=False, flush_every_s=0.2, fallback_dir=tmp_path)
    for step in range(50):
        run.log_metrics({"loss": 1.0 / (step + 1)}, step)
    assert run.flush(timeout_s=30)
    mlflow_server.stop()  # the server goes away mid-run
    for step in range(50, 100):
        run.log_metrics({"loss": 1.0 / (step + 1)}, step)
    time.sleep(2)  # the background sender fails and keeps the points queued
    mlflow_server.start()
    run.close(timeout_s=60)
    steps = sorted(m["step"] for m in _history(mlflow_server.uri, run.run_id, "loss"))
    assert steps == list(range(100))
    assert not (tmp_path / "unsent_metrics.jsonl").exists()


def test_router_metrics_reach_the_server_while_training_runs(mlflow_server, demo_data, tmp_path):
    code = (
        "from moe_engine.training.trainer import Trainer; "
        f"Trainer(arch='mixtral', data={str(demo_data)!r}, out_dir={str(tmp_path / 'run')!r}, steps=400, "
        f"micro_batch_size=4, log_every=10, save_every=0, eval_batches=1, mlflow_tracking_uri={mlflow_server.uri!r}, "
        "experiment='live').fit()"
    )
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env["OMP_NUM_THREADS"] = "1"  # leave the second core to the tracking server, as on a busy training host
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    key = "router/layer0/load_imbalance"
    seen, run_id = [], None
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            run_id = run_id or _find_run(mlflow_server.uri, "live")
            if run_id:
                n = len(_history(mlflow_server.uri, run_id, key))
                if n and (not seen or n > seen[-1]):
                    seen.append(n)
            time.sleep(1)
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    # the metric was visible, and grew, before the run ended: logged live, not at the end
    assert len(seen) >= 2, seen
    final = _history(mlflow_server.uri, run_id, key)
    assert len(final) == 40 and all(m["value"] >= 1.0 for m in final)


def _find_run(uri, experiment):
    """The first run of an experiment through the REST API, or None while it does not exist yet."""
    try:
        q = urllib.parse.urlencode({"experiment_name": experiment})
        exp = json.loads(urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/get-by-name?{q}", timeout=10).read())
    except OSError:
        return None
    body = json.dumps({"experiment_ids": [exp["experiment"]["experiment_id"]], "max_results": 1}).encode()
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/runs/search", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    runs = json.loads(urllib.request.urlopen(req, timeout=10).read()).get("runs", [])
    return runs[0]["info"]["run_id"] if runs else None


def test_manifest_is_logged_as_a_dataset_input(demo_data, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MLflowRun(uri, "inputs", system_metrics=False, fallback_dir=tmp_path)
    run.log_manifest(demo_data / "manifest.json")
    run.close()
    inputs = MlflowClient(uri).get_run(run.run_id).inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "data"
    assert "manifest.json" in inputs[0].dataset.source and len(inputs[0].dataset.digest) == 16
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    assert '"rows": 1' not in inputs[0].dataset.profile  # one row per split x domain, not a single row


@pytest.mark.slow
def test_four_training_runs_logging_to_one_server_at_once_lose_no_point(mlflow_server, demo_data, tmp_path):
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env["OMP_NUM_THREADS"] = "1"
    procs = []
    for i in range(4):
        code = (
            "from moe_engine.training.trainer import Trainer; "
            f"Trainer(arch='mixtral', data={str(demo_data)!r}, out_dir={str(tmp_path / f'run{i}')!r}, steps=15, seed={i}, "
            f"micro_batch_size=2, log_every=1, save_every=0, eval_batches=1, mlflow_tracking_uri={mlflow_server.uri!r}, "
            "experiment='four').fit()"
        )
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("four").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:  # every step's point of every run arrived
        history = client.get_metric_history(r.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 16)), r.info.run_name
        assert len(client.get_metric_history(r.info.run_id, "router/layer0/load_imbalance")) == 15
    assert not any((tmp_path / f"run{i}" / "unsent_metrics.jsonl").exists() for i in range(4))
