"""DVC can be trusted: every stage's deps cover the code its command imports (the static import closure
inside moe_engine, imports in function bodies included) and the data it reads; dvc.yaml, params.yaml and
the stage registry list the same stages."""

import ast
from pathlib import Path

import yaml

from moe_engine.stages import PIPELINE, sections

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "moe_engine"


def _module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def import_closure(module: str) -> set[Path]:
    """Files of moe_engine that importing ``module`` and calling into it can execute: every import
statement, at module level or in a function body, followed transitively (the lazy name table of
``moe_engine/__init__`` and moe-lab's list of command modules are strings, not followed)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            file = _module_file(".".join(parts[:i]))
            if file is None or file in seen:
                continue
            seen.add(file)
            tree = ast.parse(file.read_text())
            for node in tree.body:  # a module-level __getattr__ resolves names lazily, on access only
                if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                    node.body = []
            package = ".".join(parts[:i]) if file.name == "__init__.py" else ".".join(parts[: i - 1])
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    todo += [a.name for a in node.names if a.name.startswith("moe_engine")]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                    if base.startswith("moe_engine"):
                        todo.append(base)
                        todo += [f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}")]
    return seen


def _covered(file: Path, deps: list[str]) -> bool:
    rel = file.relative_to(REPO)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


def _dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_registry_dvc_yaml_and_params_list_the_same_stages():
    stages = _dvc()
    assert [s.name for s in PIPELINE] == list(stages)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert sorted(params) == sections()
    for s in PIPELINE:
        declared = stages[s.name].get("params", [])
        if s.section:
            assert s.section in declared, (s.name, declared)


def test_every_stage_depends_on_the_code_it_runs():
    missing = {}
    for s in PIPELINE:
        deps = _dvc()[s.name].get("deps", [])
        # moe-lab's entry point (argument parsing, exit codes) and the stage's own command; the other commands'
        # modules are imported only to register their argparse subcommands, not run
        closure = import_closure("moe_engine.cli") | import_closure(s.cli)
        lacking = sorted(str(f.relative_to(REPO)) for f in closure if not _covered(f, deps))
        if lacking:
            missing[s.name] = lacking
    assert not missing, missing


def test_the_closure_sees_function_level_imports():
    closure = {str(f.relative_to(REPO)) for f in import_closure("moe_engine.training.cli")}
    assert "moe_engine/data/span_corruption.py" in closure  # imported inside Trainer._check_model_settings
    assert "moe_engine/moe/router.py" in closure and "moe_engine/models/adapters.py" in closure


def test_git_sees_exactly_the_small_outputs_dvc_leaves_uncached():
    """``cache: false`` outputs (metrics, histories, reports) must not be git-ignored, or ``dvc exp run``
    commits experiments without their metrics and ``dvc metrics diff`` has nothing to compare; every
    cached output (models, shards) must stay ignored."""
    import subprocess

    uncached, cached = [], []
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind) or []:
                path, opts = next(iter(out.items())) if isinstance(out, dict) else (out, {})
                (uncached if (opts or {}).get("cache") is False else cached).append(path)
    assert uncached and cached

    def ignored(paths: list[str]) -> set[str]:
        proc = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=REPO, input="\n".join(paths),
                              capture_output=True, text=True)
        assert proc.returncode in (0, 1), proc.stderr
        return set(proc.stdout.split())

    assert ignored(uncached) == set(), "un-ignore these in .gitignore"
    assert ignored(cached) == set(cached)
    assert ignored(["outputs/runs/x/outputs/pretrain/metrics.json", "outputs/quickstart/metrics.json"]) == {
        "outputs/runs/x/outputs/pretrain/metrics.json", "outputs/quickstart/metrics.json"}
