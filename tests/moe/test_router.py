import math

import pytest
import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

import moe_engine as me
from moe_engine.moe.router import ROUTERS, RouterConfig, register_router


def _router(hidden=16, **kw):
    return RouterConfig(**kw).build(hidden)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_router_matches_transformers_mixtral_router(k):
    cfg = me.model_config("mixtral", hidden_size=16, num_local_experts=6, num_experts_per_tok=k)
    ref = MixtralTopKRouter(cfg)
    torch.nn.init.normal_(ref.weight)
    ours = _router(kind="topk", num_experts=6, top_k=k, norm_topk_prob=True)
    ours.weight = ref.weight
    x_TD = torch.randn(40, 16)
    _, ref_w, ref_idx = ref(x_TD)
    routing = ours(x_TD)
    assert torch.equal(routing.topk_idx_TK(), ref_idx)
    torch.testing.assert_close(routing.weight_A.view(40, k), ref_w)


def test_topk_without_renormalisation_keeps_raw_probabilities():
    r = _router(kind="topk", num_experts=8, top_k=2, norm_topk_prob=False)
    x_TD = torch.randn(10, 16)
    routing = r(x_TD)
    probs = torch.softmax(x_TD @ r.weight.detach().t(), -1)
    torch.testing.assert_close(routing.weight_A.view(10, 2), probs.topk(2).values)


@pytest.mark.parametrize("n_group,topk_group,k", [(1, 1, 2), (4, 2, 4), (8, 3, 6)])
@pytest.mark.parametrize("norm", [True, False])
def test_sigmoid_grouped_router_matches_transformers_deepseek_v3(n_group, topk_group, k, norm):
    cfg = me.model_config(
        "deepseek_v3", hidden_size=16, n_routed_experts=16, n_group=n_group, topk_group=topk_group,
        num_experts_per_tok=k, norm_topk_prob=norm, routed_scaling_factor=2.5,
    )
    ref = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(ref.weight)
    ref.e_score_correction_bias.normal_(0, 0.3)
    ours = _router(kind="sigmoid_grouped", num_experts=16, top_k=k, n_group=n_group, topk_group=topk_group,
                   norm_topk_prob=norm, routed_scaling_factor=2.5)
    ours.weight = ref.weight
    ours.e_score_correction_bias = ref.e_score_correction_bias
    x_TD = torch.randn(50, 16)
    _, ref_w, ref_idx = ref(x_TD)
    routing = ours(x_TD)
    # both select with sorted=False: compare as sets per token, weights aligned by expert
    ref_dense = torch.zeros(50, 16).scatter(1, ref_idx, ref_w)
    our_dense = torch.zeros(50, 16).scatter(1, routing.topk_idx_TK(), routing.weight_A.view(50, k))
    torch.testing.assert_close(our_dense, ref_dense)


def test_group_limited_routing_uses_at_most_topk_group_groups():
    r = _router(kind="sigmoid_grouped", num_experts=16, top_k=4, n_group=4, topk_group=2)
    idx_TK = r(torch.randn(200, 16)).topk_idx_TK()
    groups_per_token = torch.tensor([len(set((row // 4).tolist())) for row in idx_TK])
    assert groups_per_token.max() <= 2


def test_bias_update_moves_load_towards_balance():
    r = _router(kind="sigmoid_grouped", num_experts=4, top_k=1, bias_update_rate=0.01)
    r.update_bias(torch.tensor([10, 0, 5, 5]))
    assert r.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])


def test_switch_capacity_drops_in_token_order_per_sequence():
    r = _router(kind="switch", num_experts=2, top_k=1, expert_capacity=2, aux_loss_coef=0)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0] * 16, [-1.0] * 16]))
    x_TD = torch.ones(6, 16)  # every token prefers expert 0; two sequences of 3 tokens
    routing = r(x_TD, group_size=3)
    # per sequence: tokens 0, 1 fit, token 2 is dropped (sentinel E=2, weight 0)
    assert routing.expert_idx_A.tolist() == [0, 0, 2, 0, 0, 2]
    assert routing.weight_A[[2, 5]].tolist() == [0.0, 0.0]
    assert routing.num_dropped().item() == 2
    assert routing.tokens_per_expert().tolist() == [4, 0]


def test_switch_capacity_factor_sets_capacity():
    r = _router(kind="switch", num_experts=4, top_k=1, capacity_factor=1.25)
    assert r.capacity(64) == math.ceil(1.25 * 64 / 4)


def test_expert_choice_gives_every_expert_exactly_capacity_tokens():
    r = _router(kind="expert_choice", num_experts=4, top_k=2, capacity_factor=1.0)
    x_TD = torch.randn(32, 16)
    routing = r(x_TD)
    assert routing.tokens_per_expert().tolist() == [16, 16, 16, 16]
    probs = torch.softmax(x_TD @ r.weight.detach().t(), -1)
    for e in range(4):
        chosen = routing.token_idx_A[routing.expert_idx_A == e]
        assert set(chosen.tolist()) == set(probs[:, e].topk(16).indices.tolist())


def test_aux_losses_follow_their_coefficients():
    r = _router(kind="topk", num_experts=4, top_k=2, aux_loss_coef=0.5, z_loss_coef=0.25)
    routing = r(torch.randn(8, 16))
    assert set(routing.aux_losses) == {"load_balancing_loss", "router_z_loss"}
    r0 = _router(kind="topk", num_experts=4, top_k=2, aux_loss_coef=0.0)
    assert r0(torch.randn(8, 16)).aux_losses == {}


def test_custom_router_in_a_few_lines():
    @register_router("test_hash")
    class HashRouter(me.Router):
        """Token position hashed to an expert (a baseline from Roller et al. 2021)."""

        def route(self, x_TD, group_size=None):
            logits_TE = self.logits(x_TD)
            idx_TK = (torch.arange(x_TD.shape[0]) % self.num_experts)[:, None]
            return self.token_choice(logits_TE, logits_TE.softmax(-1), idx_TK, torch.ones_like(idx_TK, dtype=x_TD.dtype))

    try:
        model = me.build_model("mixtral", router={"kind": "test_hash", "top_k": 1})
        out = model(input_ids=torch.randint(0, 512, (2, 8)))
        assert out.logits.shape == (2, 8, 512)
        assert me.moe_layers(model)[0].last_stats["tokens_per_expert"][0].tolist() == [4, 4, 4, 4]
    finally:
        ROUTERS.pop("test_hash")


def test_unknown_router_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="kind = 'nope': must be a registered router: .*topk"):
        RouterConfig(kind="nope").build(8)


@pytest.mark.parametrize("settings, message", [
    (dict(top_k=0), "top_k = 0: must be in \\[1, num_experts = 8\\]"),
    (dict(top_k=9), "top_k = 9: must be in \\[1, num_experts = 8\\]"),
    (dict(capacity_factor=0.0), "capacity_factor = 0.0: must be > 0"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef = -0.1: must be >= 0"),
    (dict(kind="sigmoid_grouped", n_group=3), "n_group = 3: must be >= 1 and divide num_experts = 8"),
    (dict(kind="sigmoid_grouped", n_group=4, topk_group=1, top_k=3), "top_k = 3: must be <= topk_group"),
])
def test_router_settings_that_would_fail_inside_forward_are_refused_up_front(settings, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**settings)
    with pytest.raises(ValueError, match=message.split(":")[0]):  # the same check when patching a model
        me.build_model("mixtral", num_local_experts=8, router=settings)
    with pytest.raises(ValueError, match="router.num_experts = 8 differs from the model's 4 experts"):
        me.build_model("mixtral", router={"num_experts": 8})
