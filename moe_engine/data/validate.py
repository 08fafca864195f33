"""Validation of the per-document statistics table, with pandera and Great Expectations.

One row per document: where it came from, its size, how much of it is not UTF-8 or is
control characters (binary data), its sha1 (duplicates), and after tokenization its token
count and id range. pandera checks the rules and gives the readable summary (rule, count,
files, examples) that stops the stage; the same rules as a Great Expectations suite give an
HTML Data Docs report to read in a browser. Both run on the same DataFrame, so they agree.

The report folder's ``index.html`` is a self-contained summary page (per-domain sizes and token
counts, each rule with its limit, observed value and result) that reads offline; Great
Expectations' own Data Docs sit beside it in ``data_docs/`` (their CSS and scripts come from CDNs,
so offline they show unstyled and their index lists no rows).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from moe_engine.data.config import ValidationConfig
from moe_engine.data.errors import DataValidationError, RuleFailure
from moe_engine.data.ingest import Document

# Control characters other than \t \n \v \f \r: ~0 in text, ~10% of random bytes.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def document_table(docs: Sequence[Document], token_stats_D3: np.ndarray | None = None) -> pd.DataFrame:
    """Per-document statistics; with `token_stats_D3` ([docs, 3]: n_tokens, min id, max id)
    also the token columns."""
    import hashlib

    n_chars = np.array([len(d.text) for d in docs], dtype=np.int64)
    control = np.array([len(_CONTROL.findall(d.text)) for d in docs], dtype=np.int64)
    df = pd.DataFrame({
        "source": [d.source for d in docs],
        "doc_index": np.array([d.index for d in docs], dtype=np.int64),
        "domain": [d.domain for d in docs],
        "n_bytes": np.array([d.n_bytes for d in docs], dtype=np.int64),
        "n_chars": n_chars,
        "invalid_utf8": np.array([d.invalid_utf8 for d in docs], dtype=np.int64),
        "control_share": control / np.maximum(n_chars, 1),
        "sha1": [hashlib.sha1(d.text.encode("utf-8")).hexdigest() for d in docs],
    })
    df["is_empty"] = df["n_chars"] == 0
    # Empty documents share one sha1; they are reported as empty, not as duplicates.
    df["is_duplicate"] = df["sha1"].duplicated() & ~df["is_empty"]
    df["non_utf8"] = df["invalid_utf8"] > 0
    if token_stats_D3 is not None:
        df["n_tokens"], df["min_token_id"], df["max_token_id"] = token_stats_D3.T
    return df


def _rules(cfg: ValidationConfig, vocab_size: int | None) -> dict[str, tuple[str, str, Callable]]:
    """rule -> (column, description, check on the column); shares fail every offending row."""
    def share(limit: float) -> Callable[[pd.Series], pd.Series]:
        return lambda s: ~s | (s.mean() <= limit)

    rules = {
        "empty_documents": ("is_empty", f"share of empty documents <= {cfg.max_empty_share}",
                            share(cfg.max_empty_share)),
        "duplicate_share": ("is_duplicate", f"share of exact duplicate documents <= {cfg.max_duplicate_share}",
                            share(cfg.max_duplicate_share)),
        "non_utf8_share": ("non_utf8", f"share of documents with invalid UTF-8 <= {cfg.max_non_utf8_share}",
                           share(cfg.max_non_utf8_share)),
        "binary_content": ("control_share", f"control characters <= {cfg.max_control_share:.2%} of a document",
                           lambda s: s <= cfg.max_control_share),
        "length_bounds": ("n_chars", f"{cfg.min_chars} <= characters <= {cfg.max_chars} (non-empty documents)",
                          lambda s: (s == 0) | s.between(cfg.min_chars, cfg.max_chars)),
    }
    if vocab_size is not None:
        rules["token_id_below_vocab"] = ("max_token_id", f"token ids < vocab_size {vocab_size}",
                                         lambda s: s < vocab_size)
        rules["token_id_nonnegative"] = ("min_token_id", "token ids >= 0", lambda s: s >= 0)
        rules["has_tokens"] = ("n_tokens", "every document has >= 1 token", lambda s: s >= 1)
    return rules


def document_schema(cfg: ValidationConfig, vocab_size: int | None = None) -> Any:
    """The pandera schema of the table (token columns only when `vocab_size` is given)."""
    import pandera.pandas as pa

    nonneg = lambda name: pa.Check(lambda s: s >= 0, error=f"{name}_nonnegative")  # noqa: E731
    columns = {
        "source": pa.Column(str), "doc_index": pa.Column(int, nonneg("doc_index")),
        "domain": pa.Column(str, pa.Check(lambda s: s.str.len() > 0, error="domain_nonempty")),
        "n_bytes": pa.Column(int, nonneg("n_bytes")), "n_chars": pa.Column(int),
        "invalid_utf8": pa.Column(int, nonneg("invalid_utf8")), "control_share": pa.Column(float),
        "sha1": pa.Column(str, pa.Check(lambda s: s.str.fullmatch("[0-9a-f]{40}"), error="sha1_hex")),
        "is_empty": pa.Column(bool), "is_duplicate": pa.Column(bool), "non_utf8": pa.Column(bool),
    }
    if vocab_size is not None:
        columns |= {"n_tokens": pa.Column(int), "min_token_id": pa.Column(int), "max_token_id": pa.Column(int)}
    for rule, (column, _, fn) in _rules(cfg, vocab_size).items():
        columns[column] = pa.Column(columns[column].dtype, checks=columns[column].checks + [pa.Check(fn, error=rule)])
    min_docs = pa.Check(lambda df: len(df) >= cfg.min_documents, error="min_documents")
    return pa.DataFrameSchema(columns, checks=[min_docs], strict=True, name="documents")


def _example(rule: str, row: pd.Series, first_of: dict[str, str]) -> str:
    where = f"{row['source']}#{row['doc_index']}"
    detail = {
        "empty_documents": lambda: "empty document",
        "duplicate_share": lambda: f"same text as {first_of.get(row['sha1'], '?')}",
        "non_utf8_share": lambda: f"{row['invalid_utf8']} invalid UTF-8 sequence(s)",
        "binary_content": lambda: f"{row['control_share']:.1%} control characters (binary data?)",
        "length_bounds": lambda: f"{row['n_chars']} characters",
        "token_id_below_vocab": lambda: f"max token id {row.get('max_token_id')}",
    }.get(rule, lambda: "")()
    return f"{where}: {detail}" if detail else where


def pandera_failures(df: pd.DataFrame, cfg: ValidationConfig, vocab_size: int | None = None,
                     max_examples: int = 3) -> list[RuleFailure]:
    """All broken rules of the table (empty list if it is valid)."""
    import pandera.errors

    try:
        document_schema(cfg, vocab_size).validate(df, lazy=True)
        return []
    except pandera.errors.SchemaErrors as exc:
        cases = exc.failure_cases
    rules = _rules(cfg, vocab_size)
    first_of = {sha: f"{s}#{i}" for sha, s, i in
                df.drop_duplicates("sha1")[["sha1", "source", "doc_index"]].itertuples(index=False)}
    failures = []
    for check, group in cases.groupby("check", sort=False):
        rows = df.loc[[i for i in group["index"] if i is not None and not pd.isna(i)]]
        description = rules[check][1] if check in rules else f"{group['column'].iloc[0]}: {check}"
        if check in rules and check.endswith(("_share", "_documents")) and len(df):
            description += f"; observed {df[rules[check][0]].mean():.4f}"
        if check == "min_documents":
            description = f"at least {cfg.min_documents} document(s); found {len(df)}"
        examples = [_example(check, row, first_of) for _, row in rows.head(max_examples).iterrows()]
        if rows.empty:
            examples = [str(v) for v in group["failure_case"].head(max_examples)]
        failures.append(RuleFailure(check, description, max(len(rows), 1),
                                    tuple(dict.fromkeys(rows["source"])) if len(rows) else (), tuple(examples)))
    return failures


def great_expectations_report(df: pd.DataFrame, cfg: ValidationConfig, vocab_size: int | None,
                              report_dir: Path) -> tuple[list[RuleFailure], Path]:
    """Run the suite on `df` and write Data Docs to `report_dir`; (failures, index.html)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column
    from great_expectations.data_context.types.base import (
        DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig)

    site = {"class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(report_dir).resolve())}}
    # In-memory stores and a single docs site: nothing is written outside report_dir.
    ctx = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(), analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False), data_docs_sites={"report": site}))
    batch = ctx.data_sources.add_pandas("corpus").add_dataframe_asset("documents") \
        .add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name="documents"))
    rule = lambda name: {"rule": name}  # noqa: E731 - ties an expectation to its pandera rule
    expectations = [
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_documents, meta=rule("min_documents")),
        gxe.ExpectColumnMeanToBeBetween(column="is_empty", max_value=cfg.max_empty_share, meta=rule("empty_documents")),
        gxe.ExpectColumnMeanToBeBetween(column="is_duplicate", max_value=cfg.max_duplicate_share,
                                        meta=rule("duplicate_share")),
        gxe.ExpectColumnMeanToBeBetween(column="non_utf8", max_value=cfg.max_non_utf8_share, meta=rule("non_utf8_share")),
        gxe.ExpectColumnValuesToBeBetween(column="control_share", max_value=cfg.max_control_share,
                                          meta=rule("binary_content")),
        gxe.ExpectColumnValuesToBeBetween(column="n_chars", min_value=cfg.min_chars, max_value=cfg.max_chars,
                                          row_condition=Column("n_chars") > 0,
                                          meta=rule("length_bounds")),
        gxe.ExpectColumnValuesToMatchRegex(column="sha1", regex="^[0-9a-f]{40}$", meta=rule("sha1_hex")),
    ] + [gxe.ExpectColumnValuesToNotBeNull(column=c, meta=rule("not_null")) for c in ("source", "domain")]
    if vocab_size is not None:
        expectations += [
            gxe.ExpectColumnValuesToBeBetween(column="max_token_id", max_value=vocab_size - 1,
                                              meta=rule("token_id_below_vocab")),
            gxe.ExpectColumnValuesToBeBetween(column="min_token_id", min_value=0, meta=rule("token_id_nonnegative")),
            gxe.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1, meta=rule("has_tokens")),
        ]
    for expectation in expectations:
        suite.add_expectation(expectation)
    definition = ctx.validation_definitions.add(gx.ValidationDefinition(name="documents", data=batch, suite=suite))
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name="documents", validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")]))
    result = checkpoint.run(batch_parameters={"dataframe": df})
    failures = []
    for run in result.run_results.values():
        for r in run.results:
            if not r.success:
                info = r.result or {}
                failures.append(RuleFailure(
                    r.expectation_config.meta.get("rule", r.expectation_config.type),
                    f"Great Expectations: {r.expectation_config.type}",
                    int(info.get("unexpected_count") or 1), (),
                    tuple(map(str, info.get("partial_unexpected_list", [info.get("observed_value")])[:3]))))
    return failures, Path(report_dir) / "index.html"


