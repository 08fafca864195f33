"""Tidy pandas tables from a :class:`~moe_engine.analytics.recorder.RoutingRecorder`, each validated
with its schema in ``schemas.py``. One row per layer, per layer x expert, per assignment, per
expert pair, per group x expert; the metrics come from ``metrics.py``."""

from __future__ import annotations

import math
import re
from typing import Sequence

import pandas as pd
import torch

from moe_engine.analytics import metrics as M
from moe_engine.analytics import schemas


def _layers(rec) -> list[int]:
    layers = rec.recorded_layers()
    if not layers:
        raise ValueError("nothing recorded: run the model inside the recorder (with rec: model(...))")
    return layers


def _consistency(rec, a: int, b: int) -> float:
    """NMI of the primary experts of layers a and b, NaN when they did not see the same tokens."""
    if not rec.same_stack(a, b):
        return math.nan
    da, db = rec.layer_data(a), rec.layer_data(b)
    if da.num_tokens != db.num_tokens:
        return math.nan
    pa_T, pb_T = M.primary_expert(da.member_TE, da.weight_TE), M.primary_expert(db.member_TE, db.weight_TE)
    transition_EE = M.layer_transition(pa_T, pb_T, max(da.num_experts, db.num_experts))
    return M.cross_layer_consistency(transition_EE).item()


def layer_table(rec) -> pd.DataFrame:
    rows, layers = [], _layers(rec)
    for n, i in enumerate(layers):
        d = rec.layer_data(i)
        counts_E = d.counts_E
        has_probs = d.probs_TE.shape[1] == d.num_experts
        top1, margin = M.router_confidence(d.probs_TE) if has_probs else (torch.tensor(math.nan),) * 2
        rows.append({
            "layer": i,
            "name": d.name,
            "num_experts": d.num_experts,
            "top_k": d.top_k,
            "tokens": d.num_tokens,
            "assignments": int(d.expert_idx_A.numel()),
            "load_imbalance": M.load_imbalance(counts_E).item(),
            "load_cv": M.load_cv(counts_E).item(),
            "dead_expert_fraction": M.dead_expert_fraction(counts_E).item(),
            "load_diversity": M.load_diversity(counts_E).item(),
            "drop_rate": M.drop_rate(d.expert_idx_A, d.num_experts).item(),
            "routing_entropy": M.routing_entropy(d.probs_TE, normalised=True).item() if has_probs else math.nan,
            "top1_prob": top1.item(),
            "top1_margin": margin.item(),
            "balance_loss": M.balance_loss(d.probs_TE, counts_E).item() if has_probs else math.nan,
            "z_loss": d.lse_T.square().mean().item(),  # ST-MoE z-loss, from the stored logsumexp
            "consistency_next": _consistency(rec, i, layers[n + 1]) if n + 1 < len(layers) else math.nan,
        })
    return schemas.validate(schemas.LAYER_METRICS, pd.DataFrame(rows))


def expert_table(rec) -> pd.DataFrame:
    frames = []
    for i in _layers(rec):
        d = rec.layer_data(i)
        counts_E = d.counts_E
        has_probs = d.probs_TE.shape[1] == d.num_experts
        share_E = M.load_share(counts_E)
        frames.append(pd.DataFrame({
            "layer": i,
            "expert": range(d.num_experts),
            "tokens": counts_E.long().numpy(),
            "load_share": share_E.numpy(),
            "relative_load": (share_E * d.num_experts).numpy(),
            "mean_prob": d.probs_TE.mean(0).numpy() if has_probs else math.nan,
            "dead": (counts_E == 0).numpy(),
        }))
    return schemas.validate(schemas.EXPERT_LOAD, pd.concat(frames, ignore_index=True))


def assignment_table(rec) -> pd.DataFrame:
    frames = []
    for i in _layers(rec):
        offset = 0
        for r in rec.records[i]:
            token_A = M.token_index(r.expert_idx_A.numel(), r.top_k, r.token_idx_A)
            ids = r.token_ids_T[token_A].numpy() if r.token_ids_T is not None else -1
            frame = pd.DataFrame({
                "layer": i,
                "batch": r.batch,
                "token": (token_A + offset).numpy(),
                "token_id": ids,
                "expert": r.expert_idx_A.numpy(),
                "weight": r.weight_A.numpy(),
                "dropped": (r.expert_idx_A == r.num_experts).numpy(),
            })
            for key, value in r.labels.items():
                frame[key] = value
            frames.append(frame)
            offset += r.num_tokens
    return schemas.validate(schemas.ASSIGNMENTS, pd.concat(frames, ignore_index=True))


