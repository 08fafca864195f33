"""Each metric on hand-computed cases (uniform, collapsed, known co-activation) and against its
definition, written as plain Python loops, on random routing from a real router."""

import math
from collections import Counter

import pytest
import torch

from moe_engine.analytics import metrics as M
from moe_engine.moe.losses import load_balancing_loss, router_z_loss
from moe_engine.moe.router import RouterConfig
from moe_engine.moe.routing import routing_stats


def member(sets, num_experts):
    """[T, E] membership from a list of per-token expert sets."""
    m = torch.zeros(len(sets), num_experts)
    for t, s in enumerate(sets):
        m[t, list(s)] = 1.0
    return m


# -- hand-computed cases ---------------------------------------------------------------------------
def test_uniform_routing():
    # T=8, E=4, K=2: token t takes experts t%4 and (t+1)%4, so every expert gets 4 assignments.
    expert_idx_A = torch.tensor([[t % 4, (t + 1) % 4] for t in range(8)]).reshape(-1)
    counts_E = M.tokens_per_expert(expert_idx_A, 4)
    probs_TE = torch.full((8, 4), 0.25)
    assert counts_E.tolist() == [4, 4, 4, 4]
    assert M.load_share(counts_E).tolist() == [0.25] * 4
    assert M.load_imbalance(counts_E) == 1.0
    assert M.load_cv(counts_E) == 0.0
    assert M.dead_expert_fraction(counts_E) == 0.0
    assert M.load_diversity(counts_E) == pytest.approx(1.0)
    assert M.routing_entropy(probs_TE) == pytest.approx(math.log(4))
    assert M.routing_entropy(probs_TE, normalised=True) == pytest.approx(1.0)
    assert M.balance_loss(probs_TE, counts_E) == pytest.approx(2.0)  # K at perfect balance
    assert M.z_loss(torch.zeros(8, 4)) == pytest.approx(math.log(4) ** 2)
    top1, margin = M.router_confidence(probs_TE)
    assert (top1, margin) == (pytest.approx(0.25), pytest.approx(0.0))
    assert M.drop_rate(expert_idx_A, 4) == 0.0


def test_collapsed_routing():
    # Every token goes to experts 0 and 1, the router splitting 0.5 / 0.5 between them.
    expert_idx_A = torch.tensor([0, 1] * 8)
    counts_E = M.tokens_per_expert(expert_idx_A, 4)
    probs_TE = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).expand(8, 4)
    assert counts_E.tolist() == [8, 8, 0, 0]
    assert M.load_imbalance(counts_E) == 2.0  # E / K
    assert M.load_cv(counts_E) == pytest.approx(1.0)  # mean 4, population std 4
    assert M.dead_expert_fraction(counts_E) == 0.5
    assert M.load_diversity(counts_E) == pytest.approx(0.5)  # log 2 / log 4
    assert M.routing_entropy(probs_TE, normalised=True) == pytest.approx(0.5)
    assert M.balance_loss(probs_TE, counts_E) == pytest.approx(4.0)  # E at collapse
    assert M.coactivation(member([{0, 1}] * 8, 4))[0, 1] == 1.0


def test_one_hot_router_confidence():
    probs_TE = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    top1, margin = M.router_confidence(probs_TE)
    assert top1 == pytest.approx(0.65) and margin == pytest.approx((0.5 + 0.3) / 2)


def test_known_coactivation():
    m = member([{0, 1}, {0, 1}, {0, 2}, {1, 2}], 3)
    counts = M.coactivation_counts(m)
    assert counts.tolist() == [[3, 2, 1], [2, 3, 1], [1, 1, 2]]
    expected = [[0, 2 / 3, 1 / 3], [2 / 3, 0, 1 / 3], [1 / 2, 1 / 2, 0]]
    torch.testing.assert_close(M.coactivation(m), torch.tensor(expected))


