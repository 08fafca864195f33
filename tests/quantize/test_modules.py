import pytest
import torch

import moe_engine as me
from moe_engine.errors import ConfigError
from moe_engine.quantize.format import stock_model
from moe_engine.quantize.modules import IncompleteQuantization, QuantLinear, check_complete, dequantized_state_dict

from .conftest import ARCHS

_QUANT_BUFFERS = ("qweight", "scales", "zeros")


def _logits(model, ids):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


def _expert_keys_all_quantized(model) -> bool:
    keys = [k for k in model.state_dict() if ".experts." in k]
    return bool(keys) and all(k.rsplit(".", 1)[1] in _QUANT_BUFFERS for k in keys)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_expert_tensor_quantized_and_used(arch, bits):
    model = me.build_model(arch, "tiny", seed=0).eval()
    ids = torch.randint(0, 512, (2, 12))
    before = _logits(model, ids)
    me.quantize(model, bits=bits, group_size=16)
    assert _expert_keys_all_quantized(model)
    layers = me.moe_layers(model)
    per_layer = 2 * layers[0].num_experts if arch == "switch_transformers" else 2
    assert check_complete(model) == per_layer * len(layers)
    after = _logits(model, ids)
    # the engine's grouped path computes with exactly the dequantised weights: stock transformers with them agrees
    reference = _logits(stock_model(model.config, dequantized_state_dict(model)), ids)
    assert torch.allclose(after, reference, rtol=1e-5, atol=1e-5)
    change = ((after - before).norm() / before.norm()).item()
    assert 0 < change < (0.02 if bits == 8 else 0.25)


def test_attention_and_dense_on_request_routers_and_head_never():
    model = me.build_model("qwen2_moe", "tiny", seed=0)
    me.quantize(model, bits=8, attention=True, dense=True)
    mods = dict(model.named_modules())
    assert isinstance(mods["model.layers.0.self_attn.q_proj"], QuantLinear)
    assert isinstance(mods["model.layers.0.mlp.shared_expert.up_proj"], QuantLinear)
    state = model.state_dict()
    assert state["model.layers.0.mlp.gate.weight"].is_floating_point()  # router
    assert state["model.layers.0.mlp.shared_expert_gate.weight"].is_floating_point()
    assert state["lm_head.weight"].is_floating_point()
    plain = me.build_model("qwen2_moe", "tiny", seed=0)
    me.quantize(plain, bits=8)
    assert isinstance(dict(plain.named_modules())["model.layers.0.self_attn.q_proj"], torch.nn.Linear)


def test_an_experts_module_it_does_not_know_fails_loudly():
    class Offloaded(torch.nn.Module):  # another provider behind the seam: its weights are not ours to quantize
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def expert_weights(self):
            return self.inner.gate_up_proj, self.inner.down_proj, True

    model = me.build_model("mixtral", "tiny", seed=0)
    layer = me.moe_layers(model)[1]
    layer.experts = Offloaded(layer.experts)
    with pytest.raises(IncompleteQuantization, match="provides its weights itself"):
        me.quantize(model, bits=8)


def test_check_complete_names_a_float_expert_tensor():
    model = me.build_model("mixtral", "tiny", seed=0)
    float_experts = me.moe_layers(model)[1].experts
    me.quantize(model, bits=8)
    me.moe_layers(model)[1].experts = float_experts  # as if a walk had skipped it
    with pytest.raises(IncompleteQuantization, match=r"model\.layers\.1\.mlp\.experts"):
        check_complete(model)


def test_a_group_size_that_does_not_divide_is_a_config_error():
    model = me.build_model("olmoe", "tiny", seed=0)  # expert hidden 32
    with pytest.raises(ConfigError, match="does not divide the input width 32"):
        me.quantize(model, bits=4, group_size=64)
