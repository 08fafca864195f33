"""What a user can do wrong to the data stage, through the real CLI: a clear exit-2 message, and the
previous good output intact with no temporary left behind. Plus property tests: random settings
and random bytes never end in anything but a config or a data error."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_engine.cli import main
from moe_engine.config import parse_sets
from moe_engine.data.config import DataConfig
from moe_engine.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[2]
FAST = ["-q", "--set", "tokenizer.vocab_size=400", "--set", "shards.seq_len=32", "--set", "shards.chunk_chars=512",
        "--set", "validation.data_docs=false"]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_a_failed_rerun_leaves_the_previous_output_intact(tmp_path, tiny_corpus, capsys):
    out = tmp_path / "data"
    src = [str(p) for p in tiny_corpus]
    assert main(["data", "prepare", *src, "--out", str(out), *FAST]) == 0
    before = _tree(out)
    assert main(["data", "prepare", *src, "--out", str(out), "--tokenizer", str(tmp_path / "no-such-tokenizer"), *FAST]) == 2
    assert "no-such-tokenizer" in capsys.readouterr().err
    assert _tree(out) == before and _leftovers(tmp_path) == []


def test_sigterm_mid_run_leaves_the_previous_output_intact(tmp_path, tiny_corpus):
    out = tmp_path / "data"
    src = [str(p) for p in tiny_corpus]
    assert main(["data", "prepare", *src, "--out", str(out), *FAST]) == 0
    before = _tree(out)
    import random

    rng = random.Random(0)  # ~6 MB of distinct documents: tokenizing them takes several seconds
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    big = tmp_path / "big.txt"
    big.write_text("\n\n<|endoftext|>\n\n".join(" ".join(rng.choice(words) for _ in range(600)) for _ in range(1500)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "moe_engine.cli", "data", "prepare", str(big), "--out", str(out),
                             "-q", "--set", "tokenizer.vocab_size=2000", "--set", "validation.data_docs=false"],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".data.tmp-*")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".data.tmp-*")), "the run never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err
    assert _tree(out) == before and _leftovers(tmp_path) == []


def test_a_parquet_text_column_of_numbers_is_named(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3], "body": ["a", "b", "c"]}), path)
    assert main(["data", "prepare", str(path), "--out", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "rows.parquet: column 'text' holds int64, not text" in err and "columns: text, body" in err


def test_an_output_folder_that_cannot_be_created_is_named(tmp_path, tiny_corpus, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["data", "prepare", *map(str, tiny_corpus), "--out", str(blocker / "data"), *FAST]) == 2
    assert f"cannot create the output folder {blocker}" in capsys.readouterr().err


def test_yaml_12_numbers_in_set_and_params(tmp_path, tiny_corpus):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  shards: {val_fraction: 1e-1, seq_len: 32, chunk_chars: 512}\n"
                      "  tokenizer: {vocab_size: 400}\n  validation: {data_docs: false}\n")
    from moe_engine.data.config import load_params

    assert load_params(params).shards.val_fraction == pytest.approx(0.1)
    assert parse_sets(["lr=3e-3", "router.top_k=2", "x=[1, 2]"]) == {"lr": 0.003, "router.top_k": 2, "x": [1, 2]}


# ----------------------------------------------------------------------------- property tests
_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
                    st.lists(st.text(max_size=4), max_size=3))
_keys = st.sampled_from(["seq_len", "val_fraction", "seed", "chunk_chars", "vocab_size", "min_frequency", "nope",
                         "domain_by", "ood_domains", "max_chars", "data_docs", "text_field"])
_sections = st.sampled_from(["ingest", "tokenizer", "shards", "validation", "bogus"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_sections, st.one_of(st.dictionaries(_keys, _values, max_size=4), _values), max_size=3))
def test_any_settings_give_a_config_or_a_config_error(data):
    try:
        config = DataConfig.from_dict(data)
    except ConfigError as exc:
        assert str(exc) and "Traceback" not in str(exc)
    else:
        assert isinstance(config.shards.seq_len, int)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="abc.=_[]1e-3 ", max_size=12), max_size=4))
def test_any_set_items_parse_or_give_a_config_error(items):
    try:
        parsed = parse_sets(items)
    except ConfigError:
        return
    from moe_engine.training.config import PretrainConfig

    try:
        PretrainConfig().override(parsed)
    except ConfigError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=2000), suffix=st.sampled_from([".txt", ".jsonl", ".parquet", ".txt.gz", ".txt.xz"]),
       encoding=st.sampled_from(["utf-8", "utf-16", "latin-1", None]))
def test_ingesting_random_bytes_gives_documents_or_a_data_error(tmp_path_factory, blob, suffix, encoding):
    from moe_engine.data.config import IngestConfig
    from moe_engine.data.ingest import read_documents

    folder = tmp_path_factory.mktemp("bytes")
    path = folder / f"random{suffix}"
    if encoding is not None:
        blob = blob.decode("latin-1").encode(encoding, errors="replace")
    path.write_bytes(blob)
    try:
        docs = read_documents([path], IngestConfig())
    except UserError as exc:
        assert str(path.name) in str(exc) or str(exc)
    else:
        assert all(isinstance(d.text, str) for d in docs)
