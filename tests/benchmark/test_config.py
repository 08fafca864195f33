import pytest

from moe_engine.benchmark.config import FILE_TASKS, PASSAGE_TASKS, BenchmarkConfig
from moe_engine.config import load_section
from moe_engine.errors import ConfigError


def test_defaults_run_every_project_task():
    assert BenchmarkConfig().tasks == [*FILE_TASKS, *PASSAGE_TASKS]


@pytest.mark.parametrize("key, value, message", [
    ("limit", -1, "benchmark.limit = -1: must be >= 0"),
    ("tasks", [], "benchmark.tasks = []"),
    ("tasks", ["wordnet_gloss", "wordnet_gloss"], "without repeated names"),
    ("batch_size", 0, "benchmark.batch_size = 0"),
    ("device", "tpu", "benchmark.device = 'tpu'"),
    ("dtype", "int8", "benchmark.dtype = 'int8'"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        BenchmarkConfig.from_dict({key: value})


def test_params_section_then_sets(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("benchmark:\n  limit: 50\n  tasks: [wordnet_gloss, passage_val]\n")
    config = load_section(BenchmarkConfig, params, "benchmark", ["limit=10", "device=cuda:1"])
    assert (config.limit, config.tasks, config.device) == (10, ["wordnet_gloss", "passage_val"], "cuda:1")
