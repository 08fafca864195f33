import onnxruntime as ort
import pytest

from moe_engine.errors import InputError
from moe_engine.export.config import ExportConfig
from moe_engine.export.runtime import provider_options, session, shift_right


def test_provider_settings_become_onnxruntime_options():
    cfg = ExportConfig.from_dict({"providers": {"order": ["tensorrt", "cuda", "cpu"], "tensorrt": {
        "fp16": True, "max_workspace_gb": 2, "cache_dir": "c", "profile_min_shapes": "input_ids:1x1",
        "profile_opt_shapes": "input_ids:1x64", "profile_max_shapes": "input_ids:8x512"}, "cuda": {"device_id": 1}}})
    (trt, trt_opts), (cuda, cuda_opts), (cpu, _) = provider_options(cfg.providers)
    assert (trt, cuda, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert trt_opts["trt_fp16_enable"] is True and trt_opts["trt_max_workspace_size"] == 2 << 30
    assert trt_opts["trt_engine_cache_enable"] and trt_opts["trt_engine_cache_path"] == "c"
    assert trt_opts["trt_profile_opt_shapes"] == "input_ids:1x64"
    assert cuda_opts["device_id"] == 1


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a GPU build of onnxruntime")
def test_a_provider_this_build_lacks_is_refused_with_what_to_install(tmp_path):
    cfg = ExportConfig.from_dict({"providers": {"order": ["cuda", "cpu"]}})
    with pytest.raises(InputError, match="onnxruntime-gpu"):
        session(tmp_path / "model.onnx", cfg.providers)


def test_shift_right_is_transformers_teacher_forcing():
    import moe_engine as me
    import torch

    model = me.build_model("switch", "tiny", seed=0)
    labels = torch.tensor([[5, 6, -100, 7]])
    assert torch.equal(shift_right(labels, model.config), model.prepare_decoder_input_ids_from_labels(labels=labels))
