"""Routers: ``x_TD -> Routing``. Shape legend in ``routing.py``.

Every router owns its ``weight`` [E, D] parameter (named as in transformers, so checkpoints keep
their keys), computes its own auxiliary losses with coefficients from :class:`RouterConfig`, and
hands back a :class:`~moe_engine.moe.routing.Routing`. New routers register themselves by name:

    @register_router("my_router")
    class MyRouter(Router):
        def route(self, x_TD, group_size=None):
            logits_TE = self.logits(x_TD)
            ...
            return self.token_choice(logits_TE, probs_TE, topk_idx_TK, topk_weight_TK)

README.md ("A custom router is a few lines") shows a complete one.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.config import Config
from moe_engine.moe import router_kernels
from moe_engine.moe.losses import balance_loss_from_sums, load_balancing_loss, router_z_loss
from moe_engine.moe.routing import Routing


@dataclass
class RouterConfig(Config):
    """One router's settings; fields equal the keys of a params.yaml ``router:`` section. Checked
    when made (``check``), so a router that would fail inside forward is refused at config time."""

    kind: str = "topk"  # topk | switch | expert_choice | sigmoid_grouped | any registered name
    num_experts: int = 8
    top_k: int = 2
    norm_topk_prob: bool = True  # renormalise the K chosen weights to sum to 1 (Mixtral yes, OLMoE no)
    aux_loss_coef: float = 0.01  # Switch/GShard load balancing; 0 turns it off explicitly
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    jitter_noise: float = 0.0  # multiplicative input noise while training (Switch, Mixtral)
    fp32: bool = False  # compute the router projection itself in float32 (Switch's "selective precision")
    capacity_factor: float = 1.0  # switch / expert_choice: capacity = ceil(cf * tokens * K / E)
    expert_capacity: int | None = None  # switch: fixed capacity per sequence (transformers' Switch)
    n_group: int = 1  # sigmoid_grouped: expert groups (DeepSeek-V3 node-limited routing)
    topk_group: int = 1  # sigmoid_grouped: groups a token may use
    routed_scaling_factor: float = 1.0  # sigmoid_grouped: scale on the combined weights
    bias_update_rate: float = 0.0  # sigmoid_grouped: aux-loss-free balancing step size (u in DeepSeek-V3)

    def check(self) -> None:
        self.require(self.kind in ROUTERS, "kind", f"a registered router: {', '.join(sorted(ROUTERS))}")
        self.require(self.num_experts >= 1, "num_experts", ">= 1")
        self.require(1 <= self.top_k <= self.num_experts, "top_k", f"in [1, num_experts = {self.num_experts}]")
        self.require(self.aux_loss_coef >= 0, "aux_loss_coef", ">= 0 (0 turns the balance loss off)")
        self.require(self.z_loss_coef >= 0, "z_loss_coef", ">= 0")
        self.require(0.0 <= self.jitter_noise < 1.0, "jitter_noise", "in [0, 1)")
        self.require(self.capacity_factor > 0, "capacity_factor", "> 0 (capacity = ceil(cf * tokens * K / E))")
        self.require(self.expert_capacity is None or self.expert_capacity >= 1, "expert_capacity", "None or >= 1")
        self.require(self.n_group >= 1 and self.num_experts % self.n_group == 0, "n_group",
                     f">= 1 and divide num_experts = {self.num_experts}")
        self.require(1 <= self.topk_group <= self.n_group, "topk_group", f"in [1, n_group = {self.n_group}]")
        if self.kind == "sigmoid_grouped" and self.n_group > 1:
            reachable = self.topk_group * (self.num_experts // self.n_group)
            self.require(self.top_k <= reachable, "top_k", f"<= topk_group * experts per group = {reachable}")
        self.require(self.routed_scaling_factor > 0, "routed_scaling_factor", "> 0")
        self.require(self.bias_update_rate >= 0, "bias_update_rate", ">= 0")

    def build(self, hidden_size: int) -> "Router":
        try:
            cls = ROUTERS[self.kind]
        except KeyError:
            raise ValueError(f"router kind {self.kind!r} is not registered; known: {sorted(ROUTERS)}") from None
        return cls(hidden_size, self)


ROUTERS: dict[str, type["Router"]] = {}


def register_router(name: str) -> Callable[[type["Router"]], type["Router"]]:
    def add(cls: type["Router"]) -> type["Router"]:
        ROUTERS[name] = cls
        return cls

    return add


class Router(nn.Module, abc.ABC):
    """Base class: a linear scorer ``weight`` [E, D] and helpers to build a Routing. Subclasses
    implement ``route``."""

    def __init__(self, hidden_size: int, config: RouterConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.loss_scale = 1.0  # set to 1 / num_moe_layers by the model adapter
        self.token_mask_T: torch.Tensor | None = None  # set by the layer for one forward: False = padding
        self.monitor_stats = False  # set by the layer for one forward: routing hooks want the fused monitor sums

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.config.jitter_noise > 0:
            eps = self.config.jitter_noise
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return self.project(x_TD)

    def project(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.config.fp32:
            return F.linear(x_TD.float(), self.weight.float())
        return F.linear(x_TD, self.weight)

    @abc.abstractmethod
    def route(self, x_TD: torch.Tensor, group_size: int | None = None) -> Routing:
        """Decide where each token of ``x_TD`` goes; ``group_size`` is the sequence length (capacity groups)."""

    def forward(self, x_TD: torch.Tensor, group_size: int | None = None) -> Routing:
        return self.route(x_TD, group_size)

    def after_step(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Called by the training loop once per optimizer step with the step's tokens per expert
        (summed over micro-batches and data-parallel ranks). Routers that adapt between steps
        (aux-loss-free balancing) override it; the default does nothing."""

    def token_choice(
        self,
        logits_TE: torch.Tensor,
        probs_TE: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        topk_weight_TK: torch.Tensor,
        keep_TK: torch.Tensor | None = None,
    ) -> Routing:
        """Routing for token-choice routers, with the configured aux losses attached.
        ``keep_TK`` (bool) marks the assignments that fit their expert's capacity."""
        expert_idx_A = topk_idx_TK.reshape(-1)
        weight_A = topk_weight_TK.reshape(-1)
        if keep_TK is not None:
            keep_A = keep_TK.reshape(-1)
            expert_idx_A = torch.where(keep_A, expert_idx_A, self.num_experts)
            weight_A = weight_A * keep_A
        routing = Routing(expert_idx_A, weight_A, logits_TE, probs_TE, self.num_experts, topk_idx_TK.shape[1])
        routing.may_drop = keep_TK is not None
        routing.aux_losses = self.aux_losses(logits_TE, probs_TE, topk_idx_TK)
        return routing

    def aux_losses(self, logits_TE, probs_TE, chosen_idx) -> dict[str, torch.Tensor]:
        losses = {}
        if self.config.aux_loss_coef > 0 and torch.is_grad_enabled():
            balance = load_balancing_loss(probs_TE, chosen_idx, self.num_experts, self.token_mask_T)
            losses["load_balancing_loss"] = self.config.aux_loss_coef * self.loss_scale * balance
        if self.config.z_loss_coef > 0 and torch.is_grad_enabled():
            losses["router_z_loss"] = self.config.z_loss_coef * self.loss_scale * router_z_loss(logits_TE)
        return losses


