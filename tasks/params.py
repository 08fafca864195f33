"""Parameter overrides the way ``dvc exp run -S key=value`` applies them, and saving the run as a DVC
experiment. ``dvc exp run -S`` = write the overrides into params.yaml (DVC's own Hydra-grammar
parser, below), ``dvc repro``, then record the workspace as an experiment; the pipeline flow does
the same three steps with one Prefect task per stage in the middle. As with ``dvc exp run``, the
workspace keeps the overridden params afterwards (``dvc exp show`` lists the experiment;
``git checkout params.yaml`` or ``dvc exp apply`` moves back)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="apply-params", cache_policy=NO_CACHE)
def apply_params(root: str, overrides: list[str]) -> dict[str, list[str]]:
    """Write ``[file:]key=value`` overrides into the params files (default params.yaml), as ``-S`` does.
    An unknown key is an error, as in DVC (prefix it with ``+`` to add a new one)."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    by_file = to_path_overrides(overrides)
    for path, items in by_file.items():
        apply_overrides(Path(root) / path, items)
    return by_file


@task(name="save-experiment", cache_policy=NO_CACHE)
def save_experiment(root: str, name: str | None = None) -> str:
    """``dvc exp save``: record the workspace (params, dvc.lock, outputs in the DVC cache) as an experiment."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(root) as repo:
            rev = repo.experiments.save(name=name, force=True)
    except DvcException as exc:
        raise RuntimeError(f"dvc exp save failed: {exc} (it needs a git repository with a commit and a git "
                           "identity: git config user.name/user.email)") from exc
    return rev
