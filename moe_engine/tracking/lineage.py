"""Lineage: one MLflow run per DVC stage under a pipeline parent run, each tagged with the
dvc.lock hashes of what it read and wrote, so a registered model leads back to the raw data.

The contract with the orchestration (``flows/``, ``tasks/``):

* the flow opens the parent run (``start_pipeline``) and passes ``pipeline_env(...)`` to the stage
  processes (DVC's ``run_env``): ``MLFLOW_TRACKING_URI``, ``MOE_LAB_PARENT_RUN_ID``,
  ``MOE_LAB_PREFECT_FLOW_RUN_ID``;
* a stage command calls ``stage_run(stage, params, metrics, artifacts)``: a child run of the parent
  (a no-op when ``MLFLOW_TRACKING_URI`` is unset, so plain ``dvc repro`` logs nothing);
* after the stage, the Prefect task calls ``tag_from_dvc_lock(parent, stage)``: it tags the stage's
  run with the dvc.lock hashes, or, when DVC skipped the stage, points the parent at the earlier run
  whose outputs have the same md5s;
* ``register_model`` logs the model directory as an MLflow LoggedModel of its producing stage run
  and registers it (alias ``candidate``); ``promote`` moves ``champion``; ``describe`` walks it all back.

The parent run keeps an index, ``moe_lab.stage.<stage>.run_id`` / ``.status`` (ran | reused |
adopted), so a lineage query needs no search. MLflow is imported inside functions only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ENV_URI = "MLFLOW_TRACKING_URI"
ENV_PARENT = "MOE_LAB_PARENT_RUN_ID"
ENV_FLOW_RUN = "MOE_LAB_PREFECT_FLOW_RUN_ID"
EXPERIMENT = "moe-lab"  # the trainer's default too: stage runs nest under their pipeline run in the UI

TAG_KIND = "moe_lab.kind"  # pipeline | stage
TAG_STAGE = "moe_lab.stage"
TAG_STATUS = "moe_lab.stage_status"  # ran | adopted (outputs in the workspace, producer untracked) | failed
TAG_OUTS = "moe_lab.outs_md5"  # one digest over the stage's outs, to find the run that made them
TAG_STAGES = "moe_lab.stages"  # on the parent: stages recorded, in order
TAG_FLOW_RUN = "prefect.flow_run_id"
TAG_GIT = "mlflow.source.git.commit"
TAG_PARENT = "mlflow.parentRunId"


class LineageError(RuntimeError):
    """A lineage record is missing or inconsistent (message says which)."""


# ----------------------------------------------------------------------------- helpers
def tracking_uri(uri: str | None = None, root: str | Path | None = None) -> str:
    """The given URI, else $MLFLOW_TRACKING_URI, else the project's store <root>/mlflow/mlflow.db."""
    uri = uri or os.environ.get(ENV_URI)
    if uri:
        return uri
    return f"sqlite:///{(Path(root or '.').resolve() / 'mlflow' / 'mlflow.db')}"


def _client(uri: str | None):
    from mlflow.tracking import MlflowClient

    from moe_engine.tracking.mlflow_run import sqlite_path

    uri = tracking_uri(uri)
    db = sqlite_path(uri)
    if db is not None:  # sqlite does not create the folder of its file
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(uri)


def _experiment_id(client, name: str, uri: str) -> str:
    from moe_engine.tracking.mlflow_run import experiment_id

    return experiment_id(client, name, uri)


def git_commit(root: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip() if out.returncode == 0 else ""
    return commit or None


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: params.yaml sections and metrics files as MLflow keys."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _key(text: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space /; anything else (e.g. '=' in a path) becomes '_'
    return re.sub(r"[^\w\-. /]", "_", text).strip("/")[:250]


# ----------------------------------------------------------------------------- dvc.lock
def read_lock(stage: str, lock_path: str | Path = "dvc.lock") -> dict:
    """The stage's entry of dvc.lock as {cmd, deps: {path: md5}, outs: {path: md5}, params: {key: value}}."""
    import yaml

    lock_path = Path(lock_path)
    if not lock_path.exists():
        raise LineageError(f"{lock_path} does not exist: run the pipeline (dvc repro) first")
    entry = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}).get(stage)
    if entry is None:
        raise LineageError(f"stage {stage!r} is not in {lock_path} (it never completed)")
    params = {}
    for values in (entry.get("params") or {}).values():
        params.update(flatten(values))
    return {
        "cmd": " ".join(entry["cmd"]) if isinstance(entry.get("cmd"), list) else entry.get("cmd", ""),
        "deps": {d["path"]: d.get("md5") for d in entry.get("deps", [])},
        "outs": {o["path"]: o.get("md5") for o in entry.get("outs", [])},
        "params": params,
    }


