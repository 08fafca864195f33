"""CUDA graphs of the MoE layers (moe/graphs.py) against the eager layers: same bits, forward and
backward, across gradient accumulation, weight updates and changing routing; eager fallback for
anything not captured; replay-order errors instead of wrong gradients. The graph tests need a GPU
(run on the lent machine with ``python -m pytest tests/moe``); the order bookkeeping runs anywhere."""

import copy

import pytest
import torch
from torch import nn

from moe_engine.moe.graphs import GraphOrderError, MoEGraphs, _Captured
from moe_engine.moe.layer import MoEConfig
from moe_engine.moe.router import RouterConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROUTERS = {
    "topk": dict(kind="topk", num_experts=8, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001),
    "topk-k8-e64": dict(kind="topk", num_experts=64, top_k=8, norm_topk_prob=False, aux_loss_coef=0.01),
    "switch-capacity": dict(kind="switch", num_experts=8, top_k=1, capacity_factor=1.0, aux_loss_coef=0.01),
    "deepseek": dict(kind="sigmoid_grouped", num_experts=16, top_k=4, n_group=4, topk_group=2, aux_loss_coef=0.0,
                     bias_update_rate=0.01),
}


class Stack(nn.Module):
    """Three MoE blocks with residuals and a dense op between them, like decoder layers."""

    def __init__(self, router: dict, shared: bool):
        super().__init__()
        cfg = MoEConfig(hidden_size=64, ffn_size=96, shared_expert_size=64 if shared else 0,
                        shared_expert_gate=shared, router=RouterConfig(**router))
        self.moes = nn.ModuleList(cfg.build() for _ in range(3))
        self.mixes = nn.ModuleList(nn.Linear(64, 64) for _ in range(3))

    def forward(self, x_BSD):
        for moe, mix in zip(self.moes, self.mixes):
            x_BSD = x_BSD + moe(mix(x_BSD))
        return x_BSD


def _pair(router, shared=False):
    torch.manual_seed(0)
    eager = Stack(router, shared).to("cuda", torch.bfloat16).train()
    graphed = copy.deepcopy(eager)
    return eager, graphed


def _step(model, x_BSD, target):
    out = model(x_BSD)
    loss = (out.float() - target).square().mean()
    loss.backward()
    return out.detach(), loss.detach()


def _sgd(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.5)
        for moe in model.moes:  # DeepSeek-V3's aux-loss-free bias moves between steps, in place
            moe.moe_router.after_step(moe.last_tokens_per_expert.float())
    model.zero_grad(set_to_none=True)


def _captured_stack():
    """(model, its graphs, an input): a top-k stack with one recorded step, then captured."""
    _, graphed = _pair(ROUTERS["topk"])
    graphs = MoEGraphs(list(graphed.moes)).record()
    x = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graphed(x).sum().backward()
    graphs.capture()
    return graphed, graphs, x


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@cuda
@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("grad_accum", [1, 3])
def test_replayed_layers_give_the_eager_bits_through_accumulation_and_updates(name, grad_accum):
    eager, graphed = _pair(ROUTERS[name], shared=name == "topk")
    graphs = MoEGraphs(list(graphed.moes)).record()
    seen = {"eager": [], "graphed": []}
    for tag, model in (("eager", eager), ("graphed", graphed)):
        for moe in model.moes:  # what a routing hook (the router monitor) sees, copied at once
            moe.register_routing_hook(lambda layer, r, c, tag=tag: seen[tag].append(
                (c.clone(), r.weight_A.detach().clone(), r.probs_TE.detach().clone(),
                 None if layer.last_aux_loss is None else layer.last_aux_loss.clone())))
    torch.manual_seed(1)
    batches = [(torch.randn(4, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True),
                torch.randn(4, 128, 64, device="cuda")) for _ in range(4 * grad_accum)]
    for step in range(4):
        for micro in range(grad_accum):
            x, target = batches[step * grad_accum + micro]
            x_eager = x.detach().clone().requires_grad_(True)
            out_e, loss_e = _step(eager, x_eager, target)
            out_g, loss_g = _step(graphed, x, target)
            assert torch.equal(out_e, out_g) and torch.equal(loss_e, loss_g), (step, micro)
            assert torch.equal(x_eager.grad, x.grad)
        ge, gg = _grads(eager), _grads(graphed)
        assert ge.keys() == gg.keys() and all(torch.equal(ge[k], gg[k]) for k in ge), (step, [k for k in ge if not torch.equal(ge[k], gg[k])])
        _sgd(eager)
        _sgd(graphed)
        if step == 0:  # the recorded step ran eagerly; capture after it, as the trainer does
            assert graphs.capture() == 3
    assert graphs.replays == 3 * 3 * grad_accum
    assert len(seen["eager"]) == len(seen["graphed"])
    for a, b in zip(seen["eager"], seen["graphed"]):
        assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3]))
        assert (a[3] is None) == (b[3] is None) and (a[3] is None or torch.equal(a[3], b[3]))


