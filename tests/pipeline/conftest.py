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
from pipeline_tools import BIN, COVERAGE_HOOK, PASSING_GATE, REPO, TINY, free_port, merge, run, untraced


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
        if src.is_file() and not name.startswith("outputs/"):  # a clean checkout: no results of local runs
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    params = repo / "params.yaml"
    params.write_text(yaml.safe_dump(merge(yaml.safe_load(params.read_text()), TINY), sort_keys=False))
    (repo / "benchmarks" / "gate_baseline.json").write_text(json.dumps(PASSING_GATE))
    (repo / "dvc.lock").unlink(missing_ok=True)  # a fresh clone of the debug config: nothing up to date
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{repo}{os.pathsep}{COVERAGE_HOOK}",
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


def services_env(workspace: dict, port: int) -> dict:
    """The environment `mlflow/services.sh env` gives a shell: the server's API URL, home and auth string."""
    env = {**workspace["env"], "BIN": str(BIN), "PREFECT_PORT": str(port), "MLFLOW_PORT": str(free_port())}
    out = run(["bash", "-c", 'eval "$(mlflow/services.sh env)" && env'], workspace["repo"], env).stdout
    wanted = ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_API_AUTH_STRING")
    env.update({k: v for k, v in (line.split("=", 1) for line in out.splitlines() if "=" in line) if k in wanted})
    return env


@pytest.fixture(scope="module")
def prefect_server(workspace) -> str:
    """The Prefect server, work pool and worker exactly as `make services-up` starts them (mlflow/services.sh:
    127.0.0.1, CORS limited to its UI, the API behind a basic-auth string), in the repository copy."""
    port = free_port()
    env = services_env(workspace, port)
    run(["mlflow/services.sh", "up", "prefect"], workspace["repo"], env, timeout=240)
    workspace["env"] = env
    try:
        yield env["PREFECT_API_URL"]
    finally:
        deadline = time.time() + 60  # a flow run left by a failed test runs in its own session: cancel it first
        while (active := active_flow_runs(workspace["repo"], env)) and time.time() < deadline:
            for flow_run_id in active:
                run([str(BIN / "prefect"), "flow-run", "cancel", flow_run_id], workspace["repo"], env, check=False)
            time.sleep(3)
        run(["mlflow/services.sh", "down", "prefect"], workspace["repo"], env, check=False, timeout=120)


@pytest.fixture(scope="module")
def deployments(workspace, prefect_server) -> str:
    """The deployments of the copy's prefect.yaml on the running server (`make deploy`)."""
    return run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], workspace["repo"], workspace["env"]).stdout


def active_flow_runs(repo, env) -> list[str]:
    out = run([str(BIN / "prefect"), "flow-run", "ls", "--state-type", "RUNNING", "--state-type", "PENDING",
               "--state-type", "CANCELLING", "-o", "json"], repo, untraced(env), check=False).stdout
    return [r["id"] for r in json.loads(out)] if out.strip().startswith("[") else []
