from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bench_models(demo_data, tmp_path_factory) -> dict[str, Path]:
    """A tiny MoE (Mixtral) and its dense baseline matched on active parameters (Llama), as pretrain
    builds them, saved with the demo tokenizer: model directories like outputs/pretrain/model."""
    import moe_engine as me
    from moe_engine.models.io import save_model
    from moe_engine.training.trainer import dense_baseline

    base = tmp_path_factory.mktemp("bench_models")
    moe = me.build_model("mixtral", "tiny", vocab_size=1024, seed=0)
    dense = dense_baseline(moe, "active")
    dirs = {"moe": base / "moe", "dense": base / "dense"}
    save_model(moe, dirs["moe"], tokenizer=demo_data / "tokenizer")
    save_model(dense, dirs["dense"], tokenizer=demo_data / "tokenizer")
    return dirs