@cuda
def test_other_shapes_evaluation_and_no_grad_run_eagerly():
    eager, graphed = _pair(ROUTERS["topk"])
    graphs = MoEGraphs(list(graphed.moes)).record()
    x = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _step(graphed, x, torch.zeros(2, 64, 64, device="cuda"))
    graphs.capture()
    graphed.zero_grad(set_to_none=True)
    for x_other in (torch.randn(2, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True),):
        out_e, _ = _step(eager, x_other.detach().clone().requires_grad_(True), torch.zeros(2, 32, 64, device="cuda"))
        out_g, _ = _step(graphed, x_other, torch.zeros(2, 32, 64, device="cuda"))
        assert torch.equal(out_e, out_g)
    with torch.no_grad():
        graphed(x)
    graphed.eval()
    graphed(x).sum().backward()
    assert graphs.replays == 0
    graphed.train()
    graphed(x)
    assert graphs.replays == 3


@cuda
def test_a_backward_whose_activations_were_replayed_over_raises():
    graphed, graphs, x = _captured_stack()
    first = graphed(x).sum()
    second = graphed(x).sum()  # replays every layer again before the first backward
    with pytest.raises(GraphOrderError, match="before this backward"):
        first.backward()
    second.backward()  # the latest forward's backward is still valid


@cuda
def test_replaced_parameters_are_refused():
    graphed, graphs, x = _captured_stack()
    graphed.moes[1].gate.weight.data = graphed.moes[1].gate.weight.data.clone()
    with pytest.raises(RuntimeError, match="replaced"):
        graphed(x)
    graphs.release()
    graphed(x).sum().backward()  # eager again


def test_replay_order_bookkeeping():
    """Forwards in order then backwards in reverse are valid; a forward of layer i invalidates the
    pending backwards of i and every later layer, a backward those of later layers (shared pool)."""
    graphs = MoEGraphs([])
    caps = [_Captured(i, None, None, None) for i in range(3)]
    graphs._pending = [None] * 3
    gens = [graphs._begin_forward(c) for c in caps]
    for c, g in reversed(list(zip(caps, gens))):
        graphs._begin_backward(c, g)
    g0, g1 = graphs._begin_forward(caps[0]), graphs._begin_forward(caps[1])
    graphs._begin_forward(caps[0])  # layer 0 again: the pending backwards of 0 and 1 are gone
    with pytest.raises(GraphOrderError):
        graphs._begin_backward(caps[1], g1)
    g0, g1, g2 = (graphs._begin_forward(c) for c in caps)
    graphs._begin_backward(caps[1], g1)  # out of order: layer 2's saved activations may be overwritten
    with pytest.raises(GraphOrderError):
        graphs._begin_backward(caps[2], g2)
    graphs._begin_backward(caps[0], g0)


def test_capture_needs_a_recorded_forward():
    with pytest.raises(RuntimeError, match="record"):
        MoEGraphs([]).capture()
    layer = MoEConfig(hidden_size=16, ffn_size=32).build()
    graphs = MoEGraphs([layer]).record()
    layer(torch.randn(2, 4, 16, requires_grad=True))  # CPU tensors: not recorded
    assert graphs.capture() == 0 and graphs.state == "off"


def test_a_copied_model_gets_eager_layers():
    layer = MoEConfig(hidden_size=16, ffn_size=32).build()
    MoEGraphs([layer]).record()
    assert layer.graphs is not None and copy.deepcopy(layer).graphs is None
