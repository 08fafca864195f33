"""Offline analysis: run checkpoints over a dataset, write tables, PNG plots and an HTML report.

    result = analyze(["ckpt/step100", "ckpt/step400"], "data/demo", "out/analysis", tokenizer="tok/")

Checkpoints are given in training order; the last one is the reference of router saturation and the
one the per-layer tables describe. Outputs in ``out_dir``: ``report.html`` (self-contained),
``load_heatmap.png``, ``coactivation.png``, ``domain_specialisation.png``, ``saturation.png`` (two or
more checkpoints), CSV tables and ``metrics.json`` (flat router/layer{i}/{metric} of the last
checkpoint, for DVC metrics).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import pandas as pd
import torch

from moe_engine.analytics import plots, report, tables
from moe_engine.analytics.data import AnalyticsError, load_dataset, load_tokenizer
from moe_engine.analytics.recorder import RoutingRecorder
from moe_engine.config import Config
from moe_engine.io import atomic_output


@dataclass
class AnalyzeConfig(Config):
    """Settings of ``moe-lab analyze``; fields equal the keys of a params.yaml ``analyze:`` section."""

    section: ClassVar[str] = "analyze"
    seq_len: int = 128  # rows of text input (a shards directory keeps its own sequence length)
    batch_size: int = 8
    max_tokens: int = 16_384  # per domain
    max_bytes: int = 200_000  # read per text file
    min_token_count: int = 8  # token specialisation: ignore rarer token ids
    device: str = "cpu"

    def check(self) -> None:
        for key in ("seq_len", "batch_size", "max_tokens", "max_bytes", "min_token_count"):
            self.require(getattr(self, key) > 0, key, "> 0")


@dataclass
class AnalysisResult:
    out_dir: Path
    report: Path
    pngs: dict[str, Path] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def _vocab_size(model) -> int:
    return model.get_input_embeddings().num_embeddings


@torch.no_grad()
def record(model, dataset: dict[str, torch.Tensor], batch_size: int = 8, device: str = "cpu") -> RoutingRecorder:
    """Run ``model`` over ``{domain: ids_NS}`` in eval mode, one domain per batch, recording routing."""
    model = model.to(device).eval()
    top = max(int(ids.max()) for ids in dataset.values())
    if top >= _vocab_size(model):
        raise AnalyticsError(
            f"token id {top} >= the model's vocabulary ({_vocab_size(model)}): the tokenizer does not match the model"
        )
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    # Routing is all we need: skip the LM head's [T, vocab] logits where the model allows it.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    rec = RoutingRecorder(model)
    with rec:
        for domain, ids_NS in dataset.items():
            rec.label(domain=domain)
            for start in range(0, ids_NS.shape[0], batch_size):
                ids = ids_NS[start : start + batch_size].to(device)
                model(input_ids=ids, decoder_input_ids=ids) if seq2seq else model(input_ids=ids, **extra)
    rec.close()  # keep the records, not the weights
    return rec


def _checkpoint_names(paths: Sequence[Path]) -> list[str]:
    names = [p.name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def analyze(
    checkpoints: Sequence[str | Path],
    data: str | Path,
    out_dir: str | Path,
    tokenizer: str | Path | None = None,
    config: AnalyzeConfig | None = None,
) -> AnalysisResult:
    from moe_engine.models.build import load

    cfg = config or AnalyzeConfig()
    paths = [Path(c) for c in checkpoints]
    if not paths:
        raise AnalyticsError("give at least one checkpoint directory")
    for p in paths:  # fail before reading any data
        if not (p / "config.json").is_file():
            raise AnalyticsError(f"{p} is not a model directory (no config.json); pass folders written by save_pretrained")
    if tokenizer is None and (Path(data) / "manifest.json").is_file() and (Path(data) / "tokenizer").is_dir():
        tokenizer = Path(data) / "tokenizer"  # a shards directory carries its tokenizer: decode the token tables
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    dataset = load_dataset(data, tok, seq_len=cfg.seq_len, max_tokens=cfg.max_tokens, max_bytes=cfg.max_bytes)
    names = _checkpoint_names(paths)
    recorders = [record(load(p), dataset, cfg.batch_size, cfg.device) for p in paths]
    out = Path(out_dir)
    with atomic_output(out) as tmp:  # the previous analysis stays until this one is complete
        result = _write_outputs(recorders, names, dataset, cfg, tok, tmp)
    result.out_dir, result.report = out, out / result.report.name
    result.pngs = {k: out / v.name for k, v in result.pngs.items()}
    return result


def _write_outputs(recorders, names, dataset, cfg, tok, out: Path) -> AnalysisResult:
    final = recorders[-1]
    experts = pd.concat([r.expert_table().assign(checkpoint=n) for r, n in zip(recorders, names)], ignore_index=True)
    result = AnalysisResult(out, out / "report.html")
    result.tables = {
        "layer_metrics": final.layer_table(),
        "expert_load": experts,
        "coactivation": final.coactivation_table(),
        "domain_specialisation": final.specialisation_table("domain"),
        "consistency": final.consistency_table(),
        "token_specialisation": final.token_table(min_count=cfg.min_token_count),
        "saturation": tables.saturation_table(recorders, names),
    }
    result.metrics = final.metrics()
    for name, table in result.tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=1, sort_keys=True))

    lt = result.tables["layer_metrics"]
    uniform = float(lt["top_k"].iloc[0] / lt["num_experts"].iloc[0])
    result.pngs = {
        "load_heatmap": plots.load_heatmap(experts, out / "load_heatmap.png"),
        "coactivation": plots.coactivation_heatmaps(result.tables["coactivation"], out / "coactivation.png"),
        "domain_specialisation": plots.specialisation_heatmaps(
            result.tables["domain_specialisation"], out / "domain_specialisation.png"
        ),
    }
    if len(recorders) > 1:
        result.pngs["saturation"] = plots.saturation_curve(result.tables["saturation"], out / "saturation.png", baseline=uniform)
    _write_report(result, names, dataset, cfg, tok)
    return result


def top_tokens(token_table: pd.DataFrame, tokenizer=None, n: int = 6) -> pd.DataFrame:
    """Per layer and expert, the ``n`` token ids it processes the largest share of (OLMoE's
    vocabulary specialisation), decoded when a tokenizer is given."""
    def show(i: int) -> str:
        return repr(tokenizer.decode([i])) if tokenizer is not None else str(i)

    ranked = token_table.sort_values(["share", "occurrences"], ascending=False).groupby(["layer", "expert"]).head(n)
    rows = [
        {
            "layer": layer,
            "expert": expert,
            "tokens (share of their occurrences)": ", ".join(f"{show(t)} {s:.0%}" for t, s in zip(g["token_id"], g["share"])),
        }
        for (layer, expert), g in ranked.groupby(["layer", "expert"])
    ]
    return pd.DataFrame(rows)


def _write_report(result: AnalysisResult, names: list[str], dataset: dict[str, torch.Tensor], cfg: AnalyzeConfig, tok) -> None:
    t = result.tables
    spec = t["domain_specialisation"]
    top = spec.sort_values("ratio", ascending=False).groupby("group").head(1).sort_values("group")
    blocks: list = [
        ("h2", "Per-layer routing metrics (last checkpoint)"),
        ("p", "load_imbalance = max/mean tokens per expert (1 is balanced); dead_expert_fraction = experts with no "
              "token; routing_entropy is normalised by log E; balance_loss is the unscaled Switch loss (K when balanced); "
              "consistency_next is the normalised mutual information of a token's primary expert with the next layer."),
        ("table", t["layer_metrics"]),
        ("h2", "Expert load across checkpoints"),
        ("img", result.pngs["load_heatmap"]),
        ("h2", "Domain specialisation (OLMoE, Muennighoff et al. 2024)"),
        ("p", f"Share of each domain's tokens routed to each expert; an unspecialised router gives K/E = "
              f"{spec['uniform'].iloc[0]:.3f} everywhere. Most over-used expert per domain below (ratio = share / uniform)."),
        ("img", result.pngs["domain_specialisation"]),
        ("table", top[["group", "layer", "expert", "share", "ratio"]]),
        ("h2", "Token specialisation (last checkpoint)"),
        ("p", f"Tokens seen at least {cfg.min_token_count} times that each expert processes most often."),
        ("table", top_tokens(t["token_specialisation"], tok)),
        ("h2", "Expert co-activation (last checkpoint)"),
        ("img", result.pngs["coactivation"]),
        ("h2", "Router saturation against the final checkpoint"),
    ]
    if "saturation" in result.pngs:
        blocks += [("img", result.pngs["saturation"]), ("table", t["saturation"])]
    else:
        blocks.append(("p", "One checkpoint given: saturation needs two or more."))
    if len(t["consistency"]):
        blocks += [("h2", "Cross-layer routing consistency"), ("table", t["consistency"])]
    meta = {
        "checkpoints (training order)": ", ".join(names),
        "domains (tokens)": ", ".join(f"{d} ({ids.numel()})" for d, ids in dataset.items()),
        "settings": json.dumps(cfg.to_dict()),
    }
    report.write_report(result.report, "Router analytics", meta, blocks)
