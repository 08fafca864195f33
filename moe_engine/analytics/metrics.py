"""Router metrics as pure functions on tensors.

Shape legend (as in ``moe_engine.moe.routing``, plus two):
    T tokens   E routed experts   K experts per token   A assignments (token, expert) pairs
    N groups of tokens (domains, token ids)

Every function (``uniform_share`` aside) takes tensors and returns tensors, never Python numbers,
and uses only ops that need no device-to-host copy (``index_add_`` into fixed-size buffers, no
``bincount``, boolean masking or ``.item()``), so the online monitor can call them inside the
training step. A dropped assignment has expert index ``E`` (the sentinel of
:class:`~moe_engine.moe.routing.Routing`) and counts for no expert. Most metrics are computed from
``member_TE``: 1 where expert e processed token t.
"""

from __future__ import annotations

import math

import torch

from moe_engine.moe.losses import router_z_loss


def token_index(num_assignments: int, top_k: int, token_idx_A: torch.Tensor | None, device=None) -> torch.Tensor:
    """long [A]: the token of each assignment (token-major layout: ``a // K``)."""
    if token_idx_A is not None:
        return token_idx_A
    return torch.arange(num_assignments, device=device) // top_k


def tokens_per_expert(expert_idx_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """float [E]: assignments each expert processed, dropped ones excluded (Switch Transformer's
    per-expert token count behind f_i, Fedus et al. 2021, eq. 5)."""
    counts = torch.zeros(num_experts + 1, device=expert_idx_A.device)
    counts.index_add_(0, expert_idx_A, torch.ones_like(expert_idx_A, dtype=counts.dtype))
    return counts[:num_experts]


def membership(
    expert_idx_A: torch.Tensor, num_experts: int, num_tokens: int, top_k: int, token_idx_A: torch.Tensor | None = None
) -> torch.Tensor:
    """float [T, E]: 1 where expert e processed token t (drops excluded). Works for token-choice and
    expert-choice layouts, so every later metric is layout-free."""
    member_TE = torch.zeros(num_tokens, num_experts + 1, device=expert_idx_A.device)
    token_A = token_index(expert_idx_A.numel(), top_k, token_idx_A, expert_idx_A.device)
    member_TE.index_put_((token_A, expert_idx_A), torch.ones_like(token_A, dtype=member_TE.dtype), accumulate=True)
    return member_TE[:, :num_experts].clamp_max(1.0)


def load_share(counts_E: torch.Tensor) -> torch.Tensor:
    """[E] share of the processed assignments each expert got: Switch's f_i normalised to sum 1
    (Fedus et al. 2021, eq. 5). Utilisation relative to a fair share is ``E * share``."""
    return counts_E / counts_E.sum().clamp_min(1e-9)


def load_imbalance(counts_E: torch.Tensor) -> torch.Tensor:
    """max / mean assignments per expert: 1 for perfect balance, E / K if every token goes to the same
    K experts. The quantity Switch Transformer's balancing loss drives to 1 (Fedus et al. 2021,
    sec. 2.2); DeepSeek's MaxVio (Wang et al. 2024) is this minus 1."""
    return counts_E.max() / counts_E.mean().clamp_min(1e-9)


def load_cv(counts_E: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation std / mean of the expert loads (population std), the balance measure
    whose square Shazeer et al. 2017 (sec. 4, "importance" and "load" losses) penalise."""
    return counts_E.std(correction=0) / counts_E.mean().clamp_min(1e-9)


def dead_expert_fraction(counts_E: torch.Tensor) -> torch.Tensor:
    """Share of experts that processed no token: the end state of the self-reinforcing imbalance
    Shazeer et al. 2017 (sec. 4) describe, where the gate keeps favouring the same few experts."""
    return (counts_E == 0).float().mean()


def routing_entropy(probs_TE: torch.Tensor, normalised: bool = False) -> torch.Tensor:
    """Mean over tokens of the Shannon entropy (nats) of the router distribution p(e | x) of
    Switch/GShard routing (Fedus et al. 2021, eq. 1). Low: a decisive router; log E: uniform.
    ``normalised`` divides by log E, giving [0, 1]."""
    h_T = torch.special.entr(probs_TE.detach().float()).sum(-1)
    h = h_T.mean()
    return h / math.log(probs_TE.shape[-1]) if normalised and probs_TE.shape[-1] > 1 else h


def load_diversity(counts_E: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of the expert load, H(f) / log E in [0, 1] (f as in Switch, Fedus et al.
    2021, eq. 5): 1 when all experts share the load equally, 0 when one expert takes everything.
    exp(H) is the "effective number of experts"."""
    num_experts = counts_E.shape[-1]
    h = torch.special.entr(load_share(counts_E)).sum(-1)
    return h / math.log(num_experts) if num_experts > 1 else torch.ones_like(h)


def drop_rate(expert_idx_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Share of assignments dropped because their expert was over capacity (capacity factor and
    token dropping, Switch Transformer, Fedus et al. 2021, sec. 2.2)."""
    return (expert_idx_A == num_experts).float().mean()


def balance_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Unscaled Switch/GShard load-balancing loss E * sum_e f_e P_e (Fedus et al. 2021, eqs. 4-6;
    the engine's ``moe.losses.load_balancing_loss``), with f_e = counts_E / T and P_e the mean
    router probability: K at perfect balance, about E when routing collapses. Analytics see only
    the counts after any capacity drop, so on capacity paths f_e excludes dropped assignments."""
    num_tokens, num_experts = probs_TE.shape
    f_E = counts_E.float() / max(num_tokens, 1)
    return num_experts * (f_E * probs_TE.detach().float().mean(0)).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Unscaled router z-loss, mean logsumexp(logits)^2 (ST-MoE, Zoph et al. 2022, eq. 5)."""
    return router_z_loss(logits_TE).detach()


def router_confidence(probs_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean top-1 probability, mean top-1 minus top-2 probability) over tokens. The top-1
    probability is the Switch gate value p_i(x) (Fedus et al. 2021, eq. 1); a small margin means the
    router hesitates between experts, whose choices then flip under small perturbations (the router
    instability ST-MoE, Zoph et al. 2022, sec. 2, sets out to tame)."""
    probs_TE = probs_TE.detach().float()
    if probs_TE.shape[-1] < 2:
        top1 = probs_TE[:, 0].mean()
        return top1, top1
    top_T2 = probs_TE.topk(2, dim=-1).values
    return top_T2[:, 0].mean(), (top_T2[:, 0] - top_T2[:, 1]).mean()


def coactivation_counts(member_TE: torch.Tensor) -> torch.Tensor:
    """[E, E] tokens that experts i and j both processed, over all pairs of a token's selected experts;
    the diagonal holds each expert's own token count (OLMoE, Muennighoff et al. 2024, sec. 5)."""
    return member_TE.t() @ member_TE


def coactivation(member_TE: torch.Tensor) -> torch.Tensor:
    """[E, E] OLMoE's co-activation N(E_i, E_j) / N(E_i): of the tokens expert i processed, the share
    that expert j processed too (Muennighoff et al. 2024, sec. 5, "Expert co-activation").
    Rows are i; the diagonal is set to 0 (an expert trivially co-occurs with itself)."""
    counts_EE = coactivation_counts(member_TE)
    n_E = counts_EE.diagonal().clone()
    share_EE = counts_EE / n_E.clamp_min(1.0)[:, None]
    return share_EE.fill_diagonal_(0.0)


def group_counts(member_TE: torch.Tensor, group_T: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, E] assignments of each group's tokens to each expert, [N] tokens per group) for integer
    group labels (a domain or a token id per token)."""
    counts_NE = torch.zeros(num_groups, member_TE.shape[1], device=member_TE.device).index_add_(0, group_T, member_TE)
    tokens_N = torch.zeros(num_groups, device=member_TE.device).index_add_(0, group_T, torch.ones_like(member_TE[:, 0]))
    return counts_NE, tokens_N


def specialisation(member_TE: torch.Tensor, group_T: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[N, E] share of group n's tokens that expert e processed, OLMoE's domain and vocabulary
    specialisation (Muennighoff et al. 2024, sec. 5). Rows sum to K; an unspecialised router gives
    K / E everywhere (``uniform_share``); ST-MoE (Zoph et al. 2022, "tracing tokens through the
    model") reads the same table by token type. Groups without tokens give 0."""
    counts_NE, tokens_N = group_counts(member_TE, group_T, num_groups)
    return counts_NE / tokens_N.clamp_min(1.0)[:, None]


def uniform_share(top_k: int, num_experts: int) -> float:
    """K / E: the specialisation share every expert gets from an unspecialised router."""
    return top_k / num_experts


def router_saturation(member_TE: torch.Tensor, member_final_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """OLMoE's router saturation (Muennighoff et al. 2024, sec. 5): mean over tokens of
    |top-k at checkpoint t ∩ top-k at the final checkpoint| / k, on the same tokens. 1 means the
    router already routes like the final one; two independent uniform routers give K / E."""
    return (member_TE * member_final_TE).sum(-1).mean() / top_k


def primary_expert(member_TE: torch.Tensor, weight_TE: torch.Tensor) -> torch.Tensor:
    """long [T]: the expert with the largest combine weight among those that processed the token,
    E (the sentinel) where none did (every assignment dropped)."""
    score_TE = torch.where(member_TE > 0, weight_TE.float(), -1.0)
    best_T = score_TE.argmax(-1)
    return torch.where(member_TE.sum(-1) > 0, best_T, member_TE.shape[1])


def layer_transition(primary_T: torch.Tensor, primary_next_T: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E, E] tokens whose primary expert is i in one layer and j in the next (tokens dropped in
    either layer are left out): the inter-layer expert affinity of Yao et al. 2024 ("Exploiting
    Inter-Layer Expert Affinity for Accelerating MoE Inference")."""
    flat = torch.zeros((num_experts + 1) ** 2, device=primary_T.device)
    flat.index_add_(0, primary_T * (num_experts + 1) + primary_next_T, torch.ones_like(primary_T, dtype=flat.dtype))
    return flat.view(num_experts + 1, num_experts + 1)[:num_experts, :num_experts]


def cross_layer_consistency(transition_EE: torch.Tensor) -> torch.Tensor:
    """Normalised mutual information 2 I(X; Y) / (H(X) + H(Y)) between a token's primary expert in
    two layers, from their transition counts (inter-layer affinity, Yao et al. 2024): 0 when the
    next layer's choice is independent of this one's, 1 when it is fully determined (a relabelling).
    Both layers constant: 1, as in scikit-learn's convention."""
    p_EE = transition_EE / transition_EE.sum().clamp_min(1e-9)
    p_x, p_y = p_EE.sum(1), p_EE.sum(0)
    h_x, h_y = torch.special.entr(p_x).sum(), torch.special.entr(p_y).sum()
    mutual = (torch.special.xlogy(p_EE, p_EE).sum() - torch.special.xlogy(p_x, p_x).sum() - torch.special.xlogy(p_y, p_y).sum())
    nmi = 2 * mutual / (h_x + h_y).clamp_min(1e-12)
    return torch.where(h_x + h_y > 1e-12, nmi.clamp(0.0, 1.0), torch.ones_like(nmi))
