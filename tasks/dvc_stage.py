"""Run one DVC stage, stream its output into the Prefect logs, record its lineage, summarise it.

``dvc repro --single-item <stage>`` runs the stage's command only when its deps, params or outs changed
since dvc.lock (or restores it from DVC's run cache); an unchanged stage is skipped. It runs as a
child process whose output is forwarded line by line to the Prefect run logger, so the training
progress (one line every ``log_every`` steps without a terminal) is visible in the Prefect UI.

Failures: a stage that rejected its inputs (exit code 2, the moe-lab convention), diverged, or hit
a bug (exit 1) fails the same way again, so only what may be transient is retried: another DVC
process holding the repository lock, or the stage killed by a signal (a node going away).

DVC removes a stage's outputs before it runs the command, so a failed run would leave them missing.
``reproduce`` puts the last good ones back (``restore_outputs``: the hashes dvc.lock recorded, copied
from DVC's cache, metrics and plot data included, since the run cache keeps those too). The same
works after a plain ``dvc repro``: ``python -m tasks.dvc_stage restore [STAGE ...]`` (``make restore``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

SIGNALLED = {-9, -15, 137, 143}  # killed / terminated: worth another try


class StageFailed(RuntimeError):
    """The stage failed. ``transient`` says whether a retry may help."""

    def __init__(self, message: str, exit_code: int | None = None, transient: bool = False,
                 restored: tuple[str, ...] = ()):
        super().__init__(message)
        self.exit_code = exit_code  # the stage command's exit code, when it ran and failed
        self.transient = transient
        self.restored = restored  # the outputs put back as dvc.lock recorded them: the last good run's, not this one's


class StageInputError(StageFailed):
    """The stage command rejected its inputs (exit code 2, the moe-lab convention): a retry cannot help."""


@dataclass
class Tracking:
    """Where a stage's MLflow run goes: the pipeline parent run, its store, the Prefect flow run."""

    uri: str
    parent_run_id: str
    flow_run_id: str | None = None

    def env(self) -> dict[str, str]:
        from moe_engine.tracking.lineage import pipeline_env

        return pipeline_env(self.parent_run_id, self.uri, self.flow_run_id)


@dataclass
class StageResult:
    stage: str
    ran: bool  # False: DVC skipped it (unchanged)
    outs: dict[str, str | None] = field(default_factory=dict)  # path -> md5 in dvc.lock
    metrics: dict[str, dict] = field(default_factory=dict)  # metrics file -> its content
    run_id: str | None = None  # the MLflow run that holds this stage's outputs
    exit_code: int | None = None  # the command's exit code when it failed
    passed: bool | None = None  # the gate stage only: did every check pass (None: no comparable baseline)


def transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only what may pass the next time."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, StageFailed) and exc.transient


def _logger():
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # not inside a Prefect run: plain output
        return None


def _declared(root: Path, stage: str) -> tuple[list[str], list[str]]:
    """(outs, metrics files) of the stage as dvc.yaml declares them (outs include its plot data)."""
    import yaml

    spec = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}).get(stage)
    if spec is None:
        raise StageFailed(f"dvc.yaml in {root} has no stage {stage!r}")
    names = lambda items: [i if isinstance(i, str) else next(iter(i)) for i in items or []]  # noqa: E731
    return names(spec.get("outs")) + names(spec.get("plots")) + names(spec.get("metrics")), names(spec.get("metrics"))


def reproduce(root: Path, stage: str, env: dict[str, str] | None = None) -> tuple[bool, list[str], list[str]]:
    """Reproduce one stage; returns (ran, outs, metrics files). Output goes to the Prefect log."""
    root = Path(root)
    outs, metrics = _declared(root, stage)
    dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(dvc) if dvc.exists() else "dvc", "repro", "--single-item", stage]
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    logger = _logger()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=root, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    for raw in proc.stdout:
        for line in raw.replace("\r", "\n").splitlines():  # a progress bar without a terminal becomes lines
            if not line.strip():
                continue
            lines.append(line)
            if logger is not None:
                logger.info("%s | %s", stage, line)
            else:
                print(f"{stage} | {line}", flush=True)
    code = proc.wait()
    text = "\n".join(lines)
    if code != 0:
        tail = "\n".join(lines[-25:])
        if "Unable to acquire lock" in text or "is locked" in text:  # the other process may be running it: hands off
            raise StageFailed(f"stage {stage}: another DVC process holds the repository lock\n{tail}", None, transient=True)
        found = re.findall(r"exited with (-?\d+)", text)
        exit_code = int(found[-1]) if found else None
        restored, note = _restore_after_failure(root, stage)
        tail += note
        if exit_code == 2:
            raise StageInputError(f"stage {stage} rejected its inputs (exit code 2):\n{tail}", exit_code,
                                  restored=restored)
        raise StageFailed(f"stage {stage} failed (exit code {exit_code}):\n{tail}", exit_code,
                          transient=exit_code in SIGNALLED, restored=restored)
    ran = f"Running stage '{stage}'" in text
    return ran, outs, metrics


