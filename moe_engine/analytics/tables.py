"""Tidy pandas tables from a :class:`~moe_engine.analytics.recorder.RoutingRecorder`, each validated
with its schema in ``schemas.py``. One row per layer, per layer x expert, per assignment, per
expert pair, per group x expert; the metrics come from ``metrics.py``."""

from __future__ import annotations

import math
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
    share of its occurrences each expert processed (rows with no assignment are left out)."""
    frames = []
    for i in _layers(rec):
        d = rec.layer_data(i)
        if d.token_ids_T is None:
            raise ValueError("no token ids recorded: call the model with input_ids inside the recorder")
        vocab_V, group_T = torch.unique(d.token_ids_T, return_inverse=True)
        counts_VE, occ_V = M.group_counts(d.member_TE, group_T, len(vocab_V))
        v, e = torch.nonzero((counts_VE > 0) & (occ_V[:, None] >= min_count), as_tuple=True)
        frames.append(pd.DataFrame({
            "layer": i,
            "token_id": vocab_V[v].numpy(),
            "expert": e.numpy(),
            "count": counts_VE[v, e].long().numpy(),
            "occurrences": occ_V[v].long().numpy(),
            "share": (counts_VE[v, e] / occ_V[v]).numpy(),
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


def saturation_table(recorders: Sequence, checkpoints: Sequence[str]) -> pd.DataFrame:
    """OLMoE's router saturation of each checkpoint against the last one (metrics.router_saturation).
    The recorders must have seen the same tokens in the same order."""
    if len(recorders) != len(checkpoints) or not recorders:
        raise ValueError("give one checkpoint name per recorder, at least one")
    final, rows = recorders[-1], []
    for index, (rec, name) in enumerate(zip(recorders, checkpoints)):
        for i in _layers(final):
            d, f = rec.layer_data(i), final.layer_data(i)
            if d.num_tokens != f.num_tokens or d.num_experts != f.num_experts:
                raise ValueError(f"checkpoint {name!r} layer {i} saw other tokens or experts than the final one")
            rows.append({"checkpoint": str(name), "index": index, "layer": i,
                         "saturation": M.router_saturation(d.chosen_TE, f.chosen_TE, f.top_k).item()})
    return schemas.validate(schemas.SATURATION, pd.DataFrame(rows))
