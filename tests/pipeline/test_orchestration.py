"""The orchestration end to end on the debug-size pipeline, in one temporary copy of the repository,
against a Prefect server started as `make services-up` starts it. The tests run in order, each on the
state the previous one left (one pipeline, one history):

1. the server is locked down: no API call without its auth string, no cross-origin answer but its UI's;
2. the on-demand deployment, as the README runs it, runs every DVC stage (logs in the Prefect UI),
   logs one MLflow run per stage under a pipeline run, registers the models (@candidate) and gates them;
3. a second ``dvc repro`` skips every stage; changing a pretrain param reruns exactly its downstream;
4. runs with overrides (as the README's ``-p steps=...``) run in their own workspaces: the tracked
   params.yaml and the project's outputs are untouched, two at once do not collide, unchanged stages
   are restored from DVC's run cache and point at the runs that made them, a run with other settings
   than the gate baseline's gets no false verdict;
5. the gate deployment promotes the candidate; a regression fails it and keeps the champion;
6. ``moe-lab lineage`` walks from the champion back to the raw data files.
"""

import json
import time
import urllib.error
import urllib.request

import pytest
import yaml
from pipeline_tools import BIN, run, untraced

from moe_engine.stages import PIPELINE

pytestmark = pytest.mark.slow

STAGES = [s.name for s in PIPELINE]


def deployment_run(ws: dict, name: str, *params: str, check: bool = True, watch: bool = True):
    cmd = [str(BIN / "prefect"), "deployment", "run", name]
    if watch:
        # the whole debug pipeline took 9+ minutes on a loaded 2-core host (540 s timed out there once)
        cmd += ["--watch", "--watch-interval", "2", "--watch-timeout", "900"]
    for p in params:
        cmd += ["-p", p]
    return run(cmd, ws["repo"], ws["env"], timeout=960, check=check)


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


def lock(root) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def outs(root, stage: str) -> dict[str, str]:
    return {o["path"]: o["md5"] for o in lock(root)[stage]["outs"]}