class RestoreError(RuntimeError):
    """A missing output could not be brought back (its stage never completed, or the cache lost it)."""


def restore_outputs(root: str | Path, stage: str) -> list[str]:
    """Put back the outputs of ``stage`` that are missing from the workspace, as dvc.lock recorded them.

    Only missing paths are written (an output present in any state is left alone), each beside its place
    and renamed in, from DVC's cache: cached outputs are there by definition, and uncached metrics and plot
    data because DVC's run cache commits them too. Returns the paths restored; raises ``RestoreError``
    naming what cannot be restored (``dvc gc`` removed it, or the stage never completed).
    """
    from dvc.repo import Repo

    root = Path(root).resolve()
    entry = locked_stages(root).get(stage) or {}  # absent: it never completed, nothing good to go back to
    missing = [out for out in entry.get("outs", []) if not (root / out["path"]).exists() and out.get("md5")]
    if not missing:
        return []
    restored, lost = [], []
    with Repo(str(root)) as repo, repo.lock:
        for out in missing:
            odb = repo.cache.local if out.get("hash") == "md5" else repo.cache.legacy  # no `hash:`: a DVC 2 entry
            try:
                _place(root / out["path"], out["md5"], odb)
                restored.append(out["path"])
            except FileNotFoundError:
                lost.append(out["path"])
    if lost:
        done = f"restored {', '.join(restored)}; " if restored else ""
        raise RestoreError(f"stage {stage}: {done}{', '.join(lost)} not in DVC's cache (a fresh clone, or `dvc gc` "
                           f"removed them): `dvc repro {stage}` makes them again")
    return restored


def locked_stages(root: Path) -> dict[str, dict]:
    """dvc.lock's stages (those that completed), {} when there is no dvc.lock."""
    import yaml

    lock = root / "dvc.lock"
    return ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}) if lock.exists() else {}


