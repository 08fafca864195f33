"""The router report's content: what ``analyze`` puts on report.html, top to bottom.

Summary first (a health verdict per layer with the rule that gave it, the run and the commit), then
per-layer metrics in two narrow tables, the plots, domain and token specialisation and saturation.
Shares and rates are in % everywhere (tables, cells, colourbars); the load imbalance and lift are
ratios (x), entropy, diversity and consistency indices in [0, 1]. The CSV files keep fractions.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from moe_engine.analytics import tables as T
from moe_engine.analytics.report import Table, percent, run_meta, write_report


def ratio(value) -> str:
    return "–" if value != value else f"{float(value):.2f}x"


def _fixed(value) -> str:
    return "–" if value != value else f"{float(value):.3f}"


def _summary(health: pd.DataFrame, reference: str) -> list:
    counts = health["verdict"].value_counts()
    verdict = ", ".join(f"{int(counts.get(v, 0))} {v}" for v in ("balanced", "imbalanced", "collapsed"))
    rules = (f"Rules, checked in order: collapsed when a layer has >= {T.COLLAPSED_DEAD:.0%} dead experts or its load "
             f"imbalance has gone >= {T.COLLAPSED_LOAD:.0%} of the way from 1 (balanced) to its ceiling E / K (every token "
             f"on the same K experts); imbalanced when any expert is dead or the imbalance (max / mean tokens per expert) "
             f"is >= {T.IMBALANCED_LOAD}; else balanced. A routing entropy >= {T.UNDECIDED_ENTROPY} of log E is noted: the "
             f"router's probabilities are near uniform, so its choices barely depend on the token (normal at "
             f"initialisation, a warning late in training). These are this project's rules of thumb.")
    table = Table(health.rename(columns={"imbalance_of_ceiling": "of ceiling", "dead_expert_fraction": "dead experts"}),
                  {"load_imbalance": ratio, "of ceiling": percent, "dead experts": percent, "routing_entropy": _fixed})
    return [("h2", "Summary"), ("p", f"Router health of {reference} (the last checkpoint), {len(health)} layer(s): {verdict}."),
            ("table", table), ("p", rules)]


def _layer_tables(lt: pd.DataFrame) -> list:
    load = lt[["layer", "name", "num_experts", "top_k", "tokens", "assignments", "load_imbalance", "load_cv",
               "dead_expert_fraction", "load_diversity", "drop_rate"]]
    router = lt[["layer", "routing_entropy", "top1_prob", "top1_margin", "balance_loss", "z_loss", "consistency_next"]]
    return [
        ("h2", "Per-layer routing metrics (last checkpoint)"),
        ("p", "Load: load_imbalance = max / mean tokens per expert (1x is balanced, E / K the ceiling); load_cv = std / "
              "mean of the loads; dead_expert_fraction = experts with no token; load_diversity = entropy of the load "
              "shares / log E (1 = even); drop_rate = assignments dropped over capacity."),
        ("table", Table(load, {"load_imbalance": ratio, "load_cv": _fixed, "dead_expert_fraction": percent,
                               "load_diversity": _fixed, "drop_rate": percent})),
        ("p", "Router: routing_entropy = mean per-token entropy of the router probabilities / log E (1 = uniform); "
              "top1_prob and top1_margin = mean top-1 probability and its lead over the second; balance_loss = the "
              "unscaled Switch loss (K when balanced); z_loss = mean logsumexp(logits)^2; consistency_next = normalised "
              "mutual information of a token's primary expert with the next layer's (0 independent, 1 determined)."),
        ("table", Table(router, {"routing_entropy": _fixed, "top1_prob": percent, "top1_margin": percent,
                                 "balance_loss": _fixed, "z_loss": _fixed, "consistency_next": _fixed})),
    ]


def top_tokens(token_table: pd.DataFrame, tokenizer=None, n: int = 6) -> pd.DataFrame:
    """Per layer and expert, the ``n`` token ids with the highest lift (``tables.token_table``), ties
    broken by how often the token occurred, decoded when a tokenizer is given."""
    def show(i: int) -> str:
        return repr(tokenizer.decode([i])) if tokenizer is not None else str(i)

    ranked = token_table.sort_values(["lift", "occurrences"], ascending=False).groupby(["layer", "expert"]).head(n)
    rows = [
        {
            "layer": layer,
            "expert": expert,
            "expert's share of all tokens": float(g["expert_share"].iloc[0]),
            "tokens by lift (lift, % of the token's occurrences, occurrences)": ", ".join(
                f"{show(t)} {lift:.1f}x ({share:.0%} of {occ})"
                for t, lift, share, occ in zip(g["token_id"], g["lift"], g["share"], g["occurrences"])),
        }
        for (layer, expert), g in ranked.groupby(["layer", "expert"])
    ]
    return pd.DataFrame(rows)


def _token_block(token_table: pd.DataFrame, tokenizer, min_token_count: int) -> tuple:
    if token_table.empty:
        return ("p", f"No token occurred {min_token_count} times or more in the analysed data: nothing to rank "
                     f"(lower analyze.min_token_count or analyse more tokens).")
    return ("table", Table(top_tokens(token_table, tokenizer), {"expert's share of all tokens": percent}))


def _saturation(sat: pd.DataFrame, pngs: dict) -> list:
    blocks: list = [("h2", "Router saturation against the final checkpoint")]
    if "saturation" not in pngs:
        return blocks + [("p", "One checkpoint given: saturation needs two or more.")]
    wide = sat.pivot_table(index=["index", "checkpoint", "step"], columns="layer", values="saturation").reset_index()
    wide.columns = [c if isinstance(c, str) else f"layer {c}" for c in wide.columns]
    layer_cols = [c for c in wide.columns if c.startswith("layer ")]
    wide.insert(3, "mean", wide[layer_cols].mean(axis=1))
    chance = float(sat["chance"].mean())
    return blocks + [
        ("p", f"Share of each token's top-k experts that the final router also picks (OLMoE, Muennighoff et al. 2024); "
              f"two independent uniform routers agree on K / E = {chance:.0%}."),
        ("img", pngs["saturation"]),
        ("table", Table(wide.drop(columns="index"), {c: percent for c in ["mean", *layer_cols]})),
    ]


def write(path: Path, t: dict[str, pd.DataFrame], health: pd.DataFrame, pngs: dict[str, Path], names: list[str],
          meta: dict[str, str], min_token_count: int, tokenizer=None) -> Path:
    spec = t["domain_specialisation"]
    top = spec.sort_values("ratio", ascending=False).groupby("group").head(1).sort_values("group")
    uniform = float(spec["uniform"].iloc[0])
    blocks: list = [
        *_summary(health, names[-1]),
        *_layer_tables(t["layer_metrics"]),
        ("h2", "Expert load across checkpoints"),
        ("p", "Each expert's load as a multiple of its fair share (1 = balanced), per layer, one panel per checkpoint."),
        ("img", pngs["load_heatmap"]),
        ("h2", "Domain specialisation (OLMoE, Muennighoff et al. 2024)"),
        ("p", f"% of each domain's tokens routed to each expert; an unspecialised router gives K / E = {uniform:.0%} "
              f"everywhere. Below, the most over-used expert per domain (ratio = share / (K / E))."),
        ("img", pngs["domain_specialisation"]),
        ("table", Table(top[["group", "layer", "expert", "share", "ratio"]], {"share": percent, "ratio": ratio})),
        ("h2", "Token specialisation (last checkpoint)"),
        ("p", f"For tokens seen at least {min_token_count} times: lift = (% of the token's occurrences this expert "
              f"processed) / (% of all tokens this expert processed). 1x means the expert takes the token no more often "
              f"than any other token; the ceiling is 1 / the expert's share. Ranked by lift, ties by frequency; a "
              f"100% share at a busy expert is little evidence, the same share at a quiet one is."),
        _token_block(t["token_specialisation"], tokenizer, min_token_count),
        ("h2", "Expert co-activation (last checkpoint)"),
        ("p", "Row i, column j: % of expert i's tokens that expert j processed too."),
        ("img", pngs["coactivation"]),
        *_saturation(t["saturation"], pngs),
    ]
    if len(t["consistency"]):
        blocks += [("h2", "Cross-layer routing consistency"),
                   ("table", Table(t["consistency"], {"consistency": _fixed}))]
    return write_report(path, "Router analytics", {**run_meta(), **meta}, blocks)
