"""The data stage's report (validation/index.html) in real headless Chromium, offline: a self-contained
summary with each rule's limit, observed value and result and the per-domain sizes and token counts;
Great Expectations' own Data Docs sit beside it (they need CDNs, so they are only linked)."""

import json

import pandas as pd
import pytest

TABLES = """JSON.stringify(Array.from(document.querySelectorAll('table:not(.meta)')).map(t =>
  Array.from(t.rows).map(r => Array.from(r.cells).map(c => c.textContent))))"""


def _tables(page) -> list[pd.DataFrame]:
    return [pd.DataFrame(rows[1:], columns=rows[0]) for rows in json.loads(page.evaluate(TABLES))]


def test_data_summary_renders_offline_with_rules_and_domains(browser, data_outputs, artifacts):
    from moe_engine.data.shards import read_manifest

    report = data_outputs / "validation" / "index.html"
    page = browser.open(report)
    assert page.problems() == []
    rules, domains, files = _tables(page)
    assert len(rules) == 9 and set(rules["result"]) == {"pass"} and (rules["limit"] != "").all()
    assert (rules["observed"] != "").all()
    docs = pd.read_parquet(data_outputs / "documents.parquet")
    expected = docs.groupby("domain")["n_tokens"].sum()
    shown = domains.set_index("domain")["tokens"].str.replace(",", "").astype(int)
    assert shown.drop("all").to_dict() == expected.to_dict() and shown["all"] == expected.sum()
    assert set(files["domain"]) == set(read_manifest(data_outputs)["domains"])
    link = page.evaluate("document.querySelector('table.meta a').getAttribute('href')")
    assert (report.parent / link).is_file() and link == "data_docs/index.html"
    assert page.evaluate("document.title").startswith("Data validation: all 9 rules passed")
    page.screenshot(artifacts / "data_report.png")


def test_a_failed_validation_shows_the_broken_rule(browser, tmp_path, artifacts):
    from moe_engine.data.config import ValidationConfig
    from moe_engine.data.errors import DataValidationError
    from moe_engine.data.ingest import read_documents
    from moe_engine.data.validate import document_table, validate_documents

    (tmp_path / "good.txt").write_text("\n<|endoftext|>\n".join(f"document {i} has some words" for i in range(12)))
    (tmp_path / "dups.txt").write_text("\n<|endoftext|>\n".join(["the same words again"] * 4))
    table = document_table(read_documents([tmp_path / "good.txt", tmp_path / "dups.txt"]))
    with pytest.raises(DataValidationError) as err:
        validate_documents(table, ValidationConfig(), None, tmp_path / "report")
    assert err.value.report == str(tmp_path / "report" / "index.html")
    page = browser.open(err.value.report)
    assert page.problems() == []
    rules = _tables(page)[0].set_index("rule")
    assert rules.loc["duplicate_share", "result"] == "fail" and rules.loc["duplicate_share", "failing"] == "3"
    assert "dups.txt#1: same text as" in rules.loc["duplicate_share", "examples"]
    assert (rules.drop("duplicate_share")["result"] == "pass").all()
    assert page.evaluate("document.title") == "Data validation: 1 rule(s) broken"
    page.screenshot(artifacts / "data_report_failed.png")
