"""Flow parameters -> params overrides, checked before anything runs, applied to a run's own
workspace (never to the tracked params.yaml of the project).

An override is ``section.key=value`` (``dvc exp run -S`` syntax, DVC's own parser applies it): the key
must already exist in params.yaml (no new keys, no other files, no paths), and the result must pass
the stage's typed config (``moe_engine.stages``), so a typo or a bad value fails the flow run at once
with the valid keys named, before any stage starts.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

_ITEM = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)+=")


def check_overrides(root: str | Path, overrides: list[str]) -> dict[str, str]:
    """{key: value} of valid overrides; raises ValueError naming the bad item and what is allowed."""
    from moe_engine.config import read_params

    params = read_params(Path(root) / "params.yaml")
    checked: dict[str, str] = {}
    for item in overrides:
        if not isinstance(item, str) or not _ITEM.match(item):
            raise ValueError(f"override {item!r}: expected SECTION.KEY=VALUE for a key of params.yaml (e.g. pretrain.lr=1e-3); "
                             "file selectors, '+'/'~' prefixes and paths are not accepted")
        key, value = item.split("=", 1)
        node, path = params, []
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(path) or "params.yaml"
                have = ", ".join(map(str, node)) if isinstance(node, dict) else "no keys"
                raise ValueError(f"override {item!r}: {key} is not in params.yaml ({where} has {have})")
            node, path = node[part], [*path, part]
        if isinstance(node, dict):
            raise ValueError(f"override {item!r}: {key} is a section; set one of its keys ({', '.join(map(str, node))})")
        checked[key] = value
    return checked


def validate_sections(root: str | Path) -> None:
    """Every params.yaml section through its stage's typed config (ConfigError -> ValueError with the key)."""
    from moe_engine.config import load_section
    from moe_engine.stages import PIPELINE, sections

    for stage in PIPELINE:
        cls = stage.config_class()
        if cls is not None:
            load_section(cls, Path(root) / "params.yaml", stage.section, known_sections=sections())


@task(name="apply-params", cache_policy=NO_CACHE)
def apply_params(root: str, overrides: list[str]) -> dict[str, str]:
    """Check the overrides, write them into ``root``'s params.yaml (a run workspace) as ``dvc exp run -S``
    does (comments kept), and check every section's settings. Returns {key: value}."""
    from dvc.utils.hydra import apply_overrides

    checked = check_overrides(root, overrides)
    if checked:
        apply_overrides(Path(root) / "params.yaml", [f"{k}={v}" for k, v in checked.items()])
    validate_sections(root)
    return checked


@task(name="save-experiment", cache_policy=NO_CACHE)
def save_experiment(root: str, name: str, stages: list[str] | None = None) -> str:
    """``dvc exp save`` in ``root`` (a run workspace): its params, dvc.lock and outputs (in the DVC cache)
    become a DVC experiment named ``name``, listed by ``dvc exp show`` in the project. Run as DVC's own
    command in the workspace: DVC's experiment executor resolves paths from the working directory, and a
    flow process works from the project's. ``stages``: only these stages' outputs (a run without the gate
    has no gate report); default all. Returns the name."""
    dvc = Path(sys.executable).with_name("dvc")
    proc = subprocess.run([str(dvc) if dvc.exists() else "dvc", "exp", "save", "--force", "-n", name, *(stages or [])],
                          cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc exp save failed in {root}: {(proc.stderr or proc.stdout).strip()} (it needs a git "
                           "repository with a commit and a git identity: git config user.name/user.email)")
    return name
