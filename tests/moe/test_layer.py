"""The engine layer against a float64 token-by-token reference, for every router kind."""

import pytest
import torch
import torch.nn.functional as F

from moe_engine.moe.layer import MoEConfig
from moe_engine.moe.losses import load_balancing_loss
from moe_engine.moe.router import RouterConfig


def reference_moe(layer, x_BSD):
    """Naive float64 MoE: route with the layer's own decisions, then loop over every assignment."""
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    routing = layer.moe_router(x_TD, group_size=x_BSD.shape[1])
    w_in = layer.experts.gate_up_proj if layer.experts.gated else layer.experts.up_proj
    w_in, w_out = w_in.double(), layer.experts.down_proj.double()
    out = torch.zeros_like(x_TD, dtype=torch.float64)
    tokens = routing.token_idx_A if routing.token_idx_A is not None else torch.arange(len(routing.expert_idx_A)) // routing.top_k
    for t, e, w in zip(tokens.tolist(), routing.expert_idx_A.tolist(), routing.weight_A.double()):
        if e == layer.num_experts:
            continue
        h = w_in[e] @ x_TD[t].double()
        if layer.experts.gated:
            g, u = h.chunk(2)
            h = F.silu(g) * u
        else:
            h = F.silu(h)
        out[t] += w * (w_out[e] @ h)
    if layer.shared is not None:
        s = layer.shared.double()(x_TD.double())
        if hasattr(layer, "shared_expert_gate"):
            s = torch.sigmoid(layer.shared_expert_gate.double()(x_TD.double())) * s
        out += s
        layer.float()
    return out.view(x_BSD.shape)


ROUTERS = [
    RouterConfig(kind="topk", num_experts=4, top_k=2),
    RouterConfig(kind="topk", num_experts=8, top_k=3, norm_topk_prob=False),
    RouterConfig(kind="switch", num_experts=4, top_k=1, capacity_factor=0.5),  # forces drops
    RouterConfig(kind="sigmoid_grouped", num_experts=8, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.0),
    RouterConfig(kind="expert_choice", num_experts=4, top_k=2),
]


@pytest.mark.parametrize("rc", ROUTERS, ids=lambda rc: rc.kind)
@pytest.mark.parametrize("gated", [True, False])
def test_layer_matches_float64_reference(rc, gated):
    layer = MoEConfig(hidden_size=16, ffn_size=24, gated=gated, router=rc).build().eval()
    x_BSD = torch.randn(3, 10, 16)
    out = layer(x_BSD)
    ref = reference_moe(layer, x_BSD)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("rc", ROUTERS, ids=lambda rc: rc.kind)
def test_aligned_groups_give_the_unaligned_layer_outputs_and_gradients(rc, monkeypatch):
    """``dispatch.ALIGN`` pads every expert group to a multiple of 16 rows (DeepGEMM's layout, here on the
    portable path): the same outputs, input and weight gradients in float64 (drops included; expert-choice
    routing is not aligned and must not change either)."""
    from moe_engine.moe import dispatch

    layer = MoEConfig(hidden_size=16, ffn_size=24, router=rc).build().double()
    x_BSD = torch.randn(3, 10, 16, dtype=torch.float64)
    plans, make_plan = [], dispatch.plan
    monkeypatch.setattr(dispatch, "plan", lambda *a, **k: plans.append(make_plan(*a, **k)) or plans[-1])
    results = []
    for rows in (0, 16):
        monkeypatch.setitem(dispatch.ALIGN, "rows", rows)
        layer.zero_grad()
        x = x_BSD.clone().requires_grad_(True)
        out = layer(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad, *(p.grad.clone() for p in layer.parameters() if p.grad is not None)))
        results.append(layer.last_tokens_per_expert.clone())
    (plain, *plain_grads), plain_counts, (aligned, *aligned_grads), aligned_counts = results
    torch.testing.assert_close(aligned, plain, rtol=1e-12, atol=1e-12)
    assert len(aligned_grads) == len(plain_grads) >= 3
    for a, b in zip(aligned_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(aligned_counts, plain_counts)
    assert [q.aligned for q in plans] == [False, rc.kind != "expert_choice"]


def test_shared_expert_with_sigmoid_gate_matches_reference():
    layer = MoEConfig(hidden_size=16, ffn_size=24, shared_expert_size=32, shared_expert_gate=True).build().eval()
    x_BSD = torch.randn(2, 7, 16)
    ref = reference_moe(layer, x_BSD)
    assert (layer(x_BSD).double() - ref).norm() / ref.norm() < 1e-5


def test_layer_exposes_stats_and_aux_loss_and_backprops_aux():
    layer = MoEConfig(hidden_size=16, ffn_size=24, router=RouterConfig(num_experts=4, top_k=2, aux_loss_coef=1.0)).build()
    x_BSD = torch.randn(2, 8, 16)
    out = layer(x_BSD)
    assert layer.last_stats["tokens_per_expert"][0].sum().item() == 2 * 8 * 2
    routing = layer.gate(x_BSD.view(-1, 16))
    expected = load_balancing_loss(routing.probs_TE, routing.topk_idx_TK(), 4)
    torch.testing.assert_close(layer.last_aux_loss, expected.detach())
    # a loss that ignores the output's value still trains the router through the attached aux loss
    (out * 0).sum().backward()
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0


def test_routing_hooks_see_every_forward_and_can_be_removed():
    layer = MoEConfig(hidden_size=16, ffn_size=24).build()
    seen = []
    handle = layer.register_routing_hook(lambda lyr, routing, counts: seen.append(counts.sum().item()))
    layer(torch.randn(1, 5, 16))
    handle.remove()
    layer(torch.randn(1, 5, 16))
    assert seen == [10]
