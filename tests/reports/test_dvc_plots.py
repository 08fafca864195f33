"""`dvc plots show` of the project's plot declarations (dvc.yaml `plots:`, templates in .dvc/plots/, the
offline page template set in .dvc/config), in real headless Chromium, offline: every declared plot is
drawn with data marks, no request leaves the machine, the console stays clean.

The files the plots read are the real analyze outputs (the ``analysis`` fixture) and, for the training
and evaluation files, rows in the layout their writers use (training/callbacks/history.py: step, loss,
lr; evaluation/evaluate.py: model, domain, split, loss): running the training stages here would take
minutes. tests/pipeline runs the whole pipeline, and ``check_plots_page`` below is for it too.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Per vega chart: its id, how many embeds drew, and the data marks (rects, lines, points, rules, texts).
CHARTS = """JSON.stringify({state: window.dvcPlots, charts: Array.from(document.querySelectorAll('.vega-embed')).map(e => ({
  id: e.id,
  marks: Object.fromEntries(['rect', 'line', 'symbol', 'rule', 'text'].map(m =>
    [m, Array.from(e.querySelectorAll('g.mark-' + m + '.role-mark')).reduce((n, g) => n + g.childElementCount, 0)])),
  legend: Array.from(e.querySelectorAll('g.role-legend-label text')).map(t => t.textContent)
})), images: Array.from(document.images).map(i => ({src: i.getAttribute('src'), width: i.naturalWidth}))})"""


def plots_declared() -> list:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]


def dvc(args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("COVERAGE_PROCESS_START", "COVERAGE_PROCESS_CONFIG")}
    # DVC runs no project code here: not traced by make test's coverage hook (it doubled DVC's CPU)
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


def _history(path: Path, steps: int, start: float, seed: int) -> None:
    from moe_engine.training.callbacks.history import FIELDS

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [",".join(FIELDS)]
    for step in range(1, steps + 1):
        loss = 2.0 + (start - 2.0) * math.exp(-step / 15) + 0.02 * math.sin(step * (seed + 1))
        rows.append(f"{step},{loss!r},{3e-3 * min(1, step / 5)!r},{step * 4.5e9 * (1 + 0.01 * seed)!r}")
    path.write_text("\n".join(rows) + "\n")


def plots_repo(root: Path, analysis: Path) -> Path:
    """A git + DVC repository holding the project's plot declarations, templates and config, and files for
    every declared plot."""
    repo = root / "repo"
    (repo / ".dvc").mkdir(parents=True)
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots_declared()}, sort_keys=False))
    shutil.copytree(analysis, repo / "outputs" / "analyze")
    _history(repo / "outputs" / "pretrain" / "history.csv", 60, 6.3, 0)
    _history(repo / "outputs" / "pretrain_dense" / "history.csv", 60, 6.25, 1)
    _history(repo / "outputs" / "finetune" / "history.csv", 12, 4.0, 2)
    domains = {"django_docs": "val", "kjv_bible": "val", "milton": "ood", "python_stdlib_code": "val"}
    rows = ["model,domain,split,loss"] + [f"{m},{d},{s},{5.4 + 0.01 * i + (0.03 if m == 'dense' else 0):.6f}"
                                         for m in ("moe", "dense") for i, (d, s) in enumerate(domains.items())]
    (repo / "outputs" / "evaluate").mkdir(parents=True)
    (repo / "outputs" / "evaluate" / "domain_loss.csv").write_text("\n".join(rows) + "\n")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"], ["git", "config", "user.name", "ci"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    dvc(["config", "core.analytics", "false"], repo)
    return repo


def check_plots_page(browser, repo: Path, screenshot: Path) -> dict:
    """Run `dvc plots show` in ``repo`` (its .dvc/config's page template) and check the page in ``browser``:
    offline and clean, every vega plot drawn with data marks, every image loaded. Returns what was seen."""
    declared = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    errors = json.loads(dvc(["plots", "show", "--json"], repo)).get("errors", [])
    assert errors == [], errors
    page_path = Path(dvc(["plots", "show"], repo).strip().splitlines()[-1].removeprefix("file://"))
    assert "cdn.jsdelivr.net" not in page_path.read_text()  # the offline template, not DVC's default page
    page = browser.open(page_path, ready="window.dvcPlots && window.dvcPlots.pending === 0 "
                                          "&& Array.from(document.images).every(i => i.complete)")
    assert page.problems() == []
    seen = json.loads(page.evaluate(CHARTS))
    vega = [p for p in declared if isinstance(p, dict)]
    images = [p for p in declared if isinstance(p, str)]
    assert seen["state"] == {"pending": 0, "drawn": len(vega), "failed": []}
    assert len(seen["charts"]) == len(vega)
    for chart in seen["charts"]:
        assert sum(chart["marks"].values()) > 0, f"{chart['id']} drew no data marks"
    assert len(seen["images"]) == len(images) and all(i["width"] > 0 for i in seen["images"])
    page.screenshot(screenshot)
    return {c["id"]: c for c in seen["charts"]}


def test_every_declared_plot_renders_offline(browser, analysis, artifacts, tmp_path):
    charts = check_plots_page(browser, plots_repo(tmp_path, analysis), artifacts / "dvc_plots.png")
    by_name = {name.split("(")[0].strip(): name for p in plots_declared() if isinstance(p, dict) for name in p}

    def chart(prefix: str) -> dict:
        from dvc_render.base import Renderer

        return charts[Renderer.remove_special_chars(by_name[prefix])]

    training = chart("training loss")
    assert training["marks"]["line"] == 2 and {"pretrain", "pretrain_dense"} <= set(training["legend"])
    assert chart("fine-tuning loss")["marks"]["line"] == 1
    domains = chart("held-out loss per domain")
    assert domains["marks"]["rect"] == 8 and {"moe", "dense"} <= set(domains["legend"])  # 4 domains x 2 models
    layers = pd_layers(analysis)
    health = chart("router health per layer")
    assert health["marks"]["rect"] == 4 * layers  # four metrics, one bar per layer each
    saturation = chart("router saturation against the final snapshot")
    assert saturation["marks"]["line"] >= layers + 1 and saturation["marks"]["rule"] == 1  # per layer, mean; chance


def pd_layers(analysis: Path) -> int:
    import pandas as pd

    return len(pd.read_csv(analysis / "layer_metrics.csv"))


def test_the_offline_template_inlines_pinned_libraries_and_loads_nothing():
    sys.path.insert(0, str(REPO / ".dvc" / "plots"))
    try:
        import vendor
    finally:
        sys.path.pop(0)
    page = (REPO / ".dvc" / "plots" / "offline.html").read_text()
    for name, (version, _, _) in vendor.PACKAGES.items():
        assert f"/* {name} {version} (BSD-3-Clause; see NOTICE) */" in page
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN script tags have nowhere to go
    assert "<script src" not in page and "sourceMappingURL" not in page
    assert "plots/offline.html" in (REPO / ".dvc" / "config").read_text()