def outs_digest(outs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(outs.items())).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- runs
def start_pipeline(uri: str | None = None, *, run_name: str = "pipeline", params: dict | None = None,
                   flow_run_id: str | None = None, root: str | Path = ".", experiment: str = EXPERIMENT) -> str:
    """Open the pipeline's parent run; returns its id (the flow closes it with ``end_pipeline``)."""
    uri = tracking_uri(uri, root)
    client = _client(uri)
    tags = {TAG_KIND: "pipeline", TAG_FLOW_RUN: flow_run_id or "", TAG_GIT: git_commit(root) or ""}
    run_id = client.create_run(_experiment_id(client, experiment, uri), run_name=run_name,
                               tags={k: v for k, v in tags.items() if v}).info.run_id
    for key, value in flatten(params or {}).items():
        client.log_param(run_id, _key(key), str(value)[:6000])
    return run_id


def end_pipeline(run_id: str, uri: str | None = None, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status)


def pipeline_env(parent_run_id: str, uri: str, flow_run_id: str | None = None) -> dict[str, str]:
    """The environment a stage process needs to log its run under the parent."""
    env = {ENV_URI: uri, ENV_PARENT: parent_run_id}
    if flow_run_id:
        env[ENV_FLOW_RUN] = flow_run_id
    return env


def stage_tags(stage: str, *, status: str = "ran", parent_run_id: str | None = None,
               flow_run_id: str | None = None, description: str | None = None) -> dict[str, str]:
    """The lineage tags every stage's MLflow run carries, whichever code logs it (``stage_run`` here, the
    training loop's MLflow callback for pretrain and finetune): stage, kind, status, pipeline parent,
    Prefect flow run, git commit, and what the run is."""
    stage = os.environ.get("DVC_STAGE") or stage
    tags = {TAG_KIND: "stage", TAG_STAGE: stage, TAG_STATUS: status,
            TAG_PARENT: parent_run_id or os.environ.get(ENV_PARENT),
            TAG_FLOW_RUN: flow_run_id or os.environ.get(ENV_FLOW_RUN), TAG_GIT: git_commit(),
            "mlflow.note.content": description or _description(stage)}
    return {k: v for k, v in tags.items() if v}


