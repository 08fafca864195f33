"""moe_engine.tracking.lineage on a real MLflow sqlite store and a hand-written dvc.lock: stage runs
under a pipeline run, dvc.lock tags, reuse of an earlier run by outs md5, the registry aliases and
the chain ``moe-lab lineage`` prints. The module fixture builds one history; tests only read it."""

import json
import re

import pytest

from moe_engine.cli import main
from moe_engine.tracking import lineage
from moe_engine.tracking.lineage import LineageError

LOCK = """\
schema: '2.0'
stages:
  data:
    cmd: moe-lab data prepare data/demo --params params.yaml --out outputs/data
    deps:
    - {path: data/demo, hash: md5, md5: d3m0.dir}
    params:
      params.yaml:
        data: {tokenizer: {vocab_size: 512}}
    outs:
    - {path: outputs/data, hash: md5, md5: da7a.dir}
  pretrain:
    cmd: moe-lab pretrain --data outputs/data --out outputs/pretrain
    deps:
    - {path: outputs/data, hash: md5, md5: da7a.dir}
    params:
      params.yaml:
        pretrain: {steps: 20, lr: 0.003}
    outs:
    - {path: outputs/pretrain/model, hash: md5, md5: m0de1.dir}
"""


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """One tracked pipeline run (data and pretrain stage runs, model registered), then a second
    pipeline run in which DVC skipped both stages."""
    root = tmp_path_factory.mktemp("lineage")
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    (root / "dvc.lock").write_text(LOCK)
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"sources": ["data/demo"], "domains": {"milton": {"documents": 2, "chars": 9, "ood": True}}}))
    model = root / "outputs" / "pretrain" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")

    first = lineage.start_pipeline(uri, flow_run_id="flow-1", root=root, params={"pretrain.lr": 0.003})
    runs = {}
    for stage, params, artifacts in (("data", {"data": {"tokenizer": {"vocab_size": 512}}}, [manifest]),
                                     ("pretrain", {"steps": 20}, [])):
        made = lineage.stage_run(stage, params, {"loss": 1.5, "note": "text is not a metric"}, artifacts, uri=uri,
                                 parent_run_id=first, flow_run_id="flow-1")
        runs[stage] = lineage.tag_from_dvc_lock(first, stage, root / "dvc.lock", uri)
        assert runs[stage] == made
    version = lineage.register_model(model, "tiny-moe", first, lock_path=root / "dvc.lock", uri=uri)
    lineage.end_pipeline(first, uri)

    second = lineage.start_pipeline(uri, flow_run_id="flow-2", root=root)
    reused = {s: lineage.tag_from_dvc_lock(second, s, root / "dvc.lock", uri) for s in ("data", "pretrain")}
    again = lineage.register_model(model, "tiny-moe", second, lock_path=root / "dvc.lock", uri=uri)
    champion = lineage.promote("tiny-moe", expect_md5="m0de1.dir", gate_run_id="g-1", uri=uri)
    return {"root": root, "uri": uri, "first": first, "second": second, "runs": runs, "reused": reused,
            "version": version, "again": again, "champion": champion}


def test_stage_run_is_a_noop_without_a_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert lineage.stage_run("data", {"a": 1}, {"b": 2.0}, []) is None


def test_stage_run_from_the_pipeline_environment(history, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    env = lineage.pipeline_env(history["first"], history["uri"], "flow-1")
    for key, value in {**env, "DVC_STAGE": "pretrain_dense"}.items():  # DVC names the stage of a shared command
        monkeypatch.setenv(key, value)
    (tmp_path / "report.md").write_text("ok")
    run_id = lineage.stage_run("pretrain", {"router": {"aux_loss_coef": 0.01}}, {"loss": 2.5}, [tmp_path / "report.md"])
    run = MlflowClient(history["uri"]).get_run(run_id)
    tags = run.data.tags
    assert tags["moe_lab.stage"] == "pretrain_dense" and tags["mlflow.parentRunId"] == history["first"]
    assert tags["prefect.flow_run_id"] == "flow-1"
    assert run.data.params["router.aux_loss_coef"] == "0.01" and run.data.metrics["pretrain_dense/loss"] == 2.5
    assert [a.path for a in MlflowClient(history["uri"]).list_artifacts(run_id)] == ["report.md"]


def test_stage_runs_carry_the_dvc_lock_hashes(history):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(history["uri"])
    data = client.get_run(history["runs"]["data"]).data
    assert data.tags["dvc.dep.data/demo"] == "d3m0.dir" and data.tags["dvc.out.outputs/data"] == "da7a.dir"
    assert data.params["data.tokenizer.vocab_size"] == "512" and "note" not in data.metrics
    parent = client.get_run(history["first"]).data.tags
    assert parent["moe_lab.stages"] == "data,pretrain" and parent["moe_lab.stage.data.status"] == "ran"
    assert parent["prefect.flow_run_id"] == "flow-1"


def test_a_skipped_stage_points_at_the_run_that_made_its_outputs(history):
    from mlflow.tracking import MlflowClient

    assert history["reused"] == history["runs"]
    tags = MlflowClient(history["uri"]).get_run(history["second"]).data.tags
    assert tags["moe_lab.stage.pretrain.status"] == "reused"
    assert tags["moe_lab.stage.pretrain.run_id"] == history["runs"]["pretrain"]


def test_unknown_outputs_and_missing_stages(history, tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(LOCK.replace("m0de1.dir", "0ther.dir"))
    assert lineage.tag_from_dvc_lock(history["second"], "pretrain", lock, history["uri"]) is None  # no tracked producer
    with pytest.raises(LineageError, match="not in"):
        lineage.read_lock("gate", lock)


def test_registry_aliases(history):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(history["uri"])
    assert history["again"] == history["version"] == "1"  # the skipped stage's model is not registered twice
    assert client.get_model_version_by_alias("tiny-moe", "candidate").run_id == history["runs"]["pretrain"]
    with pytest.raises(LineageError, match="not the model the gate evaluated"):
        lineage.promote("tiny-moe", expect_md5="something-else", uri=history["uri"])
    assert history["champion"] == "1" and str(client.get_model_version_by_alias("tiny-moe", "champion").version) == "1"


def test_lineage_command_prints_the_chain(history, capsys):
    assert main(["lineage", "models:/tiny-moe@candidate", "--tracking-uri", history["uri"]]) == 0
    out = capsys.readouterr().out
    assert "model    tiny-moe version 1" in out and f"<- pipeline run {history['first']}" in out
    assert "@champion by gate run g-1" in out
    assert re.search(r"dep outputs/data +da7a.dir  = data out", out)  # pretrain read what data wrote
    assert "raw data (manifest.json of run" in out and "data/demo" in out and "(out of domain)" in out
    assert main(["lineage", "tiny-moe", "--tracking-uri", history["uri"], "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in chain["stages"]] == ["data", "pretrain"] and chain["sources"] == ["data/demo"]
    assert main(["lineage", "models:/no-such-model@candidate", "--tracking-uri", history["uri"]]) == 2
    assert "error:" in capsys.readouterr().err
