"""A failed quantization gate stops `dvc repro` at the quantize stage (the stage after it does not run)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(cmd, cwd, env):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_failed_gate_stops_dvc_repro_at_the_stage(demo_model, demo_data, tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(demo_model, root / "model")
    hook = REPO / "tests" / "coverage_hook"  # dvc itself is not traced by make test's coverage, its moe-lab stage is
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": f"{REPO}{os.pathsep}{hook}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    params = {"quantize": {"bits": 4, "attention": True, "dense": True,
                           "gate": {"int4_max_ppl_increase": 0.0, "max_sequences": 32}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    stages = {"stages": {
        "quantize": {"cmd": f"moe-lab quantize --model model --data {demo_data} --params params.yaml --out q",
                     "deps": ["model"], "params": ["quantize"], "outs": ["q/model"],
                     "metrics": [{"q/metrics.json": {"cache": False}}]},
        "after": {"cmd": "cp q/metrics.json after.json", "deps": ["q/metrics.json"], "outs": ["after.json"]},
    }}
    (root / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        assert _run(cmd, root, env).returncode == 0
    proc = _run(["dvc", "repro"], root, env)
    assert proc.returncode != 0
    assert "quality gate failed for the int4 model" in proc.stdout + proc.stderr
    assert not (root / "after.json").exists() and not (root / "q" / "model").exists()
    # loosened, the same pipeline runs through
    params["quantize"]["gate"]["int4_max_ppl_increase"] = 0.03
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    proc = _run(["dvc", "repro"], root, env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (root / "after.json").exists()
