"""Router auxiliary losses, per layer.

Both are computed from one layer's router output; the layer scales them by their coefficient and
by 1 / (number of MoE layers), so a model's total is ``coef * mean over layers`` — the same
magnitude as transformers' ``router_aux_loss_coef``, which applies its coefficient once to a loss
pooled over all layers.
"""

from __future__ import annotations

import torch


def load_balancing_loss(probs_TE: torch.Tensor, expert_idx_A: torch.Tensor, num_experts: int,
                        mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer load-balancing loss, eqs. (4)-(6) of Fedus et al. 2021 (GShard's form
    for top-k): ``E * sum_e f_e * P_e``, with ``f_e`` the share of tokens assigned to expert e
    (counting each of a token's K choices, so sum_e f_e = K) and ``P_e`` the mean router probability
    of e. The minimum, K, is reached by uniform routing.

    ``expert_idx_A`` are the choices *before* any capacity drop (as in Switch and transformers);
    ``f_e`` carries no gradient, only ``P_e`` does. ``mask_T`` (bool, token-major) leaves padding out
    of both means, as transformers' ``load_balancing_loss_func`` does with ``attention_mask``.
    """
    num_tokens = probs_TE.shape[0]
    idx_A = expert_idx_A.flatten()
    per_token = idx_A.numel() // max(num_tokens, 1)
    if mask_T is None:
        ones_A = torch.ones_like(idx_A, dtype=torch.float32)
        denominator = float(num_tokens)
        p_E = probs_TE.float().mean(dim=0)
    else:
        w_T = mask_T.reshape(-1).to(device=probs_TE.device, dtype=torch.float32)
        ones_A = w_T.repeat_interleave(per_token)
        denominator = w_T.sum().clamp_min(1.0)
        p_E = (probs_TE.float() * w_T[:, None]).sum(dim=0) / denominator
    # scatter_add instead of bincount: fixed output size, so no GPU->host sync on the hot path
    counts_E = torch.zeros(num_experts, device=idx_A.device, dtype=torch.float32).scatter_add_(0, idx_A, ones_A)
    f_E = counts_E / denominator
    return num_experts * torch.sum(f_E * p_E)


def balance_loss_from_sums(psum_E: torch.Tensor, counts_E: torch.Tensor, denominator, num_experts: int) -> torch.Tensor:
    """``load_balancing_loss`` from its two sums over tokens (the fused router computes them in its kernel):
    ``psum_E`` = sum_t m_t probs[t, e] (carries the gradient), ``counts_E`` = sum_t m_t [e chosen by t]."""
    return num_experts * torch.sum((counts_E / denominator) * (psum_E / denominator))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss, eq. (5) of Zoph et al. 2022: mean over tokens of logsumexp(logits)^2.
    Keeps router logits small, which keeps the fp32 softmax and bf16 training stable."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``x`` whose backward also sends gradient 1 into ``aux_loss``.

    Attaching the aux loss to the layer's output (as Megatron-LM's MoEAuxLossAutoScaler does)
    means any loss computed from the model output trains the router balance too: it cannot be
    forgotten by a custom training loop, and it survives activation checkpointing, where the
    forward is recomputed inside backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux_loss: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.grad_scale = grad_scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        # grad_scale matches whatever scaling the trainer applies to the main loss (1 / gradient
        # accumulation steps), so the aux loss keeps its configured weight.
        (aux_loss,) = ctx.saved_tensors
        return grad_x, torch.full_like(aux_loss, ctx.grad_scale), None