def coactivation_table(rec) -> pd.DataFrame:
    frames = []
    for i in _layers(rec):
        d = rec.layer_data(i)
        counts_EE, share_EE = M.coactivation_counts(d.member_TE), M.coactivation(d.member_TE)
        e_i, e_j = torch.meshgrid(torch.arange(d.num_experts), torch.arange(d.num_experts), indexing="ij")
        off = e_i != e_j
        frames.append(pd.DataFrame({
            "layer": i,
            "expert": e_i[off].numpy(),
            "other": e_j[off].numpy(),
            "count": counts_EE[off].long().numpy(),
            "coactivation": share_EE[off].numpy(),
        }))
    return schemas.validate(schemas.COACTIVATION, pd.concat(frames, ignore_index=True))


def specialisation_table(rec, by: str = "domain") -> pd.DataFrame:
    """OLMoE-style specialisation of each expert to the groups of label ``by`` (see metrics.specialisation)."""
    frames = []
    for i in _layers(rec):
        d = rec.layer_data(i)
        values = d.labels_T.get(by)
        if values is None or all(v is None for v in values):
            raise ValueError(f"no tokens labelled {by!r}; call rec.label({by}=...) before the forwards")
        groups = sorted({str(v) for v in values if v is not None})
        code = {g: n for n, g in enumerate(groups)}
        keep_T = torch.tensor([v is not None for v in values])
        group_T = torch.tensor([code[str(v)] for v in values if v is not None], dtype=torch.long)
        counts_NE, tokens_N = M.group_counts(d.member_TE[keep_T], group_T, len(groups))
        share_NE = counts_NE / tokens_N.clamp_min(1.0)[:, None]
        uniform = M.uniform_share(d.top_k, d.num_experts)
        frames.append(pd.DataFrame({
            "layer": i,
            "group": [g for g in groups for _ in range(d.num_experts)],
            "expert": list(range(d.num_experts)) * len(groups),
            "count": counts_NE.long().reshape(-1).numpy(),
            "group_tokens": tokens_N.long().repeat_interleave(d.num_experts).numpy(),
            "share": share_NE.reshape(-1).numpy(),
            "uniform": uniform,
            "ratio": (share_NE / uniform).reshape(-1).numpy(),
        }))
    return schemas.validate(schemas.SPECIALISATION, pd.concat(frames, ignore_index=True))


def token_table(rec, min_count: int = 1) -> pd.DataFrame:
    """OLMoE's vocabulary specialisation: for each token id seen at least ``min_count`` times, the
    share of its occurrences each expert processed (rows with no assignment are left out), the
    expert's share of all the layer's tokens, and their ratio, the lift: 1 when the expert takes the
    token no more often than any token, 1 / expert_share when it takes every occurrence. Ranking by
    share alone puts rare tokens that happened to meet one expert first (every top entry 100%); lift
    asks whether the expert prefers the token (the association-rule lift of Brin et al. 1997)."""
    frames = []
    for i in _layers(rec):
        d = rec.layer_data(i)
        if d.token_ids_T is None:
            raise ValueError("no token ids recorded: call the model with input_ids inside the recorder")
        vocab_V, group_T = torch.unique(d.token_ids_T, return_inverse=True)
        counts_VE, occ_V = M.group_counts(d.member_TE, group_T, len(vocab_V))
        expert_share_E = d.counts_E / max(d.num_tokens, 1)
        v, e = torch.nonzero((counts_VE > 0) & (occ_V[:, None] >= min_count), as_tuple=True)
        share = counts_VE[v, e] / occ_V[v]
        frames.append(pd.DataFrame({
            "layer": i,
            "token_id": vocab_V[v].numpy(),
            "expert": e.numpy(),
            "count": counts_VE[v, e].long().numpy(),
            "occurrences": occ_V[v].long().numpy(),
            "share": share.numpy(),
            "expert_share": expert_share_E[e].numpy(),
            "lift": (share / expert_share_E[e]).numpy(),  # > 0: the expert processed the token, so its share is > 0
        }))
    return schemas.validate(schemas.TOKEN_SPECIALISATION, pd.concat(frames, ignore_index=True))


def consistency_table(rec) -> pd.DataFrame:
    """Cross-layer routing consistency (metrics.cross_layer_consistency) for every pair of layers
    that saw the same tokens."""
    layers = _layers(rec)
    rows = [
        {"layer": a, "other_layer": b, "consistency": c}
        for n, a in enumerate(layers)
        for b in layers[n + 1 :]
        if not math.isnan(c := _consistency(rec, a, b))
    ]
    return schemas.validate(schemas.CONSISTENCY, pd.DataFrame(rows, columns=["layer", "other_layer", "consistency"]))


