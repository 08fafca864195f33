"""A patched model behaves like the stock transformers model where transformers itself looks: router
logits and the model's own aux loss, weight init from the meta device, the padding mask in the
balance loss, experts implementations, and patching twice. Every check compares with a stock model."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import moe_engine as me
from moe_engine.errors import ConfigError
from moe_engine.models.build import model_config

ARCHS = ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "switch"]


def _stock(arch, **overrides):
    cfg = model_config(arch, "tiny", **overrides)
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    return cls, cfg, cls.from_config(cfg).eval()


def _inputs(cfg, padded=True):
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    if padded:
        mask[1, :3] = 0  # left padding in the second row
    kw = dict(input_ids=ids, attention_mask=mask, output_router_logits=True)
    if cfg.is_encoder_decoder:
        kw.update(decoder_input_ids=ids[:, :5].contiguous(), labels=ids[:, :5].contiguous())
    else:
        kw["labels"] = ids
    return kw


@pytest.mark.parametrize("arch", ARCHS)
def test_router_logits_and_the_models_own_aux_loss_equal_the_stock_models(arch):
    _, cfg, stock = _stock(arch)
    engine = me.patch(copy.deepcopy(stock)).eval()
    kw = _inputs(cfg)
    with torch.no_grad():
        a, b = stock(**kw), engine(**kw)
    keys = ["encoder_router_logits", "decoder_router_logits"] if cfg.is_encoder_decoder else ["router_logits"]
    for key in keys:
        ra, rb = getattr(a, key), getattr(b, key)
        assert len(ra) == len(rb) > 0
        for x, y in zip(ra, rb):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)  # includes transformers' aux loss where it adds one
    if getattr(a, "aux_loss", None) is not None:
        torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-5, atol=1e-6)


def test_with_recorded_logits_the_engine_attaches_no_second_aux_loss():
    _, cfg, stock = _stock("mixtral", router_aux_loss_coef=0.5)
    engine = me.patch(copy.deepcopy(stock)).train()
    stock.train()
    kw = _inputs(cfg, padded=False)
    stock(**kw).loss.backward()
    engine(**kw).loss.backward()
    for (name, p), q in zip(stock.named_parameters(), engine.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_init_weights_from_meta_equals_the_stock_init_bitwise(arch):
    cls, cfg, _ = _stock(arch)
    with torch.device("meta"):
        stock = cls.from_config(cfg)
        engine = me.patch(cls.from_config(cfg))
    stock.to_empty(device="cpu")
    engine.to_empty(device="cpu")
    torch.manual_seed(3)
    stock.init_weights()
    torch.manual_seed(3)
    engine.init_weights()
    a, b = stock.state_dict(), engine.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    routers = [layer.moe_router for layer in me.moe_layers(engine)]
    assert all(torch.isfinite(r.weight if hasattr(r, "weight") else r.classifier.weight).all() for r in routers)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_balance_loss_leaves_padding_out_as_transformers_does(arch):
    model = me.build_model(arch, router={"aux_loss_coef": 1.0}).train()
    _, cfg, _ = _stock(arch)
    kw = _inputs(cfg)
    kw.pop("output_router_logits")
    logits = []
    handles = [layer.register_routing_hook(lambda layer, routing, counts: logits.append(routing.logits_TE))
               for layer in me.moe_layers(model)]
    model(**kw)
    layers = me.moe_layers(model)
    for layer, logits_TE in zip(layers, logits):
        expected = load_balancing_loss_func((logits_TE,), layer.num_experts, layer.top_k, kw["attention_mask"])
        torch.testing.assert_close(layer.last_aux_loss * len(layers), expected.detach(), rtol=1e-5, atol=1e-6)
        unmasked = load_balancing_loss_func((logits_TE,), layer.num_experts, layer.top_k)
        assert not torch.allclose(layer.last_aux_loss * len(layers), unmasked.detach())
    for h in handles:
        h.remove()


def test_set_experts_implementation_maps_to_engine_paths_or_refuses():
    model = me.build_model("mixtral")
    model.set_experts_implementation("batched_mm")
    assert {layer.experts_mode for layer in me.moe_layers(model)} == {"gathered"}
    model.set_experts_implementation({"": "grouped_mm"})
    assert {layer.experts_mode for layer in me.moe_layers(model)} == {"grouped"}
    with pytest.raises(ConfigError, match="'sonicmoe' is not available on an engine-patched model"):
        model.set_experts_implementation("sonicmoe")
    assert model.get_experts_implementation() == {"": "engine"}  # generate() leaves the choice to the engine
    clone = copy.deepcopy(model)  # the bound methods follow the copy
    clone.set_experts_implementation("batched_mm")
    assert {layer.experts_mode for layer in me.moe_layers(model)} == {"grouped"}


def test_patch_twice_changes_nothing():
    _, cfg, stock = _stock("mixtral")
    once = me.patch(copy.deepcopy(stock))
    scales = [layer.moe_router.loss_scale for layer in me.moe_layers(once)]
    twice = me.patch(once)
    assert twice is once and [layer.moe_router.loss_scale for layer in me.moe_layers(twice)] == scales == [0.5, 0.5]
    with pytest.raises(ConfigError, match="already patched"):
        me.patch(once, aux_loss_coef=0.0)


def test_load_refuses_a_garbage_or_pickled_checkpoint_naming_the_file(tmp_path):
    from moe_engine.errors import InputError

    model = me.build_model("mixtral")
    model.save_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match=r"ok/model.safetensors is not a valid safetensors file"):
        me.load(tmp_path / "ok")
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    for f in (tmp_path / "pickled").glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(InputError, match="holds only pickled weights .*pytorch_model.bin.*which can run code"):
        me.load(tmp_path / "pickled")
