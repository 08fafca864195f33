"""A self-contained HTML report: headings, notes, tables and PNGs embedded as base64 data URIs, so the
single file can be mailed, attached to an MLflow run or opened offline."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Union

import pandas as pd

Block = Union[tuple[str, str], tuple[str, Path], tuple[str, pd.DataFrame]]  # ("h2"|"p"|"img"|"table", content)

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; } th { background: #f0f0f0; }
img { max-width: 100%; border: 1px solid #eee; } .meta td { text-align: left; }
"""


def embed_png(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def render(title: str, meta: dict[str, str], blocks: list[Block]) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>", "<table class='meta'>"]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items()]
    parts.append("</table>")
    for kind, content in blocks:
        if kind == "h2":
            parts.append(f"<h2>{html.escape(content)}</h2>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(content)}</p>")
        elif kind == "img":
            parts.append(embed_png(content))
        elif kind == "table":
            parts.append(content.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0))
        else:
            raise ValueError(f"unknown report block kind {kind!r}")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: Path, title: str, meta: dict[str, str], blocks: list[Block]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(title, meta, blocks), encoding="utf-8")
    return path