@register_router("topk")
class TopKRouter(Router):
    """Softmax over all experts, keep the top K (GShard; Mixtral, OLMoE, Qwen2-MoE).

    With ``norm_topk_prob`` the K kept probabilities are renormalised to sum to 1 (Mixtral and
    Qwen2-MoE's option), otherwise they stay raw softmax probabilities (OLMoE's default).
    """

    def route(self, x_TD, group_size=None):
        logits_TE = self.logits(x_TD)
        if router_kernels.usable(logits_TE, self.top_k):
            return self.fused_route(logits_TE, x_TD.dtype)
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        topk_weight_TK, topk_idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.config.norm_topk_prob:
            topk_weight_TK = topk_weight_TK / topk_weight_TK.sum(dim=-1, keepdim=True)
        return self.token_choice(logits_TE, probs_TE, topk_idx_TK, topk_weight_TK.to(x_TD.dtype))

    def fused_route(self, logits_TE: torch.Tensor, dtype: torch.dtype) -> Routing:
        """The same routing and aux losses from one Triton kernel each way (``router_kernels``, CUDA)."""
        cfg, mask_T = self.config, self.token_mask_T
        want = {"load_balancing_loss": cfg.aux_loss_coef, "router_z_loss": cfg.z_loss_coef}
        want = {k: c for k, c in want.items() if c > 0} if torch.is_grad_enabled() else {}
        probs_TE, idx_TK, w_TK, psum_E, counts_E, zsq, monitor_sums = router_kernels.topk_route(
            logits_TE, mask_T, self.top_k, cfg.norm_topk_prob, bool(want), dtype, monitor=self.monitor_stats and router_kernels.FUSED["monitor"])
        routing = Routing(idx_TK.view(-1), w_TK.view(-1), logits_TE, probs_TE, self.num_experts, self.top_k)
        routing.monitor_sums = monitor_sums
        num_tokens = logits_TE.shape[0]
        if "load_balancing_loss" in want:
            den = float(num_tokens) if mask_T is None else mask_T.float().sum().clamp_min(1.0)
            balance = balance_loss_from_sums(psum_E, counts_E, den, self.num_experts)
            routing.aux_losses["load_balancing_loss"] = want["load_balancing_loss"] * self.loss_scale * balance
        if "router_z_loss" in want:
            routing.aux_losses["router_z_loss"] = want["router_z_loss"] * self.loss_scale * (zsq / num_tokens)
        return routing


