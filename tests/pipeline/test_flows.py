"""The Prefect layer's own pieces, fast: DVC stage runs in a small real DVC repo (skip detection,
error classes for retries), ``-S``-style overrides, prefect.yaml, and ``--help`` everywhere."""

import subprocess
import sys

import pytest
import yaml
from pipeline_tools import BIN, COVERAGE_HOOK, REPO, run
from prefect.states import Failed

from flows.pipeline import as_overrides
from tasks.dvc_stage import StageFailed, StageInputError, reproduce, transient
from tasks.params import apply_params, check_overrides

DVC_YAML = """\
stages:
  make:
    cmd: "grep -o 'n: [0-9]*' params.yaml > out.txt"
    params: [make]
    outs: [out.txt]
  bad_input:
    cmd: exit 2
  crash:
    cmd: exit 3
  killed:
    cmd: kill -TERM $$
"""


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)}
    monkeypatch.setenv("PYTHONPATH", str(COVERAGE_HOOK))  # reproduce()'s dvc: not traced (these stages are shell lines)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text("# how many\nmake:\n  n: 1  # the answer\n")
    run(["git", "init", "-q"], tmp_path, env)
    run([str(BIN / "dvc"), "init", "-q"], tmp_path, env)
    return tmp_path


def test_reproduce_reports_ran_then_skipped(dvc_repo):
    ran, outs, metrics = reproduce(dvc_repo, "make")
    assert ran and outs == ["out.txt"] and metrics == [] and (dvc_repo / "out.txt").read_text() == "n: 1\n"
    assert reproduce(dvc_repo, "make")[0] is False  # unchanged: DVC skips it
    from dvc.utils.hydra import apply_overrides

    apply_overrides(dvc_repo / "params.yaml", ["make.n=7"])
    assert reproduce(dvc_repo, "make")[0] and (dvc_repo / "out.txt").read_text() == "n: 7\n"


def test_stage_failures_are_classified_for_retries(dvc_repo):
    with pytest.raises(StageInputError) as bad:
        reproduce(dvc_repo, "bad_input")
    with pytest.raises(StageFailed) as crash:
        reproduce(dvc_repo, "crash")
    with pytest.raises(StageFailed) as killed:
        reproduce(dvc_repo, "killed")
    assert bad.value.exit_code == 2 and crash.value.exit_code == 3 and not isinstance(crash.value, StageInputError)
    assert not transient(None, None, Failed(data=bad.value))  # exit 2: the inputs are wrong, a retry cannot help
    assert not transient(None, None, Failed(data=crash.value))  # a bug fails the same way again
    assert transient(None, None, Failed(data=killed.value))  # a stage killed by a signal may pass next time


@pytest.mark.parametrize("item, message", [
    ("make.typo=1", "make.typo is not in params.yaml (make has n)"),
    ("+make.new=1", "file selectors, '+'/'~' prefixes and paths are not accepted"),
    ("../../etc/passwd:make.n=1", "file selectors"),
    ("/tmp/x.yaml:make.n=1", "file selectors"),
    ("make=1", "expected SECTION.KEY=VALUE"),
])
def test_overrides_are_checked_keys_of_params_yaml_only(dvc_repo, item, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)").replace("+", "\\+")):
        check_overrides(dvc_repo, [item])


def test_overrides_are_written_like_dvc_exp_run_set_param(tmp_path):
    import shutil

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    apply_params.fn(str(tmp_path), ["pretrain.steps=5"])
    text = (tmp_path / "params.yaml").read_text()
    assert yaml.safe_load(text)["pretrain"]["steps"] == 5 and "# moe_engine.training.config.PretrainConfig" in text
    with pytest.raises(Exception, match="pretrain.steps = 0: must be > 0"):  # the typed config checks the value
        apply_params.fn(str(tmp_path), ["pretrain.steps=0"])


def test_flow_knobs_map_to_params_keys():
    assert as_overrides({"steps": 20, "lr": None, "aux_loss_coef": 0.02}, ["evaluate.batch_size=8"]) == [
        "pretrain.steps=20", "pretrain_dense.steps=20", "pretrain.router.aux_loss_coef=0.02", "evaluate.batch_size=8"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for keys in (k for item in as_overrides({"steps": 1, "arch": "x", "lr": 1, "aux_loss_coef": 1}) for k in [item.split("=")[0]]):
        node = params
        for part in keys.split("."):
            assert part in node, f"{keys} is not in params.yaml"
            node = node[part]


def test_prefect_yaml_deployments():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"nightly", "on-demand", "gate"}
    assert deployments["nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    assert {d["work_pool"]["name"] for d in deployments.values()} == {"moe-lab-local"}
    for d in deployments.values():
        path, name = d["entrypoint"].split(":")
        assert f"def {name}(" in (REPO / path).read_text()


@pytest.mark.parametrize("command", [
    [sys.executable, "flows/pipeline.py", "--help"],
    [sys.executable, "flows/gate.py", "--help"],
    [str(BIN / "moe-lab"), "lineage", "--help"],
    ["mlflow/services.sh", "--help"],
])
def test_help(command):
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and ("usage" in proc.stdout.lower() or "services" in proc.stdout), proc.stderr