def test_the_prefect_server_needs_its_auth_string_and_answers_only_its_ui_origin(workspace, prefect_server):
    url = prefect_server.rstrip("/")
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{url}/flows/filter", data=b"{}", timeout=10)
    assert denied.value.code == 401
    import base64

    token = base64.b64encode(workspace["env"]["PREFECT_API_AUTH_STRING"].encode()).decode()
    ui = url.removesuffix("/api")
    for origin, allowed in (("http://evil.example", False), (ui, True)):
        request = urllib.request.Request(f"{url}/health", headers={"Origin": origin, "Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert (response.headers.get("access-control-allow-origin") == origin) is allowed, origin
    assert ui.startswith("http://127.0.0.1:")


def test_pipeline_deployment_runs_every_stage_with_lineage(workspace, deployments):
    ws = workspace
    assert "moe-lab-pipeline/nightly" in deployments and "moe-lab-pipeline/on-demand" in deployments
    assert "moe-lab-gate/gate" in deployments
    watched = deployment_run(ws, "moe-lab-pipeline/on-demand")

    repo = ws["repo"]
    for path in ("outputs/data/manifest.json", "outputs/pretrain/model/config.json", "outputs/pretrain_dense/model",
                 "outputs/finetune/adapter", "outputs/evaluate/metrics.json", "outputs/benchmark/compare.md",
                 "outputs/quantize/model/config.json", "outputs/export/model.onnx",
                 "outputs/analyze/report.html", "outputs/gate/report.md"):
        assert (repo / path).exists(), path
    assert set(lock(repo)) == set(STAGES)

    (parent,) = pipeline_runs(ws)
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"]
    stages = index(parent)
    assert list(stages) == STAGES and {status for _, status in stages.values()} == {"ran"}
    c = client(ws)
    for stage, (run_id, _) in stages.items():  # one run per stage, a child of the pipeline run, with dvc.lock hashes
        run_ = c.get_run(run_id)
        assert run_.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run_.data.tags["moe_lab.stage"] == stage
        for out in lock(repo)[stage]["outs"]:
            assert run_.data.tags[f"dvc.out.{out['path']}"] == out["md5"]
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["moe_lab.stage"] for r in children) == sorted(STAGES)  # no duplicates
    # what the MLflow UI shows: names saying what each run is, metric groups, constants as params, colours
    moe_run, dense_run = c.get_run(stages["pretrain"][0]), c.get_run(stages["pretrain_dense"][0])
    assert "MoE" in moe_run.info.run_name and "dense baseline" in dense_run.info.run_name
    assert moe_run.data.tags["mlflow.note.content"].startswith("Stage `pretrain`")
    groups = {key.split("/")[0] for key in moe_run.data.metrics}
    assert {"train", "val", "ood", "router", "cost"} <= groups and "loss" not in moe_run.data.metrics
    assert "params_total" in moe_run.data.params and "params_total" not in moe_run.data.metrics
    assert moe_run.data.tags["mlflow.runColor"] != dense_run.data.tags["mlflow.runColor"]
    assert c.get_run(stages["evaluate"][0]).data.metrics["evaluate/moe_minus_dense.val"] is not None
    assert c.get_run(stages["analyze"][0]).info.status == "FINISHED"

    version = c.get_model_version_by_alias("moe-lab", "candidate")
    assert version.run_id == stages["pretrain"][0] and c.get_model_version_by_alias("moe-lab", "champion").version == version.version
    assert c.get_model_version_by_alias("moe-lab-finetuned", "candidate").run_id == stages["finetune"][0]
    listed = json.loads(run([str(BIN / "prefect"), "artifact", "ls", "-o", "json"], repo, ws["env"]).stdout)
    assert {"stage-data", "stage-pretrain-dense", "stage-gate", "model-candidate-pretrain", "model-champion"} <= {a["key"] for a in listed}
    # the stages' own output reached the Prefect logs: plain progress lines, no carriage returns
    import re

    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", watched.stdout).group(1)
    logs = run([str(BIN / "prefect"), "flow-run", "logs", flow_run_id], repo, {**ws["env"], "COLUMNS": "500"}).stdout
    assert "pretrain | pretrain step 20/20" in logs and "\r" not in logs and "finetune | " in logs
    assert "Completed" in watched.stdout


def test_second_dvc_repro_skips_everything_and_a_param_change_reruns_downstream_only(workspace):
    out = run([str(BIN / "dvc"), "repro"], workspace["repo"], workspace["env"]).stdout
    assert "Running stage" not in out
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in out
    params = workspace["repo"] / "params.yaml"
    text = params.read_text()
    values = yaml.safe_load(text)
    values["finetune"]["lr"] = 0.002  # finetune's outputs feed benchmark and the gate, nothing else
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    env = {k: v for k, v in workspace["env"].items() if k != "MLFLOW_TRACKING_URI"}  # a plain, untracked dvc repro
    try:
        out = run([str(BIN / "dvc"), "repro"], workspace["repo"], env, timeout=600).stdout
    finally:
        params.write_text(text)
    ran = {stage for stage in STAGES if f"Running stage '{stage}'" in out}
    assert ran == {"finetune", "benchmark", "gate"}
    run([str(BIN / "dvc"), "repro"], workspace["repo"], env, timeout=600)  # back to the committed settings (run cache)
    # editing a module re-runs exactly the stages whose commands import it, and what reads their outputs
    module = workspace["repo"] / "moe_engine" / "data" / "span_corruption.py"
    source = module.read_text()
    module.write_text(source + "\n# edited\n")
    try:
        status = json.loads(run([str(BIN / "dvc"), "status", "--json"], workspace["repo"], env).stdout)
    finally:
        module.write_text(source)
    changed = {name for name, entries in status.items()
               if any(isinstance(e, dict) and "changed deps" in e for e in entries)}
    importers = {"pretrain", "pretrain_dense", "finetune", "evaluate", "benchmark", "quantize", "export", "analyze"}
    assert changed == importers, changed  # not data, not gate


@pytest.mark.timeout(1200)
def test_override_runs_are_isolated_concurrent_and_get_no_false_verdict(workspace):
    ws = workspace
    repo = ws["repo"]
    params_before = (repo / "params.yaml").read_text()
    project_lock = (repo / "dvc.lock").read_text()
    # two at once, as a schedule and a person would start them: queued by the pool, each in its own workspace.
    # Overrides that re-run one stage each (a -p steps=... run re-runs every stage after data: several
    # minutes more on 2 cores; the flow maps steps to these same overrides, tests/pipeline/test_flows.py)
    for args in (('overrides=["evaluate.max_sequences=16"]',), ('overrides=["analyze.max_tokens=128"]', "gate=false")):
        deployment_run(ws, "moe-lab-pipeline/on-demand", *args, watch=False)
    deadline = time.time() + 840
    quiet = untraced(ws["env"])  # each poll starts Prefect's CLI: ~3 s of CPU, twice that under coverage
    while time.time() < deadline:
        listed = json.loads(run([str(BIN / "prefect"), "flow-run", "ls", "-o", "json", "--flow-name", "moe-lab-pipeline"],
                                repo, quiet).stdout)
        states = [r["state"]["type"] for r in listed if not r.get("auto_scheduled")]  # not the nightly's future runs
        if len(states) == 3 and all(s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states):
            break
        time.sleep(15)
    if states.count("COMPLETED") != 3:  # say why, with the end of each unfinished run's log
        tails = [f"{r['name']} {r['state']['type']}:\n" + run([str(BIN / "prefect"), "flow-run", "logs", r["id"]], repo,
                                                             {**ws["env"], "COLUMNS": "300"}).stdout[-3000:]
                 for r in listed if not r.get("auto_scheduled") and r["state"]["type"] != "COMPLETED"]
        pytest.fail(f"flow runs {states}\n" + "\n".join(tails))
    assert (repo / "params.yaml").read_text() == params_before and (repo / "dvc.lock").read_text() == project_lock
    workspaces = sorted((repo / "outputs" / "runs").iterdir())
    assert len(workspaces) == 2
    by_param = {yaml.safe_load((w / "params.yaml").read_text())["evaluate"]["max_sequences"]: w for w in workspaces}
    evaluated, analyzed = by_param[16], by_param[32]
    assert yaml.safe_load((analyzed / "params.yaml").read_text())["analyze"]["max_tokens"] == 128
    # the gate baseline was measured with evaluate.max_sequences 32: no verdict on 16, not a false regression
    assert json.loads((evaluated / "outputs" / "gate" / "report.json").read_text())["passed"] is None
    # gate=false: the run left the gate's outputs as its commit has them (none, or the committed demo's)
    assert run(["git", "status", "--porcelain", "--", "outputs/gate"], analyzed, ws["env"]).stdout == ""
    for w in (evaluated, analyzed):  # the same model as the project's
        assert outs(w, "pretrain")["outputs/pretrain/model"] == outs(repo, "pretrain")["outputs/pretrain/model"]
    assert run([str(BIN / "dvc"), "exp", "list", "--all-commits"], repo, ws["env"]).stdout.strip()  # saved experiments

    runs = pipeline_runs(ws)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    first = index(runs[0])
    isolated = index(next(r for r in runs[1:] if r.data.params.get("evaluate.max_sequences") == "16"))
    # every stage the override does not touch is restored from DVC's run cache (plot data and metrics are
    # the only uncached outputs, which keeps stages in the run cache) and points at the run that made it
    analyzed_run = index(next(r for r in runs[1:] if r.data.params.get("analyze.max_tokens") == "128"))
    assert "gate" not in analyzed_run
    for record, changed in ((isolated, {"evaluate", "gate"}), (analyzed_run, {"analyze"})):
        assert {s for s, (_, status) in record.items() if status == "ran"} == changed
        assert all(status == "reused" for s, (_, status) in record.items() if s not in changed)
        assert record["data"][0] == first["data"][0] and record["pretrain"][0] == first["pretrain"][0]


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
    assert len(gate_runs) == 1 and gate_runs[0].data.metrics["gate/passed"] == 0 and gate_runs[0].info.status == "FAILED"
    assert json.loads((ws["repo"] / "outputs/gate/report.json").read_text())["passed"] is False


def test_lineage_command_walks_back_to_raw_data(workspace):
    out = run([str(BIN / "moe-lab"), "lineage", "models:/moe-lab@champion"], workspace["repo"], workspace["env"]).stdout
    data_md5 = outs(workspace["repo"], "data")["outputs/data"]
    assert "@candidate, @champion" in out and "<- pipeline run" in out and "@champion by gate run" in out
    for stage in ["data", "pretrain", "pretrain_dense", "finetune", "evaluate", "benchmark", "quantize", "export", "analyze"]:
        assert f"stage {stage}" in out
    assert "dep outputs/data" in out and f"{data_md5}  = data out" in out  # pretrain read what data wrote
    assert "raw data (manifest.json of run" in out and "data/demo" in out and "milton" in out