def test_drops_count_for_no_expert():
    expert_idx_A = torch.tensor([0, 4, 1, 4])  # E = 4: two dropped assignments
    assert M.drop_rate(expert_idx_A, 4) == 0.5
    assert M.tokens_per_expert(expert_idx_A, 4).tolist() == [1, 1, 0, 0]
    m = M.membership(expert_idx_A, 4, num_tokens=4, top_k=1)
    assert m.sum(1).tolist() == [1, 0, 1, 0]


def test_membership_of_expert_choice_layout():
    # Expert 0 takes tokens 2 and 0, expert 1 takes token 2 (twice would still be one membership).
    m = M.membership(torch.tensor([0, 0, 1]), 2, num_tokens=3, top_k=1, token_idx_A=torch.tensor([2, 0, 2]))
    assert m.tolist() == [[1, 0], [0, 0], [1, 1]]


def test_domain_specialisation_by_hand():
    m = member([{0, 1}, {0, 1}, {2, 3}, {0, 3}], 4)
    share_NE = M.specialisation(m, torch.tensor([0, 0, 1, 1]), 2)
    assert share_NE.tolist() == [[1, 1, 0, 0], [0.5, 0, 0.5, 1]]
    assert share_NE.sum(1).tolist() == [2, 2]  # rows sum to K
    assert M.uniform_share(2, 4) == 0.5


def test_router_saturation_by_hand():
    final = member([{0, 1}, {2, 3}], 4)
    assert M.router_saturation(member([{0, 2}, {2, 3}], 4), final, 2) == pytest.approx(0.75)
    assert M.router_saturation(final, final, 2) == 1.0


def test_router_saturation_of_independent_routers_is_k_over_e():
    g = torch.Generator().manual_seed(0)
    sets_a = [torch.randperm(8, generator=g)[:2].tolist() for _ in range(4000)]
    sets_b = [torch.randperm(8, generator=g)[:2].tolist() for _ in range(4000)]
    assert M.router_saturation(member(sets_a, 8), member(sets_b, 8), 2) == pytest.approx(2 / 8, abs=0.02)


def test_primary_expert_and_transition():
    m = member([{0, 1}, {1, 2}, set()], 3)
    w = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.6, 0.4], [0.0, 0.0, 0.0]])
    assert M.primary_expert(m, w).tolist() == [1, 1, 3]  # 3 = E: every assignment dropped
    t = M.layer_transition(torch.tensor([0, 0, 1, 3]), torch.tensor([1, 1, 0, 0]), 3)
    assert t.tolist() == [[0, 2, 0], [1, 0, 0], [0, 0, 0]]  # the dropped token is left out


def test_cross_layer_consistency_extremes():
    assert M.cross_layer_consistency(torch.tensor([[5.0, 0], [0, 5.0]])) == pytest.approx(1.0)
    assert M.cross_layer_consistency(torch.tensor([[0, 5.0], [5.0, 0]])) == pytest.approx(1.0)  # a relabelling
    assert M.cross_layer_consistency(torch.tensor([[3.0, 3.0], [3.0, 3.0]])) == pytest.approx(0.0, abs=1e-6)
    assert M.cross_layer_consistency(torch.tensor([[4.0, 0], [0, 0]])) == 1.0  # both constant


# -- against the definitions on random routing --------------------------------------------------------
@pytest.fixture
def routing():
    router = RouterConfig(kind="topk", num_experts=6, top_k=2).build(16)
    return router(torch.randn(200, 16) * 3)