def _observed(df: pd.DataFrame, rule: str) -> str:
    """The value a rule limits, as the summary page shows it."""
    non_empty = df.loc[~df["is_empty"], "n_chars"] if len(df) else df["n_chars"]
    values = {
        "min_documents": lambda: f"{len(df):,} documents",
        "empty_documents": lambda: f"{df['is_empty'].mean():.4f}",
        "duplicate_share": lambda: f"{df['is_duplicate'].mean():.4f}",
        "non_utf8_share": lambda: f"{df['non_utf8'].mean():.4f}",
        "binary_content": lambda: f"max {df['control_share'].max():.4%}",
        "length_bounds": lambda: f"{non_empty.min():,} to {non_empty.max():,} characters" if len(non_empty) else "no text",
        "token_id_below_vocab": lambda: f"max id {int(df['max_token_id'].max()):,}",
        "token_id_nonnegative": lambda: f"min id {int(df['min_token_id'].min()):,}",
        "has_tokens": lambda: f"min {int(df['n_tokens'].min()):,} tokens",
    }
    return values[rule]() if rule in values and len(df) else ""


def _domain_table(df: pd.DataFrame) -> pd.DataFrame:
    columns = {"documents": ("n_chars", "size"), "characters": ("n_chars", "sum"), "bytes": ("n_bytes", "sum")}
    if "n_tokens" in df:
        columns["tokens"] = ("n_tokens", "sum")
    columns |= {"empty": ("is_empty", "sum"), "duplicates": ("is_duplicate", "sum"), "invalid UTF-8": ("non_utf8", "sum")}
    table = df.groupby("domain").agg(**columns).reset_index()
    total = {"domain": "all", **{k: table[k].sum() for k in columns}}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True).astype({k: "int64" for k in columns})