def checkpoint_steps(checkpoints: Sequence[str]) -> list[int]:
    """Training steps of checkpoints named like the trainer's snapshots (``step_00000100``, ``step100``,
    ``ckpt-300``: the trailing number), for a numeric x axis; their positions 0, 1, ... when a name
    has no trailing number or the numbers do not increase (then they are not steps)."""
    found = [re.search(r"(\d+)$", str(name).rstrip("/")) for name in checkpoints]
    steps = [int(m.group(1)) if m else None for m in found]
    if None in steps or any(b <= a for a, b in zip(steps, steps[1:])):
        return list(range(len(checkpoints)))
    return steps


def saturation_table(recorders: Sequence, checkpoints: Sequence[str]) -> pd.DataFrame:
    """OLMoE's router saturation of each checkpoint against the last one (metrics.router_saturation),
    with the training step (``checkpoint_steps``) and the chance level K / E of two independent
    uniform routers. The recorders must have seen the same tokens in the same order."""
    if len(recorders) != len(checkpoints) or not recorders:
        raise ValueError("give one checkpoint name per recorder, at least one")
    final, rows = recorders[-1], []
    steps = checkpoint_steps([str(c) for c in checkpoints])
    for index, (rec, name) in enumerate(zip(recorders, checkpoints)):
        for i in _layers(final):
            d, f = rec.layer_data(i), final.layer_data(i)
            if d.num_tokens != f.num_tokens or d.num_experts != f.num_experts:
                raise ValueError(f"checkpoint {name!r} layer {i} saw other tokens or experts than the final one")
            rows.append({"checkpoint": str(name), "index": index, "step": steps[index], "layer": i,
                         "saturation": M.router_saturation(d.chosen_TE, f.chosen_TE, f.top_k).item(),
                         "chance": M.uniform_share(f.top_k, f.num_experts)})
    return schemas.validate(schemas.SATURATION, pd.DataFrame(rows))


# A layer's health from its load and router entropy. The thresholds are this project's rules of thumb,
# not a published standard: MaxVio = load_imbalance - 1 (Wang et al. 2024, DeepSeek's aux-loss-free
# balancing) above 0.5 is a clear imbalance, and an imbalance 3/4 of the way to its ceiling E / K (every
# token sent to the same K experts) or a quarter of the experts without a token is a collapse (the
# self-reinforcing state Shazeer et al. 2017, sec. 4, describe).
IMBALANCED_LOAD = 1.5  # load_imbalance (max / mean tokens per expert) at or above this: imbalanced
COLLAPSED_LOAD = 0.75  # (load_imbalance - 1) / (E / K - 1) at or above this: collapsed
COLLAPSED_DEAD = 0.25  # dead_expert_fraction at or above this: collapsed
UNDECIDED_ENTROPY = 0.95  # routing_entropy (normalised by log E) at or above this: near-uniform router


def health_table(layers: pd.DataFrame) -> pd.DataFrame:
    """One verdict per layer of a ``layer_table``: collapsed, imbalanced or balanced (thresholds above),
    the normalised imbalance and the reasons in words, entropy included (a near-uniform router routes
    almost at random: typical at initialisation, a warning late in training)."""
    rows = []
    for r in layers.to_dict("records"):
        ceiling = r["num_experts"] / r["top_k"]
        span = (r["load_imbalance"] - 1) / (ceiling - 1) if ceiling > 1 else 0.0
        dead = r["dead_expert_fraction"]
        reasons = []
        if dead >= COLLAPSED_DEAD or span >= COLLAPSED_LOAD:
            verdict = "collapsed"
        elif dead > 0 or r["load_imbalance"] >= IMBALANCED_LOAD:
            verdict = "imbalanced"
        else:
            verdict = "balanced"
        if dead > 0:
            reasons.append(f"{dead:.0%} of experts get no token")
        if r["load_imbalance"] >= IMBALANCED_LOAD:
            reasons.append(f"busiest expert {r['load_imbalance']:.2f}x its fair share "
                           f"({span:.0%} of the way to all tokens on the same {r['top_k']})")
        entropy = r.get("routing_entropy", math.nan)
        if entropy == entropy and entropy >= UNDECIDED_ENTROPY:
            reasons.append(f"router probabilities near uniform (entropy {entropy:.3f} of log E)")
        rows.append({"layer": r["layer"], "verdict": verdict, "load_imbalance": r["load_imbalance"],
                     "imbalance_of_ceiling": min(max(span, 0.0), 1.0), "dead_expert_fraction": dead,
                     "routing_entropy": entropy, "reasons": "; ".join(reasons) or "load within the thresholds"})
    return schemas.validate(schemas.HEALTH, pd.DataFrame(rows))
