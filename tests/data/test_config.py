from pathlib import Path

import pytest

from moe_engine.data.config import DataConfig, ShardsConfig, TokenizerConfig, ValidationConfig, load_params
from moe_engine.data.errors import ConfigError


def test_defaults_and_from_dict():
    cfg = DataConfig.from_dict({"shards": {"seq_len": 128, "val_fraction": 0}, "tokenizer": None})
    assert cfg.shards == ShardsConfig(seq_len=128, val_fraction=0.0)
    assert cfg.tokenizer == TokenizerConfig()
    assert isinstance(cfg.shards.val_fraction, float)  # ints are accepted for floats


@pytest.mark.parametrize("data, message", [
    ({"shards": {"seqlen": 1}}, "unknown key(s) in 'data.shards': seqlen (valid: seq_len,"),
    ({"tokeniser": {}}, "unknown key(s) in 'data': tokeniser (valid: ingest, tokenizer, shards, validation)"),
    ({"shards": {"seq_len": "long"}}, "data.shards.seq_len: expected int, got 'long'"),
    ({"tokenizer": {"vocab_size": True}}, "data.tokenizer.vocab_size: expected int"),
    ({"ingest": {"ood_domains": "milton"}}, "data.ingest.ood_domains: expected list[str]"),
    ({"shards": {"val_fraction": 1.5}}, "shards.val_fraction = 1.5: must be in [0, 1)"),
    ({"ingest": {"domain_by": "folder"}}, "ingest.domain_by"),
    ({"shards": [1, 2]}, "'data.shards' must be a mapping"),
])
def test_bad_values_are_rejected_by_name(data, message):
    with pytest.raises(ConfigError) as err:
        DataConfig.from_dict(data)
    assert message in str(err.value)


def test_section_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="max_dup"):
        ValidationConfig.from_dict({"max_dup": 0.1})


def test_load_params_reads_nested_section(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("train: {lr: 1}\ndata:\n  shards: {seq_len: 64}\n  tokenizer: {vocab_size: 1000}\n")
    cfg = load_params(params)
    assert (cfg.shards.seq_len, cfg.tokenizer.vocab_size) == (64, 1000)
    with pytest.raises(ConfigError, match="no section 'nope'"):
        load_params(params, "nope")
    with pytest.raises(ConfigError, match="unknown key.*train"):
        load_params(params, "")  # top level has 'train', which is not a data section
    assert load_params(None) == DataConfig()


def test_override_by_dotted_key():
    cfg = DataConfig().override({"shards.seq_len": 64, "tokenizer.pretrained": "some/dir"})
    assert cfg.shards.seq_len == 64 and cfg.tokenizer.pretrained == "some/dir"
    with pytest.raises(ConfigError, match="'data.shards.nope' is not a setting"):
        DataConfig().override({"shards.nope": 1})
    with pytest.raises(ConfigError, match="SECTION.KEY"):
        DataConfig().override({"seq_len": 1})
