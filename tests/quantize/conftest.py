from pathlib import Path

import pytest

ARCHS = ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "switch_transformers"]


def trained_demo_model(demo_data: Path, tmp_path_factory) -> Path:
    """The demo MoE (tiny Mixtral) trained briefly on the prepared demo corpus: ~30 s, once per session
    (tests/export reuses the same folder)."""
    from moe_engine.training.trainer import Trainer

    out = tmp_path_factory.getbasetemp() / "demo_model_80_steps"
    if not (out / "model" / "model.safetensors").is_file():
        result = Trainer(arch="mixtral", data=demo_data, out_dir=out, steps=80, micro_batch_size=8, save_every=0,
                         eval_batches=0, warmup_steps=5, seed=0).fit()
        assert Path(result.model_dir) == out / "model"
    return out / "model"


@pytest.fixture(scope="session")
def demo_model(demo_data, tmp_path_factory) -> Path:
    return trained_demo_model(demo_data, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One freshly initialised tiny checkpoint per architecture (save_pretrained of the patched model)."""
    import moe_engine as me

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in ARCHS:
        me.build_model(arch, "tiny", seed=0).save_pretrained(root / arch)
        out[arch] = root / arch
    return out