def stage_run(stage: str, params: dict, metrics: dict, artifacts: list[Path], *, uri: str | None = None,
              parent_run_id: str | None = None, flow_run_id: str | None = None, status: str = "ran") -> str | None:
    """Log a finished stage as one MLflow run; returns its id, or None when tracking is off.

    Tracking is on when ``uri`` or $MLFLOW_TRACKING_URI is set; the parent and the Prefect flow run
    come from the arguments or the pipeline environment. ``$DVC_STAGE`` (set by DVC for every stage
    command) wins over ``stage``, because one command serves two stages (pretrain, pretrain_dense).
    Never fails the stage: a tracking error is printed and None returned (the Prefect task then
    records the stage itself from dvc.lock).
    """
    uri = uri or os.environ.get(ENV_URI)
    if not uri:
        return None
    stage = os.environ.get("DVC_STAGE") or stage
    parent = parent_run_id or os.environ.get(ENV_PARENT)
    run_id = None
    try:
        from mlflow.entities import Metric, Param

        client = _client(uri)
        if parent:
            exp_id = client.get_run(parent).info.experiment_id
        else:
            exp_id = _experiment_id(client, os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT), uri)
        tags = stage_tags(stage, status=status, parent_run_id=parent, flow_run_id=flow_run_id)
        run_id = client.create_run(exp_id, run_name=stage, tags=tags).info.run_id
        items = [Param(_key(k), str(v)[:6000]) for k, v in flatten(params or {}).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=items[i:i + 100])
        numbers = {k: float(v) for k, v in flatten(metrics or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # grouped under the stage's name in the MLflow UI (evaluate/moe.val_loss is not pretrain's val/loss)
        client.log_batch(run_id, metrics=[Metric(_key(f"{stage}/{k}"), v, 0, 0) for k, v in numbers.items()])
        for path in map(Path, artifacts or []):
            if path.is_dir():
                client.log_artifacts(run_id, str(path), path.name)
            elif path.exists():
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")
        return run_id
    except Exception as exc:  # tracking must never fail a finished stage
        print(f"warning: MLflow stage run for {stage!r} not logged: {exc}", file=sys.stderr)
        if run_id is not None:
            try:
                client.set_terminated(run_id, "FAILED")
            except Exception:
                pass  # the store is down: the run stays RUNNING, which is what it is
        return None


def _description(stage: str) -> str:
    from moe_engine.stages import PIPELINE

    found = next((s for s in PIPELINE if s.name == stage), None)
    return f"Stage `{stage}`: {found.description}." if found is not None else ""


def _index(client, parent: str, stage: str, run_id: str, status: str) -> None:
    """Record on the parent which run holds the stage (and keep the stage order)."""
    from mlflow.entities import RunTag

    stages = [s for s in client.get_run(parent).data.tags.get(TAG_STAGES, "").split(",") if s]
    tags = {f"moe_lab.stage.{stage}.run_id": run_id, f"moe_lab.stage.{stage}.status": status,
            TAG_STAGES: ",".join(stages + [stage] * (stage not in stages))}
    client.log_batch(parent, tags=[RunTag(k, v) for k, v in tags.items()])


def _tag_stage_run(client, run_id: str, lock: dict) -> None:
    from mlflow.entities import RunTag

    tags = {f"dvc.dep.{_key(p)}": md5 for p, md5 in lock["deps"].items()}
    tags.update({f"dvc.out.{_key(p)}": md5 for p, md5 in lock["outs"].items()})
    tags[TAG_OUTS] = outs_digest(lock["outs"])
    tags[TAG_KIND] = "stage"
    tags["dvc.lock"] = json.dumps({k: lock[k] for k in ("cmd", "deps", "outs")})[:8000]
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def tag_from_dvc_lock(run_id_or_parent: str, stage: str, lock_path: str | Path = "dvc.lock",
                      uri: str | None = None) -> str | None:
    """Tag the stage's run with its dvc.lock deps/outs md5s; returns the run that holds the stage.

    Given a stage run: tags it. Given the pipeline parent: tags the parent's child run for ``stage``;
    when there is none (DVC skipped the stage, or restored it from its run cache), finds the latest
    run whose outs carry the same md5s and records it on the parent as ``reused``. Returns None when
    no tracked run produced these outputs (the caller may then log one, see ``stage_run``).
    """
    client = _client(uri)
    lock = read_lock(stage, lock_path)
    run = client.get_run(run_id_or_parent)
    tags = run.data.tags
    if TAG_STAGE in tags:  # a stage run (ours, or the trainer's own MLflowRun)
        _tag_stage_run(client, run.info.run_id, lock)
        if tags.get(TAG_PARENT):
            _index(client, tags[TAG_PARENT], stage, run.info.run_id, tags.get(TAG_STATUS, "ran"))
        return run.info.run_id
    parent = run.info.run_id
    exp = [e.experiment_id for e in client.search_experiments()]  # a stage may log to its own experiment
    mine = client.search_runs(exp, f"tags.{TAG_PARENT} = '{parent}' and tags.`{TAG_STAGE}` = '{stage}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if mine:
        return tag_from_dvc_lock(mine[0].info.run_id, stage, lock_path, uri)
    earlier = client.search_runs(exp, f"tags.`{TAG_OUTS}` = '{outs_digest(lock['outs'])}' and tags.`{TAG_STAGE}` = '{stage}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not earlier:
        return None
    _index(client, parent, stage, earlier[0].info.run_id, "reused")
    return earlier[0].info.run_id


# ----------------------------------------------------------------------------- model registry
def register_model(model_dir: str | Path, name: str, parent_run_id: str, *, stage: str = "pretrain",
                   alias: str = "candidate", lock_path: str | Path = "dvc.lock", uri: str | None = None) -> str:
    """Register ``model_dir`` (a save_pretrained folder, a DVC out of ``stage``) and set ``alias``.

    The folder is logged as the artifacts of an MLflow LoggedModel whose source run is the stage run
    that produced it (as recorded on the parent); if that run's model is already registered (DVC
    skipped the stage), its version gets the alias instead of a duplicate. Returns the version.
    """
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    run_id = client.get_run(parent_run_id).data.tags.get(f"moe_lab.stage.{stage}.run_id")
    if not run_id:
        raise LineageError(f"the pipeline run {parent_run_id} has no {stage!r} stage run; record the stage first")
    model_dir = Path(model_dir)
    out = Path(os.path.relpath(model_dir.resolve(), Path(lock_path).resolve().parent)).as_posix()  # as dvc.lock names it
    md5 = read_lock(stage, lock_path)["outs"].get(out)
    if md5 is None:
        raise LineageError(f"{out} is not an output of stage {stage!r} in {lock_path}")
    md5_tag = f"dvc.out.{_key(out)}"
    same = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'") if v.tags.get(md5_tag) == md5]
    if same:
        version = same[0].version
    else:
        exp_id = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(exp_id, name=name, source_run_id=run_id, model_type="transformers",
                                            tags={md5_tag: md5})
        client.log_model_artifacts(logged.model_id, str(model_dir))
        client.finalize_logged_model(logged.model_id, "READY")
        try:
            client.create_registered_model(name)
        except MlflowException as exc:  # already there
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # source = the LoggedModel's artifact location, not models:/<id>: MLflow's sqlite registry resolves
        # a models:/ source through the process-global tracking URI, which need not be this store
        version = client.create_model_version(name, logged.artifact_location, run_id=run_id, model_id=logged.model_id,
                                              tags={md5_tag: md5, TAG_STAGE: stage, "moe_lab.logged_model_id": logged.model_id}).version
    client.set_registered_model_alias(name, alias, version)
    return str(version)


def promote(name: str, *, from_alias: str = "candidate", to_alias: str = "champion", expect_md5: str | None = None,
            gate_run_id: str | None = None, uri: str | None = None) -> str:
    """Point ``to_alias`` at the version ``from_alias`` names; with ``expect_md5``, only if that version
    holds exactly those model bytes (the ones the gate judged). ``gate_run_id`` is kept on the version
    (tag ``moe_lab.<to_alias>.gate_run_id``). Returns the version."""
    client = _client(uri)
    version = client.get_model_version_by_alias(name, from_alias)
    if expect_md5 is not None:
        held = [v for k, v in version.tags.items() if k.startswith("dvc.out.")]
        if expect_md5 not in held:
            raise LineageError(f"{name}@{from_alias} (version {version.version}, md5 {held}) is not the model the gate "
                               f"evaluated (md5 {expect_md5}); run the pipeline to register it first")
    client.set_registered_model_alias(name, to_alias, version.version)
    if gate_run_id:
        client.set_model_version_tag(name, version.version, f"moe_lab.{to_alias}.gate_run_id", gate_run_id)
    return str(version.version)


# ----------------------------------------------------------------------------- query
def resolve_version(client, ref: str):
    """``models:/name@alias``, ``models:/name/3``, ``name@alias`` or ``name`` (latest version)."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return client.get_model_version(name, version)
    versions = client.search_model_versions(f"name = '{ref}'")
    if not versions:
        raise LineageError(f"no registered model named {ref!r}")
    return max(versions, key=lambda v: int(v.version))


def describe(ref: str, uri: str | None = None) -> dict:
    """The chain behind a registered model: version -> producing run -> pipeline parent -> every stage
    run with its dvc.lock deps/outs -> the raw sources listed in the data manifest."""
    import tempfile

    client = _client(uri)
    version = resolve_version(client, ref)
    if not version.run_id:
        raise LineageError(f"{version.name} version {version.version} names no source run")
    run = client.get_run(version.run_id)
    out = {"model": {"name": version.name, "version": str(version.version), "aliases": sorted(version.aliases),
                     "source": version.source, "tags": dict(version.tags)},
           "run": _run_summary(run), "pipeline": None, "stages": [], "sources": [], "sources_run": None, "domains": {}}
    parent_id = run.data.tags.get(TAG_PARENT)
    stage_runs = [(run.data.tags.get(TAG_STAGE, "?"), run.info.run_id, run.data.tags.get(TAG_STATUS, "ran"))]
    if parent_id:
        parent = client.get_run(parent_id)
        ptags = parent.data.tags
        out["pipeline"] = {**_run_summary(parent), "flow_run_id": ptags.get(TAG_FLOW_RUN), "params": dict(parent.data.params)}
        stage_runs = [(s, ptags[f"moe_lab.stage.{s}.run_id"], ptags.get(f"moe_lab.stage.{s}.status", "?"))
                      for s in ptags.get(TAG_STAGES, "").split(",") if f"moe_lab.stage.{s}.run_id" in ptags]
    for stage, run_id, status in stage_runs:
        tags = client.get_run(run_id).data.tags
        lock = json.loads(tags.get("dvc.lock", "{}"))
        out["stages"].append({"stage": stage, "status": status, "run_id": run_id, "cmd": lock.get("cmd", ""),
                              "deps": lock.get("deps", {}), "outs": lock.get("outs", {})})
        if out["sources_run"] is None and any(a.path == "manifest.json" for a in client.list_artifacts(run_id)):
            with tempfile.TemporaryDirectory() as tmp:
                manifest = json.loads(Path(client.download_artifacts(run_id, "manifest.json", tmp)).read_text())
            out["sources"], out["sources_run"] = list(manifest.get("sources", [])), run_id
            out["domains"] = manifest.get("domains", {})
    return out


def _run_summary(run) -> dict:
    tags = run.data.tags
    return {"id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "stage": tags.get(TAG_STAGE), "git_commit": tags.get(TAG_GIT), "start_time": run.info.start_time}
