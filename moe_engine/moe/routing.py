"""What a router decides, as one small record, and the statistics derived from it.

Shape legend (used in every file of ``moe_engine.moe``):
    T tokens (batch * sequence, flattened)   D hidden size       E routed experts
    K experts per token (top-k)              F expert hidden     A assignments (token, expert) pairs
    C expert capacity                        S sequence length   B batch

A router turns ``x_TD`` into a :class:`Routing`. Token-choice routers (top-k, Switch, DeepSeek)
produce exactly ``A = T * K`` assignments in token-major order (assignment ``a`` belongs to token
``a // K``); an assignment that a capacity limit dropped keeps its slot with ``expert_idx == E``
(a sentinel that sorts behind every real expert) and weight 0. Expert-choice routing, where a
token may be picked by any number of experts, gives ``token_idx_A`` explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# How a metric is reduced across data-parallel ranks (OLMo-core's router.compute_metrics idea):
# the trainer all-reduces each value with this op before logging.
SUM, MEAN, MAX = "sum", "mean", "max"


@dataclass
class Routing:
    expert_idx_A: torch.Tensor  # long [A]; value E marks a dropped assignment
    weight_A: torch.Tensor  # [A] combine weight of each assignment (0 where dropped)
    logits_TE: torch.Tensor  # raw router logits, for z-loss and analytics
    probs_TE: torch.Tensor  # float32 scores the choice was made from (softmax or sigmoid)
    num_experts: int
    top_k: int  # K for token-choice routers; average experts per token for expert choice
    token_idx_A: torch.Tensor | None = None  # None: token-major layout, token = a // K
    may_drop: bool = False  # True when a capacity limit may have dropped assignments
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # already scaled by coef
    # [4 + E] from the fused router when hooks asked for it: sums over tokens of the probabilities' entropy,
    # the top-1 probability, its margin, logsumexp(logits)^2, then each expert's probability (RouterMonitor)
    monitor_sums: torch.Tensor | None = None

    def detached(self) -> "Routing":
        """The same record without autograd history (kept between steps without holding graphs)."""
        return Routing(
            self.expert_idx_A,
            self.weight_A.detach(),
            self.logits_TE.detach(),
            self.probs_TE.detach(),
            self.num_experts,
            self.top_k,
            self.token_idx_A,
            self.may_drop,
            {k: v.detach() for k, v in self.aux_losses.items()},
            self.monitor_sums,
        )

    @property
    def num_tokens(self) -> int:
        return self.logits_TE.shape[0]

    @property
    def token_major(self) -> bool:
        return self.token_idx_A is None

    def tokens_per_expert(self) -> torch.Tensor:
        """long [E]: assignments each expert received after any capacity drop."""
        counts = torch.zeros(self.num_experts + 1, dtype=torch.long, device=self.expert_idx_A.device)
        return counts.scatter_add_(0, self.expert_idx_A, torch.ones_like(self.expert_idx_A))[: self.num_experts]

    def num_dropped(self) -> torch.Tensor:
        return (self.expert_idx_A == self.num_experts).sum()

    def topk_idx_TK(self) -> torch.Tensor:
        """long [T, K]: the experts each token chose (sentinel E where dropped). Token-major only."""
        if not self.token_major:
            raise ValueError("expert-choice routing has no fixed top-k per token")
        return self.expert_idx_A.view(self.num_tokens, self.top_k)


def routing_stats(routing: Routing, tokens_per_expert_E: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, str]]:
    """Cheap per-step statistics of one forward on this rank, detached: name -> (value, how to
    reduce across ranks). Ratios such as load imbalance are not listed: a ratio of per-rank values
    is not the global ratio, so they are derived from the SUM-reduced counts (analytics.online does).
    """
    with torch.no_grad():
        counts_E = routing.tokens_per_expert() if tokens_per_expert_E is None else tokens_per_expert_E
        stats: dict[str, tuple[torch.Tensor, str]] = {
            "tokens_per_expert": (counts_E.float(), SUM),
            "dropped": (routing.num_dropped().float(), SUM),
            "assignments": (torch.tensor(float(routing.expert_idx_A.numel())), SUM),
        }
        for name, value in routing.aux_losses.items():
            stats[name] = (value.detach().float(), MEAN)
    return stats
