"""The quantized experts on CUDA (run on the lent GPU machine; skipped without CUDA)."""

import pytest
import torch

import moe_engine as me
from moe_engine.models.io import save_model
from moe_engine.quantize.format import stock_model
from moe_engine.quantize.modules import dequantized_state_dict

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_compute_with_their_integers_on_cuda_in_bf16(bits, tmp_path):
    model = me.build_model("mixtral", "tiny", seed=0)
    me.quantize(model, bits=bits, group_size=32)
    save_model(model, tmp_path / "q")
    gpu = me.load(tmp_path / "q").to("cuda", torch.bfloat16).eval()
    for name, buf in gpu.named_buffers():  # moving the model kept the stored numbers
        if name.endswith("scales"):
            assert buf.dtype == torch.float16 and buf.is_cuda
    reference = stock_model(model.config, dequantized_state_dict(model)).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 512, (4, 33), device="cuda")
    with torch.no_grad():
        out, ref = gpu(input_ids=ids).logits.float(), reference(input_ids=ids).logits.float()
    # the engine's bf16 grouped GEMM vs transformers' experts on the same dequantised bf16 weights
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
