"""Expert scores and selection for expert-specialised fine-tuning (ESFT; Wang et al. 2024, "Let the
Expert Stick to His Last", sec. 3.2).

For every MoE layer and routed expert i, over the task's sequences j (non-padding tokens t):

    gate score        g_i = 1/N sum_j 1/L_j sum_t  s_{i,t} * [i in topk(t)]      (ESFT-Gate)
    token selection   r_i = 1/N sum_j 1/L_j sum_t  [i in topk(t)] / K           (ESFT-Token)

with s_{i,t} the router's affinity (softmax probability; DeepSeek-V3's normalised sigmoid). Per
layer, experts are taken in decreasing score until their share of the layer's total reaches the
threshold p; only those train.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from moe_engine.models.adapters import moe_layers


@torch.no_grad()
def expert_scores(model, batches: Iterable[dict]) -> dict[str, dict[str, np.ndarray]]:
    """{layer name: {"gate": [E], "token": [E]}} in float64, averaged per sequence then over sequences."""
    names = {m: n for n, m in model.named_modules() if m in set(moe_layers(model))}
    sums: dict[str, dict[str, torch.Tensor]] = {}
    state = {"sequences": 0}

    def hook(layer, routing, counts):
        mask = layer.padding_mask_BS
        B = mask.shape[0] if mask is not None else 1
        T, E = routing.probs_TE.shape
        idx_TK = routing.topk_idx_TK()
        valid_TK = (idx_TK < E).double()  # a capacity drop (Switch: index E) is no selection
        chosen_TE = torch.zeros(T, E, dtype=torch.float64, device=routing.probs_TE.device)
        chosen_TE.scatter_add_(1, idx_TK.clamp_max(E - 1), valid_TK)
        gate_TE = routing.probs_TE.double() * chosen_TE
        m_BS = (mask.double() if mask is not None else torch.ones(B, T // B, dtype=torch.float64, device=gate_TE.device))
        m_BS = m_BS[:, -(T // B):]
        per_seq = lambda v_TE: (v_TE.view(B, T // B, E) * m_BS[..., None]).sum(1) / m_BS.sum(1, keepdim=True).clamp_min(1)  # noqa: E731
        entry = sums.setdefault(names[layer], {"gate": 0, "token": 0})
        entry["gate"] = entry["gate"] + per_seq(gate_TE).sum(0)
        entry["token"] = entry["token"] + per_seq(chosen_TE / routing.top_k).sum(0)

    handles = [layer.register_routing_hook(hook) for layer in names]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            state["sequences"] += batch["input_ids"].shape[0]
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    n = max(state["sequences"], 1)
    return {name: {k: (v / n).cpu().numpy() for k, v in entry.items()} for name, entry in sums.items()}


def select_experts(scores_E: np.ndarray, threshold: float) -> list[int]:
    """Fewest experts, best first, whose share of the total score reaches ``threshold`` (sorted ids)."""
    scores_E = np.asarray(scores_E, dtype=np.float64)
    total = scores_E.sum()
    if total <= 0:
        return []
    order = np.argsort(-scores_E, kind="stable")
    cumulative = np.cumsum(scores_E[order]) / total
    count = int(np.searchsorted(cumulative, threshold - 1e-12) + 1)
    return sorted(int(i) for i in order[:count])


def selection(scores: dict[str, dict[str, np.ndarray]], kind: str, threshold: float) -> dict[str, list[int]]:
    return {layer: select_experts(s[kind], threshold) for layer, s in scores.items()}