@register_router("switch")
class SwitchRouter(Router):
    """Switch Transformer top-1 routing with expert capacity (Fedus et al. 2021, sec. 2.2).

    Capacity is counted per group of ``group_size`` consecutive tokens (one sequence, as in
    transformers' Switch): tokens are served in order and an expert's ``C + 1``-th token is
    dropped. The dropped token gets no expert output; the residual connection carries it.
    ``C`` is ``expert_capacity`` if set, else ``ceil(capacity_factor * group_size * K / E)``.
    """

    def capacity(self, group_size: int) -> int:
        if self.config.expert_capacity is not None:
            return self.config.expert_capacity
        return math.ceil(self.config.capacity_factor * group_size * self.top_k / self.num_experts)

    def route(self, x_TD, group_size=None):
        num_tokens = x_TD.shape[0]
        group_size = group_size or num_tokens
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        topk_weight_TK, topk_idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.config.norm_topk_prob and self.top_k > 1:
            topk_weight_TK = topk_weight_TK / topk_weight_TK.sum(dim=-1, keepdim=True)
        # Position of each assignment in its expert's queue within its group: a running count of
        # earlier assignments to the same expert (token order, then k order).
        one_hot_GNE = F.one_hot(topk_idx_TK, self.num_experts).view(-1, group_size * self.top_k, self.num_experts)
        position_GNE = torch.cumsum(one_hot_GNE, dim=1)
        position_TK = (position_GNE * one_hot_GNE).sum(-1).view(num_tokens, self.top_k)
        keep_TK = position_TK <= self.capacity(group_size)
        return self.token_choice(logits_TE, probs_TE, topk_idx_TK, topk_weight_TK.to(x_TD.dtype), keep_TK)


