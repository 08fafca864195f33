"""A stock transformers model and the same model after ``patch()``: same logits, same loss
gradients (fp32, relative error <= 1e-5), and checkpoints that stock transformers loads."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import moe_engine as me

TOL = 1e-5

# (arch, config overrides): k, expert counts, GQA ratios, normalisation, shared experts, dense layers
CASES = [
    ("mixtral", dict(num_local_experts=4, num_experts_per_tok=1, num_key_value_heads=4)),
    ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=2)),
    ("mixtral", dict(num_local_experts=6, num_experts_per_tok=3, num_key_value_heads=1)),
    ("olmoe", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    ("olmoe", dict(num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, num_key_value_heads=2)),
    ("qwen2_moe", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    ("qwen2_moe", dict(num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, num_hidden_layers=3, mlp_only_layers=[1])),
    ("deepseek_v3", dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1)),
    ("deepseek_v3", dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=2,
                         norm_topk_prob=False, first_k_dense_replace=0, routed_scaling_factor=2.5)),
    ("switch", dict(num_experts=4, expert_capacity=4)),  # small capacity: drops happen
    ("switch", dict(num_experts=8, expert_capacity=64, num_sparse_encoder_layers=2, num_layers=2)),  # no drops
]


def _stock(arch, overrides):
    config = me.model_config(arch, **overrides)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_config(config).eval()
    for name, buf in model.named_buffers():  # a non-zero DeepSeek correction bias changes routing
        if name.endswith("e_score_correction_bias"):
            buf.normal_(0, 0.05)
    return model


def _batch(config, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (3, 16), generator=g)
    if config.is_encoder_decoder:
        return dict(input_ids=ids, decoder_input_ids=ids[:, :9], labels=ids[:, 1:10].contiguous())
    return dict(input_ids=ids, labels=ids)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _assert_grads_match(ref, patched):
    grads = dict(patched.named_parameters())
    compared = 0
    for name, p in ref.named_parameters():
        if p.grad is None:
            continue
        assert grads[name].grad is not None, f"{name} got no gradient in the patched model"
        # relative, with an absolute floor for gradients that are zero in exact arithmetic
        # (a top-1 router with renormalised weights: every weight is 1, the router gets ~1e-11 noise)
        err = (grads[name].grad - p.grad).norm().item()
        assert err <= TOL * p.grad.norm().item() + 1e-8, (name, err, p.grad.norm().item())
        compared += 1
    assert compared > 10


@pytest.mark.parametrize("arch,overrides", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_patched_model_matches_stock(arch, overrides):
    ref = _stock(arch, overrides)
    patched = me.patch(copy.deepcopy(ref), aux_loss_coef=0.0, z_loss_coef=0.0)
    assert len(me.moe_layers(patched)) > 0
    assert set(patched.state_dict()) == set(ref.state_dict())
    batch = _batch(ref.config)
    out_ref, out = ref(**batch), patched(**batch)
    assert _rel(out.logits, out_ref.logits) <= TOL
    out_ref.loss.backward()
    out.loss.backward()
    _assert_grads_match(ref, patched)


@pytest.mark.parametrize("arch,overrides", [CASES[1], CASES[3]], ids=["mixtral", "olmoe"])
def test_aux_loss_gradients_match_transformers_loss_per_layer(arch, overrides):
    coef = 0.05
    ref = _stock(arch, dict(overrides, router_aux_loss_coef=coef))
    patched = me.patch(copy.deepcopy(ref))
    batch = _batch(ref.config)
    out_ref = ref(**batch, output_router_logits=True)
    cfg = ref.config
    num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    per_layer = [load_balancing_loss_func((lg,), num_experts, cfg.num_experts_per_tok) for lg in out_ref.router_logits]
    lm_loss = out_ref.loss - coef * out_ref.aux_loss
    (lm_loss + coef * torch.stack(per_layer).mean()).backward()
    out = patched(**batch)
    torch.testing.assert_close(out.loss, lm_loss, rtol=1e-5, atol=0)  # the LM loss; aux rides on the gradient
    out.loss.backward()
    _assert_grads_match(ref, patched)
    total_aux = sum(layer.last_aux_loss for layer in me.moe_layers(patched))
    torch.testing.assert_close(total_aux, coef * torch.stack(per_layer).mean().detach(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "switch"])
def test_saved_patched_model_loads_in_stock_transformers(arch, tmp_path):
    model = me.build_model(arch, seed=0).eval()
    model.save_pretrained(tmp_path)
    config = model.config
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    stock = cls.from_pretrained(tmp_path).eval()
    assert not me.moe_layers(stock)
    batch = _batch(config, seed=3)
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits
        assert _rel(stock(**batch).logits, expected) <= TOL
        reloaded = me.load(tmp_path).eval()
        assert me.moe_layers(reloaded)
        assert _rel(reloaded(**batch).logits, expected) <= TOL
