from pathlib import Path

import pytest

from quantize.conftest import ARCHS, trained_demo_model  # noqa: F401 - one trained demo model per session



@pytest.fixture(scope="session")
def demo_model(demo_data, tmp_path_factory) -> Path:
    return trained_demo_model(demo_data, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(arch)``: a freshly initialised tiny checkpoint, saved once per architecture."""
    import moe_engine as me

    root = tmp_path_factory.mktemp("tiny_export")

    def make(arch: str) -> Path:
        if not (root / arch / "config.json").is_file():
            me.build_model(arch, "tiny", seed=0).save_pretrained(root / arch)
        return root / arch

    return make


def fast_export(**extra) -> dict:
    """Export settings for tests: no latency timing, no quantized gate unless asked."""
    return {"latency": {"enabled": False}, "gate": {"enabled": False}, **extra}
