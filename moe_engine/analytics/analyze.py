"""Offline analysis: run checkpoints over a dataset, write tables, PNG plots and an HTML report.

    result = analyze(["ckpt/step100", "ckpt/step400"], "data/demo", "out/analysis", tokenizer="tok/")

Checkpoints are given in training order; the last one is the reference of router saturation and the
one the per-layer tables describe. Outputs in ``out_dir``: ``report.html`` (self-contained: a health
verdict per layer first, then the tables and plots; report_page.py), ``load_heatmap.png``,
``coactivation.png``, ``domain_specialisation.png``, ``saturation.png`` (meaningful from two checkpoints on),
CSV tables (``saturation.csv`` with a numeric ``step`` for DVC plots) and ``metrics.json``: a short
nested summary of the last checkpoint, ``{"router": {"layers", "balanced", "imbalanced", "collapsed",
"load_imbalance_max", ...}}``, so ``dvc metrics show`` stays narrow (per-layer values are in
``layer_metrics.csv``; ``AnalysisResult.metrics``, logged to MLflow, keeps them all).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import pandas as pd
import torch

from moe_engine.analytics import plots, report_page, tables
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
    from moe_engine.models.loading import load

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
    plots.keep_cache_in(out.resolve().parent / ".cache" / "matplotlib")
    with atomic_output(out) as tmp:  # the previous analysis stays until this one is complete
        result = _write_outputs(recorders, names, dataset, cfg, tok, tmp)
    result.out_dir, result.report = out, out / result.report.name
    result.pngs = {k: out / v.name for k, v in result.pngs.items()}
    return result


def summary_metrics(layers: pd.DataFrame, health: pd.DataFrame) -> dict[str, float]:
    """The few numbers of an analysis worth comparing across experiments (``dvc metrics diff``)."""
    verdicts = health["verdict"].value_counts()
    return {
        "layers": int(len(layers)),
        **{v: int(verdicts.get(v, 0)) for v in ("balanced", "imbalanced", "collapsed")},
        "load_imbalance_max": float(layers["load_imbalance"].max()),
        "dead_expert_fraction_max": float(layers["dead_expert_fraction"].max()),
        "routing_entropy_mean": float(layers["routing_entropy"].mean()),
        "z_loss_mean": float(layers["z_loss"].mean()),
    }


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
    health = tables.health_table(result.tables["layer_metrics"])
    summary = summary_metrics(result.tables["layer_metrics"], health)
    result.metrics = {**final.metrics(), **{f"router/{k}": float(v) for k, v in summary.items()}}
    for name, table in result.tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    (out / "metrics.json").write_text(json.dumps({"router": summary}, indent=1))

    lt = result.tables["layer_metrics"]
    uniform = float(lt["top_k"].iloc[0] / lt["num_experts"].iloc[0])
    result.pngs = {
        "load_heatmap": plots.load_heatmap(experts, out / "load_heatmap.png"),
        "coactivation": plots.coactivation_heatmaps(result.tables["coactivation"], out / "coactivation.png"),
        "domain_specialisation": plots.specialisation_heatmaps(
            result.tables["domain_specialisation"], out / "domain_specialisation.png"
        ),
    }
    # always drawn (the DVC stage declares it): with one checkpoint it is that checkpoint against itself
    saturation_png = plots.saturation_curve(result.tables["saturation"], out / "saturation.png", baseline=uniform)
    if len(recorders) > 1:
        result.pngs["saturation"] = saturation_png
    meta = {
        "checkpoints (training order)": ", ".join(names),
        "domains (tokens)": ", ".join(f"{d} ({ids.numel():,})" for d, ids in dataset.items()),
        "settings": json.dumps(cfg.to_dict()),
    }
    report_page.write(result.report, result.tables, health, result.pngs, names, meta, cfg.min_token_count, tok)
    return result
