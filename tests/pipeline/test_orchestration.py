"""The orchestration end to end on the debug-size pipeline, in one temporary copy of the repository.
The tests run in order, each on the state the previous one left (one pipeline, one history):

1. the on-demand deployment (real Prefect server + process worker) runs every DVC stage, logs one
   MLflow run per stage under a pipeline run, registers the model (@candidate) and gates it (@champion);
2. a second ``dvc repro`` skips every stage;
3. changing a pretrain param makes ``dvc repro`` rerun pretrain, evaluate, analyze and gate only;
4. a flow run with an override (as ``dvc exp run -S``) reruns only what it touches, and each skipped
   stage points at the run that made its outputs (reused) or gets one that records them (adopted);
5. the gate deployment promotes the new candidate; a regression fails it and keeps the champion;
6. ``moe-lab lineage`` walks from the champion back to the raw data files.
"""

import json

import pytest
import yaml
from pipeline_tools import BIN, run

pytestmark = pytest.mark.slow

STAGES = ["data", "pretrain", "pretrain_dense", "evaluate", "analyze", "gate"]


def deployment_run(ws: dict, name: str, *params: str, check: bool = True):
    cmd = [str(BIN / "prefect"), "deployment", "run", name, "--watch", "--watch-interval", "2", "--watch-timeout", "420"]
    for p in params:
        cmd += ["-p", p]
    return run(cmd, ws["repo"], ws["env"], timeout=450, check=check)


def client(ws):
    from mlflow.tracking import MlflowClient

    return MlflowClient(ws["mlflow_uri"])


def pipeline_runs(ws) -> list:
    c = client(ws)
    return c.search_runs([e.experiment_id for e in c.search_experiments()], "tags.`moe_lab.kind` = 'pipeline'",
                         order_by=["attributes.start_time ASC"])


def index(parent) -> dict[str, tuple[str, str]]:
    """stage -> (run id, status) as recorded on a pipeline run."""
    tags = parent.data.tags
    return {s: (tags[f"moe_lab.stage.{s}.run_id"], tags[f"moe_lab.stage.{s}.status"]) for s in tags["moe_lab.stages"].split(",")}


def lock(ws) -> dict:
    return yaml.safe_load((ws["repo"] / "dvc.lock").read_text())["stages"]


def outs(ws, stage: str) -> dict[str, str]:
    return {o["path"]: o["md5"] for o in lock(ws)[stage]["outs"]}


def test_pipeline_deployment_runs_every_stage_with_lineage(workspace, deployments):
    ws = workspace
    assert "moe-lab-pipeline/nightly" in deployments and "moe-lab-pipeline/on-demand" in deployments
    assert "moe-lab-gate/gate" in deployments
    deployment_run(ws, "moe-lab-pipeline/on-demand")

    repo = ws["repo"]
    for path in ("outputs/data/manifest.json", "outputs/pretrain/model/config.json", "outputs/pretrain_dense/model",
                 "outputs/evaluate/metrics.json", "outputs/analyze/report.html", "outputs/gate/report.md"):
        assert (repo / path).exists(), path
    assert set(lock(ws)) == set(STAGES)

    (parent,) = pipeline_runs(ws)
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"]
    stages = index(parent)
    assert list(stages) == STAGES and {status for _, status in stages.values()} == {"ran"}
    c = client(ws)
    for stage, (run_id, _) in stages.items():  # one run per stage, a child of the pipeline run, with dvc.lock hashes
        run_ = c.get_run(run_id)
        assert run_.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run_.data.tags["moe_lab.stage"] == stage
        for out in lock(ws)[stage]["outs"]:
            assert run_.data.tags[f"dvc.out.{out['path']}"] == out["md5"]
        for dep in lock(ws)[stage]["deps"]:
            assert run_.data.tags[f"dvc.dep.{dep['path']}"] == dep["md5"]
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["moe_lab.stage"] for r in children) == sorted(STAGES)  # no duplicates

    version = c.get_model_version_by_alias("moe-lab", "candidate")
    assert version.run_id == stages["pretrain"][0] and c.get_model_version_by_alias("moe-lab", "champion").version == version.version
    listed = json.loads(run([str(BIN / "prefect"), "artifact", "ls", "-o", "json"], repo, ws["env"]).stdout)
    assert {"stage-data", "stage-pretrain-dense", "stage-gate", "model-candidate", "model-champion"} <= {a["key"] for a in listed}


