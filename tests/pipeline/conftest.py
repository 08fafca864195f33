"""Fixtures that run the real tools: a temporary copy of the repository (its own git, debug-size
params), a Prefect server and a process worker, an MLflow sqlite store. Every process started
here is stopped by its fixture's finalizer, the worker before the server."""

import json
import os
import shutil
import subprocess
import time

import pytest
import yaml
from pipeline_tools import BIN, PASSING_GATE, REPO, TINY, free_port, merge, run, stop, wait_healthy


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A copy of the repository's tracked and untracked-not-ignored files with its own git repo
    (DVC experiments need a commit and an identity), debug-size params and a passing gate."""
    base = tmp_path_factory.mktemp("pipeline")
    repo = base / "repo"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    params = repo / "params.yaml"
    params.write_text(yaml.safe_dump(merge(yaml.safe_load(params.read_text()), TINY), sort_keys=False))
    (repo / "benchmarks" / "gate_baseline.json").write_text(json.dumps(PASSING_GATE))
    (repo / "dvc.lock").unlink(missing_ok=True)  # a fresh clone of the debug config: nothing up to date
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(repo),
           "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow' / 'mlflow.db'}", "PREFECT_HOME": str(base / "prefect"),
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    env.pop("PREFECT_API_URL", None)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # stage processes start their own group
        env.pop(key, None)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"], ["git", "config", "user.name", "ci"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "debug-size pipeline"]):
        run(cmd, repo, env)
    if not (repo / ".dvc").is_dir():
        run([str(BIN / "dvc"), "init", "-q"], repo, env)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], repo, env)
    return {"repo": repo, "env": env, "base": base, "mlflow_uri": env["MLFLOW_TRACKING_URI"]}


@pytest.fixture(scope="module")
def prefect_server(workspace) -> str:
    port, log = free_port(), workspace["base"] / "prefect-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=workspace["base"], env=workspace["env"], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/api/health", proc, log)
        workspace["env"]["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        yield workspace["env"]["PREFECT_API_URL"]
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def deployments(workspace, prefect_server) -> list[str]:
    """The work pool, the deployments of the copy's prefect.yaml, and a worker running them."""
    repo, env, prefect = workspace["repo"], workspace["env"], str(BIN / "prefect")
    run([prefect, "work-pool", "create", "moe-lab-local", "--type", "process"], repo, env)
    run([prefect, "work-pool", "set-concurrency-limit", "moe-lab-local", "1"], repo, env)  # as mlflow/services.sh
    out = run([prefect, "--no-prompt", "deploy", "--all"], repo, env).stdout
    log = workspace["base"] / "prefect-worker.log"
    with open(log, "w") as stream:
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "moe-lab-local", "--type", "process"], cwd=repo,
                                  env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield out
    finally:  # a flow run left by a failed test runs in its own session: cancel it while the worker can
        deadline = time.time() + 60
        while (active := active_flow_runs(repo, env)) and time.time() < deadline:
            for flow_run_id in active:
                run([prefect, "flow-run", "cancel", flow_run_id], repo, env, check=False)
            time.sleep(3)
        stop(worker)


def active_flow_runs(repo, env) -> list[str]:
    out = run([str(BIN / "prefect"), "flow-run", "ls", "--state-type", "RUNNING", "--state-type", "PENDING",
               "--state-type", "CANCELLING", "-o", "json"], repo, env, check=False).stdout
    return [r["id"] for r in json.loads(out)] if out.strip().startswith("[") else []
