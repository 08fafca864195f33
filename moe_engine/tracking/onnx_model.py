"""MLflow records of the quantize and export stages: lineage to the model they came from, and the
ONNX model logged with MLflow's onnx flavor and registered as a version of the project's model.

    run_id = stage_run("export", params, metrics, artifacts)            # tracking.lineage (None: tracking off)
    record_sources(run_id, {"pretrain": Path("outputs/pretrain/model")})
    log_onnx_model(run_id, Path("outputs/export/model.onnx"), sources={...})  # models:/moe-lab@onnx

Lineage tags on the stage run and on the model version: ``moe_lab.source.<stage>`` (the directory),
``moe_lab.source.<stage>.sha256`` (its weights file) and, inside a pipeline run, ``.run_id`` (the run
of the stage that produced it, from the parent's index). MLflow is imported here only, inside functions.
"""

from __future__ import annotations

import os
from pathlib import Path

ONNX_ALIAS = "onnx"
MODEL_NAME = "moe-lab"  # the project's registered model (flows' --model-name default)


def source_tags(sources: dict[str, str | Path], parent_run_id: str | None = None, uri: str | None = None) -> dict[str, str]:
    """Tags naming each source model: ``{stage: model_dir}`` -> path, weights sha256, producing run."""
    from moe_engine.data.shards import file_sha256
    from moe_engine.tracking.lineage import ENV_PARENT, _client

    tags: dict[str, str] = {}
    parent = parent_run_id or os.environ.get(ENV_PARENT)
    index = _client(uri).get_run(parent).data.tags if parent else {}
    for stage, model_dir in sources.items():
        model_dir = Path(model_dir)
        tags[f"moe_lab.source.{stage}"] = str(model_dir)
        weights = sorted(model_dir.glob("*.safetensors"))
        if weights:
            tags[f"moe_lab.source.{stage}.sha256"] = file_sha256(weights[0])
        run = index.get(f"moe_lab.stage.{stage}.run_id")
        if run:
            tags[f"moe_lab.source.{stage}.run_id"] = run
    return tags


def record_sources(run_id: str | None, sources: dict[str, str | Path], uri: str | None = None) -> dict[str, str]:
    """Tag the stage run ``run_id`` with its sources (no-op when tracking is off, ``run_id`` None)."""
    if run_id is None:
        return {}
    from mlflow.entities import RunTag

    from moe_engine.tracking.lineage import _client

    tags = source_tags(sources, uri=uri)
    _client(uri).log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return tags


def _signature(onnx_path: Path):
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    from onnx import helper

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def spec(value):
        t = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(helper.tensor_dtype_to_np_dtype(t.elem_type), shape, value.name)

    return ModelSignature(inputs=Schema([spec(v) for v in graph.input]), outputs=Schema([spec(v) for v in graph.output]))


def log_onnx_model(run_id: str, onnx_path: str | Path, *, name: str = MODEL_NAME, alias: str = ONNX_ALIAS,
                   sources: dict[str, str | Path] | None = None, uri: str | None = None) -> dict[str, str]:
    """Log ``onnx_path`` (with its external data) in run ``run_id`` with the onnx flavor, register it as
    a new version of ``name`` and point ``alias`` at it; returns ``{"model_uri", "version", "model_id"}``."""
    import mlflow
    import onnx

    from moe_engine.tracking.lineage import TAG_STAGE, _client, tracking_uri

    onnx_path = Path(onnx_path)
    uri = tracking_uri(uri)
    client = _client(uri)
    tags = {"moe_lab.format": "onnx", **source_tags(sources or {}, uri=uri)}
    stage = client.get_run(run_id).data.tags.get(TAG_STAGE)
    if stage:
        tags[TAG_STAGE] = stage
    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # the fluent API (log_model) and the registry resolve through it
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="onnx", registered_model_name=name,
                                         signature=_signature(onnx_path), tags=tags, await_registration_for=0)
    finally:  # back to what the environment says (set_tracking_uri(None) also unsets $MLFLOW_TRACKING_URI)
        mlflow.set_tracking_uri(env)
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, alias, version)
    return {"model_uri": info.model_uri, "version": version, "model_id": info.model_id or ""}