def test_second_dvc_repro_skips_everything(workspace):
    out = run([str(BIN / "dvc"), "repro"], workspace["repo"], workspace["env"]).stdout
    assert "Running stage" not in out
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in out


def test_pretrain_param_change_reruns_downstream_only(workspace):
    params = workspace["repo"] / "params.yaml"
    values = yaml.safe_load(params.read_text())
    values["pretrain"]["lr"] = 0.002
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    env = {k: v for k, v in workspace["env"].items() if k != "MLFLOW_TRACKING_URI"}  # a plain, untracked dvc repro
    out = run([str(BIN / "dvc"), "repro"], workspace["repo"], env).stdout
    ran = {stage for stage in STAGES if f"Running stage '{stage}'" in out}
    assert ran == {"pretrain", "evaluate", "analyze", "gate"}


def test_override_flow_reruns_what_it_touches_and_links_skipped_stages(workspace):
    ws = workspace
    deployment_run(ws, "moe-lab-pipeline/on-demand", 'overrides=["evaluate.max_sequences=16"]', "gate=false")
    assert yaml.safe_load((ws["repo"] / "params.yaml").read_text())["evaluate"]["max_sequences"] == 16  # as -S leaves it
    assert run([str(BIN / "dvc"), "exp", "list", "--all-commits"], ws["repo"], ws["env"]).stdout.strip()  # saved experiment

    first, second = pipeline_runs(ws)
    before, now = index(first), index(second)
    assert {s: status for s, (_, status) in now.items()} == {
        "data": "reused", "pretrain": "adopted", "pretrain_dense": "reused", "evaluate": "ran", "analyze": "adopted"}
    assert now["data"][0] == before["data"][0] and now["pretrain_dense"][0] == before["pretrain_dense"][0]
    c = client(ws)
    adopted = c.get_run(now["pretrain"][0])  # made by the untracked `dvc repro` above: recorded from dvc.lock
    assert adopted.data.tags["dvc.out.outputs/pretrain/model"] == outs(ws, "pretrain")["outputs/pretrain/model"]
    candidate, champion = (c.get_model_version_by_alias("moe-lab", a) for a in ("candidate", "champion"))
    assert candidate.run_id == now["pretrain"][0] and int(candidate.version) == int(champion.version) + 1


def test_gate_deployment_promotes_then_refuses_a_regression(workspace):
    ws, c = workspace, client(workspace)
    deployment_run(ws, "moe-lab-gate/gate")
    candidate = c.get_model_version_by_alias("moe-lab", "candidate").version
    assert c.get_model_version_by_alias("moe-lab", "champion").version == candidate

    baseline = ws["repo"] / "benchmarks" / "gate_baseline.json"
    failing = {"checks": [{"name": "MoE validation loss", "source": "evaluate", "key": "moe.val_loss",
                           "baseline": 0.01, "better": "lower", "tolerance": 0.0}]}
    baseline.write_text(json.dumps(failing))
    result = deployment_run(ws, "moe-lab-gate/gate", check=False)
    assert result.returncode != 0
    assert c.get_model_version_by_alias("moe-lab", "champion").version == candidate  # unchanged
    gate_runs = c.search_runs([e.experiment_id for e in c.search_experiments()],
                              "tags.`moe_lab.stage` = 'gate' and tags.`moe_lab.stage_status` = 'failed'")
    assert len(gate_runs) == 1 and gate_runs[0].data.metrics["passed"] == 0
    assert json.loads((ws["repo"] / "outputs/gate/report.json").read_text())["passed"] is False


def test_lineage_command_walks_back_to_raw_data(workspace):
    out = run([str(BIN / "moe-lab"), "lineage", "models:/moe-lab@champion"], workspace["repo"], workspace["env"]).stdout
    data_md5 = outs(workspace, "data")["outputs/data"]
    assert "@candidate, @champion" in out and "<- pipeline run" in out and "@champion by gate run" in out
    for stage in ["data", "pretrain", "pretrain_dense", "evaluate", "analyze"]:
        assert f"stage {stage}" in out
    assert "dep outputs/data" in out and f"{data_md5}  = data out" in out  # pretrain read what data wrote
    assert "(reused" in out and "(adopted)" in out
    assert "raw data (manifest.json of run" in out and "data/demo" in out and "milton" in out
