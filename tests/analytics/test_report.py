"""The HTML report is one self-contained file: PNGs inline as base64, text escaped."""

import base64
import re

import pandas as pd
import pytest

from moe_engine.analytics import report

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16  # content does not matter to the embedding


def test_png_is_embedded_and_text_escaped(tmp_path):
    (tmp_path / "plot.png").write_bytes(PNG)
    blocks = [("h2", "<load>"), ("p", "a & b"), ("img", tmp_path / "plot.png"), ("table", pd.DataFrame({"x": [0.123456]}))]
    path = report.write_report(tmp_path / "r" / "report.html", "T", {"k": "<v>"}, blocks)
    html = path.read_text()
    data = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    assert base64.b64decode(data) == PNG
    assert "&lt;load&gt;" in html and "a &amp; b" in html and "&lt;v&gt;" in html and "0.1235" in html


def test_unknown_block_kind_fails():
    with pytest.raises(ValueError, match="unknown report block"):
        report.render("T", {}, [("video", "x")])
