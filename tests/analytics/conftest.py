"""Fixtures on the shared real-text data: the GPT-2 tokenizer (decompressed into a temp dir) and the
corpus folder. Tests using them skip when ../shared/data is absent (a user's clone)."""

import lzma
import shutil
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (shared test data)")
    return path


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """Tiny models are overhead-bound: one intra-op thread is as fast on an idle 2-core machine and
    avoids OpenMP spin-waits that made the training test 5-10x slower when other processes share it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    src = _shared("tokenizers", "gpt2")
    out = tmp_path_factory.mktemp("gpt2")
    (out / "tokenizer.json").write_bytes(lzma.decompress((src / "tokenizer.json.xz").read_bytes()))
    shutil.copy(src / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    return _shared("corpus")
