"""A self-contained HTML page: headings, notes, tables and PNGs embedded as base64 data URIs, so the
single file can be mailed, attached to an MLflow run or opened offline (no script, no stylesheet or
font from elsewhere). The router report (analyze.py) and the data report (data/validate.py) use it.

    write_report(path, "Router analytics", {"run": Link("abc", "http://...")}, [
        ("h2", "Summary"), ("p", "..."), ("table", Table(df, formats={"share": percent})), ("img", png_path)])

Wide tables scroll inside their own box instead of running off the page; a column named ``verdict``
or ``result`` is drawn as a coloured badge (see ``_BADGES``).
"""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import pandas as pd


@dataclass
class Table:
    """A DataFrame to show: ``formats`` maps a column to a function of its value (default: ``number``)."""

    frame: pd.DataFrame
    formats: dict[str, Callable[[object], str]] = field(default_factory=dict)


@dataclass
class Link:
    text: str
    href: str


Block = Union[tuple[str, str], tuple[str, Path], tuple[str, pd.DataFrame], tuple[str, Table]]  # ("h2"|"p"|"img"|"table", content)

# Badge colours of verdict / result cells; anything else is shown plain.
_BADGES = {"balanced": "good", "pass": "good", "passed": "good", "imbalanced": "warn", "collapsed": "bad",
           "fail": "bad", "failed": "bad"}

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.text, th.text { text-align: left; white-space: normal; } td.text { min-width: 8em; }
img { max-width: 100%; border: 1px solid #eee; }
.meta th { text-align: left; } .meta td { text-align: left; white-space: normal; word-break: break-all; }
.badge { display: inline-block; padding: 0 6px; border-radius: 3px; font-weight: 600; }
.good { background: #d8f0d8; color: #145214; } .warn { background: #fbe7c2; color: #6b4500; }
.bad { background: #f7d0d0; color: #7a1010; }
"""


def number(value) -> str:
    """Default cell format: integers with thousands separators, floats to 4 significant digits, – for
    NaN, yes/no for booleans (Python or numpy scalars alike)."""
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool) or kind == "b":
        return "yes" if value else "no"
    if isinstance(value, int) or kind in ("i", "u"):
        return f"{int(value):,}"
    if isinstance(value, float) or kind == "f":
        return f"{float(value):.4g}"
    return str(value)


def percent(value, digits: int = 1) -> str:
    """A fraction shown in %: 0.125 -> 12.5%."""
    if value is None or value != value:
        return "–"
    return f"{100 * float(value):.{digits}f}%"


def run_meta(env: dict | None = None) -> dict[str, object]:
    """The pipeline's MLflow run (a link when the tracking URI is a server) and the git commit."""
    from moe_engine.tracking.lineage import ENV_PARENT, ENV_URI, git_commit

    env = os.environ if env is None else env
    run, uri = env.get(ENV_PARENT), env.get(ENV_URI, "")
    if run and uri.startswith(("http://", "https://")):
        shown: object = Link(run, f"{uri.rstrip('/')}/#/runs/{run}")  # MLflow's UI resolves /runs/<id> itself
    else:
        shown = f"{run} ({uri})" if run else "not tracked (no MLflow pipeline run in the environment)"
    return {"pipeline run (MLflow)": shown, "git commit": git_commit() or "unknown (not a git checkout)"}


def embed_png(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _text(value) -> str:
    return html.escape(str(value), quote=False)  # element content: quotes need no escaping


def _cell(value, fmt: Callable | None) -> str:
    text = (fmt or number)(value)
    badge = _BADGES.get(str(value).lower()) if isinstance(value, str) else None
    if badge:
        return f"<td class='text'><span class='badge {badge}'>{_text(text)}</span></td>"
    return f"<td class='text'>{_text(text)}</td>" if isinstance(value, str) and fmt is None else f"<td>{_text(text)}</td>"


def table_html(table: pd.DataFrame | Table) -> str:
    table = table if isinstance(table, Table) else Table(table)
    df = table.frame
    text = {c for c in df.columns if pd.api.types.is_string_dtype(df[c]) and c not in table.formats}  # left, like their cells
    head = "".join(f"<th class='text'>{_text(c)}</th>" if c in text else f"<th>{_text(c)}</th>" for c in df.columns)
    rows = [
        "<tr>" + "".join(_cell(v, table.formats.get(c)) for c, v in zip(df.columns, row)) + "</tr>"
        for row in df.itertuples(index=False, name=None)
    ]
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"


def _meta_value(value) -> str:
    if isinstance(value, Link):
        return f"<a href='{html.escape(value.href, quote=True)}'>{_text(value.text)}</a>"
    return _text(value)


def render(title: str, meta: dict[str, object], blocks: list[Block]) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             "<link rel='icon' href='data:,'>",  # no favicon request: the page needs nothing from elsewhere
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>", "<div class='scroll'><table class='meta'>"]
    parts += [f"<tr><th>{_text(k)}</th><td>{_meta_value(v)}</td></tr>" for k, v in meta.items()]
    parts.append("</table></div>")
    for kind, content in blocks:
        if kind == "h2":
            parts.append(f"<h2>{_text(content)}</h2>")
        elif kind == "p":
            parts.append(f"<p>{_text(content)}</p>")
        elif kind == "img":
            parts.append(embed_png(content))
        elif kind == "table":
            parts.append(table_html(content))
        else:
            raise ValueError(f"unknown report block kind {kind!r}")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: Path, title: str, meta: dict[str, object], blocks: list[Block]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(title, meta, blocks), encoding="utf-8")
    return path
