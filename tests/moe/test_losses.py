import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moe_engine.moe.losses import AttachAuxLoss, load_balancing_loss, router_z_loss


def test_load_balancing_matches_transformers_reference():
    logits_TE = torch.randn(64, 8)
    probs_TE = logits_TE.softmax(-1)
    topk_TK = probs_TE.topk(2, dim=-1).indices
    ours = load_balancing_loss(probs_TE, topk_TK, 8)
    ref = load_balancing_loss_func((logits_TE,), num_experts=8, top_k=2)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


def test_load_balancing_is_k_under_uniform_and_e_times_k_when_collapsed():
    # uniform probabilities and perfectly spread choices: E * sum_e (K/E)(1/E) = K
    probs_TE = torch.full((8, 4), 0.25)
    topk_TK = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(probs_TE, topk_TK, 4).item() == 2.0
    # every token on expert 0 with probability 1: E * 1 * 1
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 1
    assert load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), 4).item() == 4.0


def test_z_loss_matches_float64_definition():
    logits_TE = torch.randn(32, 16) * 3
    ref = (logits_TE.double().exp().sum(-1).log() ** 2).mean()
    torch.testing.assert_close(router_z_loss(logits_TE).double(), ref, rtol=1e-6, atol=0)


def test_attached_aux_loss_adds_its_gradient_and_keeps_the_value():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    aux = (w**2).sum()
    y = AttachAuxLoss.apply(x, aux)
    assert torch.equal(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    torch.testing.assert_close(w.grad, 2 * w.detach())
