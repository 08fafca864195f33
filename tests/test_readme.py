"""The README's code runs as written: the short training path and the custom router."""

import os
import re
import subprocess
import sys
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_short_path_is_under_ten_lines_and_trains(tmp_path):
    code = python_block_after("## Train a basic MoE")
    assert len([line for line in code.splitlines() if line.strip()]) < 10
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", proc.stdout).groups())
    assert last < first - 1.0
    assert (tmp_path / "outputs" / "quickstart" / "model" / "config.json").exists()


def test_custom_router_example_runs():
    code = python_block_after("A custom router is a few lines")
    assert len(code.splitlines()) < 30
    namespace: dict = {}
    exec(compile(code, "README-custom-router", "exec"), namespace)
    import torch

    from moe_engine.moe.router import ROUTERS

    try:
        out = namespace["model"](input_ids=torch.randint(0, 512, (2, 6)))
        assert out.logits.shape == (2, 6, 512)
    finally:
        ROUTERS.pop("hash", None)
