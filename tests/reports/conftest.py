"""Fixtures of the browser tests: Debian's Chromium (headless, offline), where screenshots go, and real
outputs to look at (a router analysis of two tiny checkpoints, a validated tiny corpus).

Chromium must be installed (`apt-get install -y --no-install-recommends chromium`, part of the test
setup): without it these tests fail, unless MOE_LAB_ALLOW_NO_BROWSER=1 says skipping is acceptable.
Screenshots are kept in $MOE_LAB_TEST_ARTIFACTS, by default outputs/test-artifacts/reports/.
"""

from __future__ import annotations

import lzma
import os
from pathlib import Path

import pytest
import torch
from browser import ALLOW_MISSING, INSTALL, Chromium, find_chromium

REPO = Path(__file__).resolve().parents[2]
CHECKPOINTS = ("step_00000010", "step_00000020")  # the trainer's snapshot names: saturation gets steps 10, 20


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = Path(os.environ.get("MOE_LAB_TEST_ARTIFACTS", REPO / "outputs" / "test-artifacts" / "reports"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    executable = find_chromium()
    if executable is None:
        message = f"Chromium is not installed: `{INSTALL}` (the test setup does this)"
        if os.environ.get(ALLOW_MISSING) == "1":
            pytest.skip(f"{message}; skipped because {ALLOW_MISSING}=1")
        pytest.fail(f"{message}; set {ALLOW_MISSING}=1 to skip instead", pytrace=False)
    with Chromium.launch(tmp_path_factory.mktemp("chromium-profile"), executable) as chromium:
        yield chromium


@pytest.fixture(scope="session")
def analysis(tmp_path_factory) -> Path:
    """``analyze`` of two tiny Mixtral checkpoints (the second trained a few steps on one domain, so the
    router moved) over two domains of token ids: every table, plot and report.html, for real."""
    import moe_engine as me
    from moe_engine.analytics.analyze import analyze

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("analysis")
    g = torch.Generator().manual_seed(0)
    code, verse = torch.randint(0, 48, (16, 32), generator=g), torch.randint(48, 96, (16, 32), generator=g)  # ids recur
    (root / "ids").mkdir()
    torch.save(code, root / "ids" / "code.pt")
    torch.save(verse, root / "ids" / "verse.pt")
    model = me.build_model("mixtral", preset="tiny", seed=0)
    model.save_pretrained(root / CHECKPOINTS[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(8):
        model(input_ids=code[:8], labels=code[:8]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / CHECKPOINTS[1])
    result = analyze([root / c for c in CHECKPOINTS], root / "ids", root / "analyze")
    return result.out_dir


@pytest.fixture(scope="session")
def data_outputs(tmp_path_factory) -> Path:
    """``moe-lab data prepare`` on three small domains of the committed demo corpus, Data Docs on."""
    from moe_engine.data import prepare
    from moe_engine.data.config import DataConfig

    root = tmp_path_factory.mktemp("data")
    sources = []
    for name in ("python_stdlib_code", "shakespeare", "milton"):
        text = lzma.open(REPO / "data" / "demo" / f"{name}.txt.xz", "rt", encoding="utf-8").read(40_000)
        text = text[: text.rfind("<|endoftext|>")] if "<|endoftext|>" in text[1000:] else text
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
        sources.append(root / f"{name}.txt")
    config = DataConfig.from_dict({"tokenizer": {"vocab_size": 400}, "ingest": {"ood_domains": ["milton"]},
                                   "shards": {"seq_len": 32, "chunk_chars": 512, "val_fraction": 0.1, "tokens_per_shard": 4096},
                                   "validation": {"data_docs": True}})
    return prepare(sources, root / "shards", config)
