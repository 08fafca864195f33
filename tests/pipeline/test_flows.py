"""The Prefect layer's own pieces, fast: DVC stage runs in a small real DVC repo (skip detection,
error classes for retries), ``-S``-style overrides, prefect.yaml, and ``--help`` everywhere."""

import subprocess
import sys

import pytest
import yaml
from pipeline_tools import BIN, COVERAGE_HOOK, REPO, run
from prefect.states import Failed

from flows.pipeline import as_overrides
from tasks.dvc_stage import RestoreError, StageFailed, StageInputError, main, reproduce, restore_outputs, transient
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
  trained:  # a stage like pretrain: a cached folder, uncached metrics and plot data; fails when n is 7
    cmd: >-
      grep -q 'n: 7' params.yaml && exit 3 || { mkdir -p model && grep -o 'n: [0-9]*' params.yaml > model/w.txt &&
      echo '{"loss": 1.5}' > metrics.json && printf 'step,loss\\n1,1.5\\n' > history.csv; }
    params: [make]
    outs: [model]
    metrics: [{metrics.json: {cache: false}}]
    plots: [{history.csv: {cache: false}}]
  gate:  # the gate's shape: its report is its verdict; crashes before writing one when n is 7
    cmd: >-
      grep -q 'n: 7' params.yaml && exit 1 || { mkdir -p outputs/gate && echo '{"passed": true}' > outputs/gate/report.json
      && echo pass > outputs/gate/report.md; }
    params: [make]
    outs: [outputs/gate/report.md]
    metrics: [{outputs/gate/report.json: {cache: false}}]
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


def test_a_failed_stage_gets_its_last_good_outputs_back(dvc_repo, capsys):
    from dvc.utils.hydra import apply_overrides

    outputs = ["model/w.txt", "metrics.json", "history.csv"]
    assert reproduce(dvc_repo, "trained")[0]
    good = {name: (dvc_repo / name).read_bytes() for name in outputs}
    lock = (dvc_repo / "dvc.lock").read_bytes()
    apply_overrides(dvc_repo / "params.yaml", ["make.n=7"])
    with pytest.raises(StageFailed, match="last good outputs .* back in place: history.csv, metrics.json, model") as failed:
        reproduce(dvc_repo, "trained")  # DVC removed all three before the command failed
    assert failed.value.restored == ("history.csv", "metrics.json", "model")
    assert {name: (dvc_repo / name).read_bytes() for name in outputs} == good and (dvc_repo / "dvc.lock").read_bytes() == lock
    assert not list(dvc_repo.glob(".*.restoring"))

    run([str(BIN / "dvc"), "repro", "trained"], dvc_repo, {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(dvc_repo)}, check=False)
    assert not (dvc_repo / "model").exists() and not (dvc_repo / "metrics.json").exists()  # a plain dvc repro
    assert main(["restore", "--root", str(dvc_repo)]) == 0  # every stage of dvc.lock
    assert {name: (dvc_repo / name).read_bytes() for name in outputs} == good
    assert "trained: restored history.csv, metrics.json, model" in capsys.readouterr().out
    (dvc_repo / "metrics.json").write_text("mine")  # present outputs are never overwritten
    assert restore_outputs(dvc_repo, "trained") == [] and (dvc_repo / "metrics.json").read_text() == "mine"

    (dvc_repo / "model" / "w.txt").unlink()
    (dvc_repo / "model").rmdir()
    for obj in (dvc_repo / ".dvc" / "cache").rglob("*"):  # as after a `dvc gc` that dropped the model's file
        if obj.is_file() and obj.read_bytes() == good["model/w.txt"]:
            obj.chmod(0o644)
            obj.unlink()
    with pytest.raises(RestoreError, match="model not in DVC's cache .*: `dvc repro trained` makes them again"):
        restore_outputs(dvc_repo, "trained")
    assert not (dvc_repo / "model").exists() and not list(dvc_repo.glob(".*.restoring"))
    assert main(["restore", "--root", str(dvc_repo), "make"]) == 2  # never completed
    assert "make not in" in capsys.readouterr().err


def test_a_gate_that_crashes_is_not_given_the_last_runs_verdict(dvc_repo):
    from dvc.utils.hydra import apply_overrides

    from tasks.stages import gate

    assert reproduce(dvc_repo, "gate")[0]  # a passing verdict, recorded in dvc.lock
    apply_overrides(dvc_repo / "params.yaml", ["make.n=7"])
    with pytest.raises(StageFailed) as crashed:  # exit 1 like a regression, but the report there is the old one
        gate.fn(str(dvc_repo))
    assert crashed.value.exit_code == 1 and "outputs/gate/report.json" in crashed.value.restored
    assert (dvc_repo / "outputs/gate/report.json").read_text() == '{"passed": true}\n'  # kept, as the last good run's


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
    [sys.executable, "-m", "tasks.dvc_stage", "restore", "--help"],
    ["mlflow/services.sh", "--help"],
])
def test_help(command):
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and ("usage" in proc.stdout.lower() or "services" in proc.stdout), proc.stderr
