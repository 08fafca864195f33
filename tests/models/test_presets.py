"""Published shapes instantiate from config (on the meta device) with the published sizes."""

import pytest

import moe_engine as me
from moe_engine.training.flops import count_params

# (arch, preset, total params, active params) as published by each model's authors
PUBLISHED = [
    ("mixtral", "mixtral-8x7b", 46.7e9, 12.9e9),
    ("olmoe", "olmoe-1b-7b", 6.9e9, 1.3e9),
    ("qwen2_moe", "qwen1.5-moe-a2.7b", 14.3e9, 2.7e9),
    ("deepseek_v3", "deepseek-v3-style", 671e9, 37e9),  # without the multi-token-prediction module
    ("switch", "switch-base-8", 0.62e9, None),
]


@pytest.mark.parametrize("arch,preset,total,active", PUBLISHED, ids=[p[1] for p in PUBLISHED])
def test_published_presets_have_published_sizes(arch, preset, total, active):
    model = me.build_model(arch, preset, device="meta")
    counts = count_params(model)
    assert abs(counts.total - total) / total < 0.02
    if active:
        assert abs(counts.active - active) / active < 0.03
    assert len(me.moe_layers(model)) > 0


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "switch"])
def test_tiny_presets_are_small(arch):
    model = me.build_model(arch, "tiny")
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_bad_names_give_clear_errors():
    with pytest.raises(ValueError, match="unknown architecture"):
        me.build_model("gpt5")
    with pytest.raises(ValueError, match="no preset 'huge'"):
        me.build_model("mixtral", "huge")
    with pytest.raises(ValueError, match="no field"):
        me.build_model("mixtral", num_expertz=4)


def test_presets_command_counts_parameters_as_stock_transformers_does(capsys):
    """`moe-lab presets`: total parameters equal the stock model's own count (built on the meta device);
    active ones drop exactly the experts a token does not use."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from moe_engine.cli import main
    from moe_engine.models.build import model_config

    assert main(["presets", "--arch", "mixtral", "--json"]) == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"tiny", "mixtral-8x7b"} <= set(rows) and {r["arch"] for r in rows.values()} == {"mixtral"}
    for name in ("tiny", "mixtral-8x7b"):
        config = model_config("mixtral", name)
        with torch.device("meta"):
            stock = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in stock.parameters())
        expert = 3 * config.hidden_size * config.intermediate_size * config.num_hidden_layers  # w1, w2, w3 of one expert
        assert rows[name]["params_total"] == total, name
        assert rows[name]["params_active"] == total - (config.num_local_experts - config.num_experts_per_tok) * expert
        assert (rows[name]["experts"], rows[name]["top_k"]) == (config.num_local_experts, config.num_experts_per_tok)
    assert main(["presets", "--arch", "olmoe"]) == 0
    table = capsys.readouterr().out
    assert "olmoe-4l" in table and "mixtral-8x7b" not in table and "architecture names accepted" in table
