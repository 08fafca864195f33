import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import moe_engine as me
from moe_engine.models.io import save_model
from moe_engine.quantize.format import dequantize_checkpoint

from .conftest import ARCHS


def _logits(model, ids):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_saved_quantized_model_loads_back_to_the_same_outputs(arch, bits, tiny_dirs, tmp_path):
    model = me.quantize(me.load(tiny_dirs[arch]).eval(), bits=bits, group_size=16, attention=True, dense=True)
    save_model(model, tmp_path / "q")
    loaded = me.load(tmp_path / "q")
    ids = torch.randint(0, 512, (3, 9))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "moe_lab" and qc["bits"] == bits and qc["format_version"] == 1
    assert qc["group_size"] == (16 if bits == 4 else None)
    assert "experts" in qc["modules"].values() and "linear" in qc["modules"].values()
    original = (tiny_dirs[arch] / "model.safetensors").stat().st_size
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < original


def test_dequantized_checkpoint_loads_in_stock_transformers(tiny_dirs, tmp_path):
    for arch in ("mixtral", "switch_transformers"):
        model = me.quantize(me.load(tiny_dirs[arch]).eval(), bits=4, group_size=16)
        save_model(model, tmp_path / arch)
        dequantize_checkpoint(tmp_path / arch, tmp_path / f"{arch}-plain")
        cls = AutoModelForSeq2SeqLM if arch.startswith("switch") else AutoModelForCausalLM
        stock = cls.from_pretrained(tmp_path / f"{arch}-plain").eval()
        ids = torch.randint(0, 512, (2, 7))
        assert torch.allclose(_logits(stock, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
