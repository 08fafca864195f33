"""The router report (analyze's report.html) in real headless Chromium, offline: it loads nothing from the
network, logs no error, shows every plot, puts a health verdict per layer first and fits the page."""

import json

import pandas as pd

# Everything the page shows, read from the DOM in one go.
PAGE = """JSON.stringify({
  images: Array.from(document.images).map(i => ({alt: i.alt, width: i.naturalWidth, complete: i.complete})),
  headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
  badges: Array.from(document.querySelectorAll('.badge')).map(b => b.textContent),
  tokens: Array.from(document.querySelectorAll('td')).filter(td => /x \\(\\d+% of \\d+\\)/.test(td.textContent)).length,
  meta: Object.fromEntries(Array.from(document.querySelectorAll('table.meta tr')).map(r => [r.cells[0].textContent, r.cells[1].textContent])),
  pageWidth: document.documentElement.scrollWidth, viewWidth: window.innerWidth,
  tooWide: Array.from(document.querySelectorAll('table')).filter(t => !t.closest('.scroll')).length
})"""


def test_router_report_renders_offline_with_a_verdict_per_layer(browser, analysis, artifacts):
    page = browser.open(analysis / "report.html", ready="Array.from(document.images).every(i => i.complete)")
    assert page.problems() == []
    assert page.log.requests and all(u.startswith(("file:", "data:")) for u in page.log.requests)
    shown = json.loads(page.evaluate(PAGE))
    pngs = sorted(p.stem for p in analysis.glob("*.png"))
    assert sorted(i["alt"] for i in shown["images"]) == pngs and len(pngs) == 4  # saturation too: two checkpoints
    assert all(i["complete"] and i["width"] > 300 for i in shown["images"])
    assert shown["headings"][0] == "Summary"
    health = pd.read_csv(analysis / "layer_metrics.csv")
    assert len(shown["badges"]) == len(health) and set(shown["badges"]) <= {"balanced", "imbalanced", "collapsed"}
    assert shown["meta"]["git commit"] and "pipeline run (MLflow)" in shown["meta"]
    assert shown["tokens"] == pd.read_csv(analysis / "token_specialisation.csv").groupby(["layer", "expert"]).ngroups
    # Tables fit: none outside a scrolling box, and the page itself does not scroll sideways.
    assert shown["tooWide"] == 0 and shown["pageWidth"] <= shown["viewWidth"]
    assert page.screenshot(artifacts / "router_report.png").stat().st_size > 50_000


def test_report_links_the_pipeline_run_when_the_tracking_uri_is_a_server():
    from moe_engine.analytics.report import Link, run_meta

    meta = run_meta({"MOE_LAB_PARENT_RUN_ID": "abc123", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000/"})
    assert meta["pipeline run (MLflow)"] == Link("abc123", "http://127.0.0.1:5000/#/runs/abc123")
    meta = run_meta({"MOE_LAB_PARENT_RUN_ID": "abc123", "MLFLOW_TRACKING_URI": "sqlite:///x/mlflow.db"})
    assert meta["pipeline run (MLflow)"] == "abc123 (sqlite:///x/mlflow.db)"
    assert "not tracked" in run_meta({})["pipeline run (MLflow)"]