@register_router("sigmoid_grouped")
class SigmoidGroupedRouter(Router):
    """DeepSeek-V3 routing (DeepSeek-AI 2024, sec. 2.1.2): sigmoid affinities, group-limited
    selection, and auxiliary-loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load
    Balancing Strategy for Mixture-of-Experts").

    A per-expert bias ``e_score_correction_bias`` is added to the scores for *choosing* experts only;
    the combine weights use the raw scores. After each optimizer step, :meth:`update_bias` nudges the
    bias of overloaded experts down and underloaded ones up by ``bias_update_rate``.
    Selection first keeps the ``topk_group`` best of ``n_group`` groups (a group scores the sum of its
    two best experts), then the top K experts inside them.
    """

    def __init__(self, hidden_size, config):
        super().__init__(hidden_size, config)
        if config.num_experts % config.n_group:
            raise ValueError(f"num_experts={config.num_experts} is not divisible by n_group={config.n_group}")
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def project(self, x_TD):
        return F.linear(x_TD.float(), self.weight.float())  # DeepSeek-V3 routes in float32

    def route(self, x_TD, group_size=None):
        cfg = self.config
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE + self.e_score_correction_bias
        if cfg.n_group > 1:
            per_group = self.num_experts // cfg.n_group
            choice_TGX = choice_TE.view(-1, cfg.n_group, per_group)
            group_score_TG = choice_TGX.topk(min(2, per_group), dim=-1).values.sum(-1)
            group_idx = group_score_TG.topk(cfg.topk_group, dim=-1, sorted=False).indices
            group_mask_TG = torch.zeros_like(group_score_TG).scatter_(1, group_idx, 1.0).bool()
            choice_TE = choice_TGX.masked_fill(~group_mask_TG[..., None], float("-inf")).view_as(choice_TE)
        topk_idx_TK = choice_TE.topk(self.top_k, dim=-1, sorted=False).indices
        topk_weight_TK = scores_TE.gather(1, topk_idx_TK)
        if cfg.norm_topk_prob:
            topk_weight_TK = topk_weight_TK / (topk_weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weight_TK = topk_weight_TK * cfg.routed_scaling_factor
        # For the (optional) balance loss, normalised affinities play the role of probabilities.
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        return self.token_choice(logits_TE, probs_TE, topk_idx_TK, topk_weight_TK.to(x_TD.dtype))

    @torch.no_grad()
    def after_step(self, tokens_per_expert_E: torch.Tensor) -> None:
        """bias_e += u * sign(mean load - load_e), once per optimizer step with the step's counts
        (summed over micro-batches and data-parallel ranks)."""
        if self.config.bias_update_rate <= 0:
            return
        load_E = tokens_per_expert_E.float().to(self.e_score_correction_bias.device)
        self.e_score_correction_bias += self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)

    update_bias = after_step  # the name DeepSeek-V3's paper uses


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens by softmax
    score, ``C = ceil(capacity_factor * T * K / E)``; a token may get 0..E experts. Perfect load
    balance by construction, no aux loss needed. It looks at the whole batch, so in a causal LM
    a token's routing depends on later tokens: use it for encoders or research, not for decoding.
    """

    def route(self, x_TD, group_size=None):
        num_tokens = x_TD.shape[0]
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        capacity = min(num_tokens, math.ceil(self.config.capacity_factor * num_tokens * self.top_k / self.num_experts))
        weight_EC, token_idx_EC = probs_TE.t().topk(capacity, dim=-1)
        expert_idx_EC = torch.arange(self.num_experts, device=x_TD.device)[:, None].expand_as(token_idx_EC)
        routing = Routing(
            expert_idx_A=expert_idx_EC.reshape(-1),
            weight_A=weight_EC.reshape(-1).to(x_TD.dtype),
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            num_experts=self.num_experts,
            top_k=self.top_k,
            token_idx_A=token_idx_EC.reshape(-1),
        )
        if self.config.z_loss_coef > 0 and torch.is_grad_enabled():
            routing.aux_losses["router_z_loss"] = self.config.z_loss_coef * self.loss_scale * router_z_loss(logits_TE)
        return routing
