"""Bad input to `moe-lab benchmark` exits 2 with one readable line and leaves the previous output alone."""

import shutil
from pathlib import Path

import pytest

from moe_engine.benchmark.cli import parse_models
from moe_engine.cli import main
from moe_engine.errors import ConfigError


def _fails(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture
def previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    yield out
    assert (out / "metrics.json").read_text() == "{}"  # a failed run publishes nothing


def test_missing_model_dir(capsys, tmp_path, previous_output):
    _fails(capsys, ["benchmark", "--model", f"moe={tmp_path / 'nope'}", "--out", str(previous_output)],
           "--model moe=", "no such directory")


def test_model_dir_without_tokenizer(capsys, bench_models, tmp_path, previous_output):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(bench_models["moe"] / name, bare / name)
    _fails(capsys, ["benchmark", "--model", f"moe={bare}", "--out", str(previous_output)], "no tokenizer in it", str(bare))


def test_model_dir_with_pickled_weights_only(capsys, tmp_path, previous_output):
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04")
    _fails(capsys, ["benchmark", "--model", f"moe={model}", "--out", str(previous_output)], "pytorch_model.bin")


def test_unknown_task_name(capsys, bench_models, previous_output):
    err = _fails(capsys, ["benchmark", "--model", f"moe={bench_models['moe']}", "--tasks", "wordnet_gloss,hellaswag",
                          "--out", str(previous_output)], "unknown task(s) hellaswag", "wordnet_gloss")
    assert "include_path" in err


def test_passage_task_without_data(capsys, bench_models, previous_output):
    _fails(capsys, ["benchmark", "--model", f"moe={bench_models['moe']}", "--tasks", "passage_val",
                    "--out", str(previous_output)], "passage_val", "--data")


def test_data_dir_that_is_not_prepared(capsys, bench_models, tmp_path, previous_output):
    _fails(capsys, ["benchmark", "--model", f"moe={bench_models['moe']}", "--tasks", "passage_ood",
                    "--data", str(tmp_path), "--out", str(previous_output)], "not a prepared shards directory")


def test_bad_settings(capsys, bench_models, tmp_path):
    model = f"moe={bench_models['moe']}"
    _fails(capsys, ["benchmark", "--model", model, "--set", "limt=3"], "benchmark.limt", "is not a setting")
    _fails(capsys, ["benchmark", "--model", model, "--limit", "-1"], "benchmark.limit = -1")
    _fails(capsys, ["benchmark", "--model", model, "--set", "dtype=int8"], "benchmark.dtype")
    params = tmp_path / "params.yaml"
    params.write_text("evaluate: {batch_size: 4}\n")
    _fails(capsys, ["benchmark", "--model", model, "--params", str(params)], "no section 'benchmark'")


def test_model_arguments():
    assert parse_models(["moe=a/b", "dense=c"]) == {"moe": Path("a/b"), "dense": Path("c")}
    for bad in (["a/b"], ["=a"], ["moe="], ["moe=a", "moe=b"], ["m o=a"]):
        with pytest.raises(ConfigError, match="--model"):
            parse_models(bad)
