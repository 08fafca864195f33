"""Fixtures for the data-stage tests: a tiny real-text corpus, a fast config, prepared shards."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import pytest

from moe_engine.data.config import DataConfig

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "demo"
SHARED_DATA = REPO.parent / "shared" / "data"
DELIM = "\n\n<|endoftext|>\n\n"


def demo_docs(name: str, n_chars: int) -> list[str]:
    """The first documents of a committed demo file, cut to about n_chars in total."""
    text = lzma.open(DEMO / f"{name}.txt.xz", "rt", encoding="utf-8").read()
    docs, total = [], 0
    for doc in text.split("<|endoftext|>"):
        doc = doc.strip()[: max(0, n_chars - total)]
        if doc:
            docs.append(doc)
            total += len(doc)
        if total >= n_chars:
            break
    return docs


def write_corpus(folder: Path, docs_by_domain: dict[str, list[str]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for domain, docs in docs_by_domain.items():
        path = folder / f"{domain}.txt"
        path.write_text(DELIM.join(docs) + DELIM, encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_docs() -> dict[str, list[str]]:
    """Three in-domain sources plus Milton as out-of-domain, ~12 KB each of real text."""
    return {
        "python_stdlib_code": demo_docs("python_stdlib_code", 12_000),
        "shakespeare": demo_docs("shakespeare", 12_000),
        "wordnet_glosses": demo_docs("wordnet_glosses", 12_000),
        "milton": demo_docs("milton", 6_000),
    }


@pytest.fixture
def tiny_corpus(tmp_path: Path, tiny_docs) -> list[Path]:
    return write_corpus(tmp_path / "corpus", tiny_docs)


def tiny_config(**sections) -> DataConfig:
    """Small and fast: 400-token BPE, 32-token rows, 512-char chunks, no Data Docs."""
    data = {
        "tokenizer": {"vocab_size": 400},
        "shards": {"seq_len": 32, "chunk_chars": 512, "val_fraction": 0.1, "tokens_per_shard": 2048},
        "validation": {"data_docs": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return DataConfig.from_dict(data)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_docs) -> Path:
    """Shards of the tiny corpus, built once; tests that damage them work on a copy."""
    from moe_engine.data import prepare

    root = tmp_path_factory.mktemp("prepared")
    sources = write_corpus(root / "corpus", tiny_docs)
    return prepare(sources, root / "shards", tiny_config())


@pytest.fixture
def prepared_copy(prepared: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(prepared, copy)
    return copy


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gpt2_dir(shared_data: Path, tmp_path_factory) -> Path:
    """The GPT-2 tokenizer directory with its tokenizer.json decompressed."""
    src = shared_data / "tokenizers" / "gpt2"
    if not (src / "tokenizer.json.xz").is_file():
        pytest.skip(f"{src}/tokenizer.json.xz not found")
    out = tmp_path_factory.mktemp("gpt2")
    (out / "tokenizer.json").write_bytes(lzma.decompress((src / "tokenizer.json.xz").read_bytes()))
    shutil.copy(src / "tokenizer_config.json", out)
    return out


@pytest.fixture
def make_config():
    """tiny_config as a fixture, so test modules need not import conftest."""
    return tiny_config
