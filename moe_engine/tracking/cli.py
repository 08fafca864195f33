"""``moe-lab lineage``: print the chain behind a registered model, back to the raw data files."""

from __future__ import annotations

import argparse
import json
import sys


def run_lineage(args: argparse.Namespace) -> int:
    import os

    from moe_engine.tracking.lineage import LineageError, describe, tracking_uri
    from moe_engine.tracking.mlflow_run import sqlite_path

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stdout the chain only
    uri = tracking_uri(args.tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():  # reading must not create a store
        print(f"error: no MLflow store at {uri}; run the pipeline first or pass --tracking-uri", file=sys.stderr)
        return 2
    try:
        chain = describe(args.model, uri)
    except LineageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # MLflow's "not found" errors, an unreachable server: one readable line
        print(f"error: cannot read the lineage of {args.model!r} from {uri}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(chain, indent=2) if args.json else format_chain(chain))
    return 0


def format_chain(chain: dict) -> str:
    m, run, pipe = chain["model"], chain["run"], chain["pipeline"]
    aliases = f" @{', @'.join(m['aliases'])}" if m["aliases"] else ""
    source = f"logged model {m['tags']['moe_lab.logged_model_id']}" if "moe_lab.logged_model_id" in m["tags"] else m["source"]
    lines = [f"model    {m['name']} version {m['version']}{aliases}  ({source})",
             f"  <- run {run['id']}  stage {run['stage'] or '?'}, {run['status']}"]
    lines[1:1] = [f"  @{k.split('.')[1]} by gate run {v}" for k, v in sorted(m["tags"].items()) if k.endswith(".gate_run_id")]
    if pipe:
        params = ", ".join(f"{k}={v}" for k, v in sorted(pipe["params"].items())) or "no overrides"
        lines.append(f"  <- pipeline run {pipe['id']}  ({pipe['name']}, {pipe['status']}; prefect flow run "
                     f"{pipe['flow_run_id'] or '-'}; git {(pipe['git_commit'] or '-')[:12]}; {params})")
    else:
        lines.append("  <- no pipeline parent (the run was logged outside a pipeline)")
    made_by: dict[str, tuple[str, str]] = {}  # out path -> (stage, md5): shows each dep's producer
    for s in chain["stages"]:
        note = "" if s["status"] == "ran" else f" ({s['status']}: DVC did not rerun it here)" if s["status"] == "reused" else f" ({s['status']})"
        lines.append(f"stage {s['stage']:<15} run {s['run_id']}{note}")
        for path, md5 in s["deps"].items():
            src = made_by.get(path)
            link = "" if src is None else f"  = {src[0]} out" if src[1] == md5 else f"  != {src[0]} out {src[1]}"
            lines.append(f"    dep {path:<40} {md5}{link}")
        for path, md5 in s["outs"].items():
            made_by[path] = (s["stage"], md5)
            lines.append(f"    out {path:<40} {md5}")
    if chain["sources_run"]:
        lines.append(f"raw data (manifest.json of run {chain['sources_run']}): {', '.join(chain['sources'])}")
        for name, info in chain["domains"].items():
            lines.append(f"    {name:<20} {info.get('documents', '?'):>6} documents {info.get('chars', '?'):>10} chars"
                         + ("  (out of domain)" if info.get("ood") else ""))
    else:
        lines.append("raw data: no stage run logged a data manifest (manifest.json)")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "lineage", help="print how a registered model was made, back to the raw data",
        description="Walk the MLflow lineage of a registered model: version -> producing run -> pipeline run -> "
        "each stage run with its dvc.lock deps/outs md5s -> the raw source files of the data manifest.",
    )
    p.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, NAME@ALIAS or NAME (latest version)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow/mlflow.db)")
    p.add_argument("--json", action="store_true", help="print the chain as JSON")
    p.set_defaults(func=run_lineage)