def write_rules_page(path: Path, title: str, rules: dict[str, tuple[str, str]], failures: list[RuleFailure],
                     sections: list[tuple[str, pd.DataFrame]], note: str = "", meta: dict | None = None,
                     data_docs: Path | None = None) -> Path:
    """A self-contained validation page: ``rules`` maps each rule to (its limit, the value observed),
    shown with pass / fail, how many rows failed and examples; failures of rules not listed (schema
    checks) are added; then ``sections`` (heading, table). Links the Great Expectations ``data_docs``."""
    from moe_engine.analytics.report import Link, Table, run_meta, write_report

    failed = {f.rule: f for f in failures}
    rows = [{"rule": rule, "limit": limit, "observed": observed, "result": "fail" if rule in failed else "pass",
             "failing": failed[rule].count if rule in failed else 0,
             "examples": "; ".join(failed[rule].examples) if rule in failed else ""}
            for rule, (limit, observed) in rules.items()]
    rows += [{"rule": f.rule, "limit": f.description, "observed": "", "result": "fail", "failing": f.count,
              "examples": "; ".join(f.examples)} for f in failures if f.rule not in rules]
    verdict = f"{len(failures)} rule(s) broken" if failures else f"all {len(rows)} rules passed"
    page_meta: dict[str, object] = {**run_meta(), **(meta or {}), "result": verdict}
    if data_docs is not None:
        href = Path(data_docs).resolve().relative_to(Path(path).resolve().parent).as_posix()
        page_meta["Great Expectations Data Docs"] = Link(f"{href} (the same rules as an expectation suite; their "
                                                         "styles and scripts load from CDNs, so offline they show bare)", href)
    blocks = [("h2", "Rules"), ("p", "Each rule with its limit, the value observed and its result. " + note),
              ("table", Table(pd.DataFrame(rows)))]
    for heading, table in sections:
        blocks += [("h2", heading), ("table", table)]
    return write_report(path, f"{title}: {verdict}", page_meta, blocks)


