"""A flow run's own workspace: a git worktree of the project's HEAD under ``outputs/runs/<name>``
sharing the project's DVC cache, so a run with overrides never touches the tracked params.yaml, the
project's outputs or its dvc.lock, and two runs at once cannot corrupt each other. DVC's run cache
(in the shared cache) restores every stage whose command, deps and params a run has seen before, so
an isolated run recomputes only what its overrides change. The workspace is kept (its outputs are the
run's results); ``git worktree remove outputs/runs/<name>`` deletes it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE


def _git(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout


@task(name="run-workspace", cache_policy=NO_CACHE)
def run_workspace(root: str, name: str) -> str:
    """Create ``root/outputs/runs/<name>`` (a detached worktree at HEAD) with root's DVC cache; returns its path."""
    root_path = Path(root).resolve()
    target = root_path / "outputs" / "runs" / re.sub(r"[^\w.-]+", "-", name).strip("-")
    if target.exists():
        raise RuntimeError(f"run workspace {target} exists already; pick another name or remove it "
                           f"(git worktree remove {target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    _git(["worktree", "add", "--detach", str(target), "HEAD"], root_path)
    dvc = Path(sys.executable).with_name("dvc")
    cache = root_path / ".dvc" / "cache"
    subprocess.run([str(dvc) if dvc.exists() else "dvc", "cache", "dir", "--local", str(cache)], cwd=target,
                   check=True, capture_output=True)
    return str(target)
