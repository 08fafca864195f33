"""The export stage's MLflow record against a real sqlite store: the ONNX model logged with MLflow's onnx
flavor, registered as a version of the project's model (alias ``onnx``) with lineage to its source."""

import numpy as np
import onnxruntime as ort
import pytest

import moe_engine as me
from moe_engine.cli import main
from moe_engine.data.shards import file_sha256


@pytest.fixture
def source(tmp_path):
    me.build_model("mixtral", "tiny", seed=0).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_export_logs_and_registers_the_onnx_model(source, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "onnx"
    args = ["export", "--model", str(source), "--out", str(out), "--no-past", "--set", "latency.enabled=false"]
    assert main(args) == 0
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("moe-lab", "onnx")
    run = client.get_run(version.run_id)
    assert run.data.tags["moe_lab.stage"] == "export" and run.data.metrics["export/parity_max"] <= 1e-4
    sha = file_sha256(source / "model.safetensors")
    for tags in (run.data.tags, version.tags):
        assert tags["moe_lab.source.pretrain"] == str(source) and tags["moe_lab.source.pretrain.sha256"] == sha
    assert version.tags["moe_lab.format"] == "onnx"
    loaded = mlflow.pyfunc.load_model("models:/moe-lab@onnx")  # through $MLFLOW_TRACKING_URI
    assert loaded.metadata.flavors.get("onnx") is not None
    ids = np.random.default_rng(0).integers(0, 512, (2, 9)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got = loaded.predict(feed)["logits"]
    want = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # another export's run is a new version, and the alias follows it
    from moe_engine.tracking.lineage import stage_run
    from moe_engine.tracking.onnx_model import log_onnx_model

    run_id = stage_run("export", {}, {}, [], uri=uri)
    info = log_onnx_model(run_id, out / "model.onnx", sources={"pretrain": source}, uri=uri)
    assert int(info["version"]) == int(version.version) + 1
    assert client.get_model_version_by_alias("moe-lab", "onnx").version == int(info["version"])


def test_quantize_run_is_tagged_with_its_source_model(source, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["quantize", "--model", str(source), "--out", str(tmp_path / "q"), "--bits", "4",
                 "--set", "gate.enabled=false"]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`moe_lab.stage` = 'quantize'")
    assert run.data.tags["moe_lab.source.pretrain.sha256"] == file_sha256(source / "model.safetensors")
    assert run.data.params["bits"] == "4" and run.data.metrics["quantize/sizes.disk_ratio"] < 1