def write_summary_page(df: pd.DataFrame, cfg: ValidationConfig, vocab_size: int | None, failures: list[RuleFailure],
                       path: Path, data_docs: Path | None = None) -> Path:
    """The data stage's page (see the module docstring): its rules (params.yaml data.validation), the
    per-domain and per-file sizes and token counts."""
    rules = {"min_documents": f"at least {cfg.min_documents} document(s)",
             **{rule: desc for rule, (_, desc, _) in _rules(cfg, vocab_size).items()}}
    files = df.groupby(["source", "domain"]).agg(documents=("n_chars", "size"), characters=("n_chars", "sum"),
                                                 **({"tokens": ("n_tokens", "sum")} if "n_tokens" in df else {})).reset_index()
    return write_rules_page(
        path, "Data validation", {rule: (limit, _observed(df, rule)) for rule, limit in rules.items()}, failures,
        [("Per domain", _domain_table(df)), ("Per source file", files)],
        note="Limits are params.yaml data.validation; share rules count documents, and a document is empty when it "
             "has no text after stripping.",
        meta={"documents": f"{len(df):,} in {df['domain'].nunique()} domain(s)"}, data_docs=data_docs)


def validate_documents(df: pd.DataFrame, cfg: ValidationConfig, vocab_size: int | None = None,
                       report_dir: str | Path | None = None) -> dict[str, Any]:
    """Check the table with pandera (and GE + Data Docs when `report_dir` is given and
    `cfg.data_docs`); raise DataValidationError listing every broken rule, else return
    summary metrics."""
    failures = pandera_failures(df, cfg, vocab_size)
    report = None
    if report_dir is not None and cfg.data_docs:
        ge_failures, docs = great_expectations_report(df, cfg, vocab_size, Path(report_dir) / "data_docs")
        failures = failures or ge_failures  # pandera's summary is the more detailed one
        report = write_summary_page(df, cfg, vocab_size, failures, Path(report_dir) / "index.html", docs)
    if failures:
        raise DataValidationError(failures, str(report) if report else None)
    summary = {
        "documents": int(len(df)), "chars": int(df["n_chars"].sum()), "bytes": int(df["n_bytes"].sum()),
        "empty_share": float(df["is_empty"].mean()), "duplicate_share": float(df["is_duplicate"].mean()),
        "non_utf8_share": float(df["non_utf8"].mean()), "max_control_share": float(df["control_share"].max()),
        "domains": {k: int(v) for k, v in df["domain"].value_counts().sort_index().items()},
    }
    if "n_tokens" in df:
        summary["doc_tokens"] = int(df["n_tokens"].sum())
    if report:
        summary["report"] = str(report)
    return summary