def _place(target: Path, md5: str, odb) -> None:
    """Copy the cache object ``md5`` (a file, or a directory listing ``*.dir``) to ``target`` atomically."""
    tmp = target.with_name(f".{target.name}.restoring")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    try:
        if md5.endswith(".dir"):
            for item in json.loads(Path(odb.oid_to_path(md5)).read_text()):
                dest = tmp / item["relpath"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(odb.oid_to_path(item["md5"]), dest)  # not copy2: cache objects are read-only
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(odb.oid_to_path(md5), tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _restore_after_failure(root: Path, stage: str) -> tuple[tuple[str, ...], str]:
    """Restore after a failure: (the paths restored, the line that says so for the error message)."""
    try:
        restored = tuple(restore_outputs(root, stage))
    except Exception as err:  # noqa: BLE001 - the stage's own failure is the error to raise; say this one too
        return (), f"\nits last good outputs could not all be restored: {err}"
    return restored, f"\nits last good outputs (dvc.lock) are back in place: {', '.join(restored)}" if restored else ""


def read_metrics(root: Path, files: list[str]) -> dict[str, dict]:
    return {f: json.loads((root / f).read_text()) for f in files if (root / f).exists()}


def record_lineage(root: Path, result: StageResult, tracking: Tracking | None, artifacts: list[str]) -> str | None:
    """Tag the stage's MLflow run with dvc.lock hashes; log a run here when no tracked run made the outputs."""
    if tracking is None:
        return None
    from moe_engine.tracking import lineage

    lock = root / "dvc.lock"
    run_id = lineage.tag_from_dvc_lock(tracking.parent_run_id, result.stage, lock, tracking.uri)
    if run_id is None:  # the command does not log itself, or its outputs predate any tracked run
        entry = lineage.read_lock(result.stage, lock)
        files = [root / f for f in [*result.metrics, *artifacts]]
        metrics = {k: v for content in result.metrics.values() for k, v in lineage.flatten(content).items()}
        made = lineage.stage_run(result.stage, entry["params"], metrics, files, uri=tracking.uri,
                                 parent_run_id=tracking.parent_run_id, flow_run_id=tracking.flow_run_id,
                                 status="ran" if result.ran else "adopted")
        if made is None:
            raise StageFailed(f"stage {result.stage}: could not log its MLflow run at {tracking.uri}", transient=True)
        run_id = lineage.tag_from_dvc_lock(made, result.stage, lock, tracking.uri)
    return run_id


def run_stage(root: str | Path, stage: str, tracking: Tracking | None = None,
              artifacts: tuple[str, ...] = ()) -> StageResult:
    """The body of every stage task: reproduce, read metrics and dvc.lock hashes, record lineage, publish."""
    from moe_engine.tracking.lineage import read_lock

    root = Path(root).resolve()
    ran, outs, metrics_files = reproduce(root, stage, tracking.env() if tracking else None)
    result = StageResult(stage, ran, outs=dict.fromkeys(outs), metrics=read_metrics(root, metrics_files))
    result.outs.update(read_lock(stage, root / "dvc.lock")["outs"])
    result.run_id = record_lineage(root, result, tracking, list(artifacts))
    publish(result, tracking)
    return result


def publish(result: StageResult, tracking: Tracking | None = None, note: str = "") -> None:
    """A markdown Prefect artifact per stage: what DVC did, the outputs' md5s, the metrics, the MLflow run."""
    from prefect.artifacts import create_markdown_artifact

    from moe_engine.tracking.lineage import flatten

    status = "ran" if result.ran else "skipped by DVC (unchanged)"
    if result.exit_code is not None:
        status = f"failed (exit code {result.exit_code})"
    lines = [f"### DVC stage `{result.stage}`: {status}", note, "", "| output | md5 (dvc.lock) |", "|---|---|"]
    lines += [f"| `{path}` | `{md5 or '-'}` |" for path, md5 in result.outs.items()]
    for name, values in result.metrics.items():
        lines += ["", f"**{name}**", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in flatten(values).items()
                  if not isinstance(v, (list, dict))]
    if tracking is not None:
        lines += ["", f"MLflow: stage run `{result.run_id}` under pipeline run `{tracking.parent_run_id}` ({tracking.uri})"]
    create_markdown_artifact("\n".join(lines), key=f"stage-{result.stage.replace('_', '-')}",
                             description=f"DVC stage {result.stage}: {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.dvc_stage",
        description="After a failed `dvc repro`: put back the last good outputs (as dvc.lock recorded them) that DVC "
                    "removed before running the stage, from DVC's cache. Outputs that exist are left alone.")
    sub = parser.add_subparsers(dest="command", required=True)
    restore = sub.add_parser("restore", help="restore the missing outputs of STAGEs (default: every stage in dvc.lock)")
    restore.add_argument("stages", nargs="*", metavar="STAGE")
    restore.add_argument("--root", default=".", help="the DVC repository (default: the current folder)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    known = locked_stages(root)
    if not known:
        print(f"error: {root / 'dvc.lock'} lists no stage: nothing to restore (dvc.lock records a stage's outputs "
              "when it completes; run `dvc repro`)", file=sys.stderr)
        return 2
    stages = args.stages or list(known)
    unknown = [s for s in stages if s not in known]
    if unknown:
        print(f"error: {', '.join(unknown)} not in {root / 'dvc.lock'} (it has {', '.join(known)}): "
              "a stage that never completed has no outputs to restore", file=sys.stderr)
        return 2
    code = 0
    for stage in stages:
        try:
            restored = restore_outputs(root, stage)
        except RestoreError as err:
            print(f"error: {err}", file=sys.stderr)
            code = 1
            continue
        print(f"{stage}: restored {', '.join(restored)}" if restored else f"{stage}: nothing missing")
    return code


if __name__ == "__main__":
    sys.exit(main())