def test_counts_and_balance_against_loops(routing):
    E = routing.num_experts
    counted = Counter(routing.expert_idx_A.tolist())
    counts_E = M.tokens_per_expert(routing.expert_idx_A, E)
    assert counts_E.tolist() == [counted[e] for e in range(E)]
    mean = sum(counted.values()) / E
    assert M.load_imbalance(counts_E) == pytest.approx(max(counted.values()) / mean)
    std = math.sqrt(sum((counted[e] - mean) ** 2 for e in range(E)) / E)
    assert M.load_cv(counts_E) == pytest.approx(std / mean)
    shares = [counted[e] / sum(counted.values()) for e in range(E)]
    assert M.load_diversity(counts_E) == pytest.approx(-sum(p * math.log(p) for p in shares if p) / math.log(E))
    # The engine's own loss and statistics are the reference implementation.
    ref = load_balancing_loss(routing.probs_TE, routing.expert_idx_A, E)
    assert M.balance_loss(routing.probs_TE, counts_E) == pytest.approx(ref.item(), rel=1e-6)
    assert M.z_loss(routing.logits_TE) == pytest.approx(router_z_loss(routing.logits_TE).item(), rel=1e-6)
    assert routing_stats(routing)["tokens_per_expert"][0].tolist() == [float(counted[e]) for e in range(E)]


def test_entropy_and_confidence_against_loops(routing):
    probs = routing.probs_TE.tolist()
    h = sum(-sum(p * math.log(p) for p in row if p > 0) for row in probs) / len(probs)
    assert M.routing_entropy(routing.probs_TE) == pytest.approx(h, rel=1e-5)
    top = [sorted(row, reverse=True) for row in probs]
    top1, margin = M.router_confidence(routing.probs_TE)
    assert top1 == pytest.approx(sum(r[0] for r in top) / len(top), rel=1e-5)
    assert margin == pytest.approx(sum(r[0] - r[1] for r in top) / len(top), rel=1e-5)


def test_coactivation_and_specialisation_against_loops(routing):
    E, T = routing.num_experts, routing.num_tokens
    sets = [set(row) for row in routing.topk_idx_TK().tolist()]
    m = M.membership(routing.expert_idx_A, E, T, routing.top_k)
    n = Counter(e for s in sets for e in s)
    pairs = Counter((i, j) for s in sets for i in s for j in s if i != j)
    co = M.coactivation(m)
    for i in range(E):
        for j in range(E):
            expected = 0.0 if i == j else pairs[(i, j)] / max(n[i], 1)
            assert co[i, j].item() == pytest.approx(expected)
    domain_T = torch.randint(0, 3, (T,))
    share = M.specialisation(m, domain_T, 3)
    for d in range(3):
        tokens = [t for t in range(T) if domain_T[t] == d]
        for e in range(E):
            assert share[d, e].item() == pytest.approx(sum(e in sets[t] for t in tokens) / len(tokens))


def test_saturation_and_consistency_against_loops(routing):
    E, T, K = routing.num_experts, routing.num_tokens, routing.top_k
    other = RouterConfig(kind="topk", num_experts=E, top_k=K).build(16)(torch.randn(T, 16))
    sa = [set(r) for r in routing.topk_idx_TK().tolist()]
    sb = [set(r) for r in other.topk_idx_TK().tolist()]
    ma, mb = M.membership(routing.expert_idx_A, E, T, K), M.membership(other.expert_idx_A, E, T, K)
    assert M.router_saturation(ma, mb, K) == pytest.approx(sum(len(a & b) / K for a, b in zip(sa, sb)) / T)
    x = torch.randint(0, E, (T,))
    y = (x + torch.randint(0, 2, (T,))) % E  # partly determined by x
    pxy = Counter(zip(x.tolist(), y.tolist()))
    px, py = Counter(x.tolist()), Counter(y.tolist())
    mi = sum(c / T * math.log((c / T) / (px[i] / T * py[j] / T)) for (i, j), c in pxy.items())
    hx = -sum(c / T * math.log(c / T) for c in px.values())
    hy = -sum(c / T * math.log(c / T) for c in py.values())
    nmi = M.cross_layer_consistency(M.layer_transition(x, y, E))
    assert nmi == pytest.approx(2 * mi / (hx + hy), rel=1e-4)
