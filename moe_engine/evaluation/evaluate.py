"""Evaluate trained checkpoints on held-out shards.

For each model: mean token loss and perplexity on the in-domain validation split and on the
out-of-domain split, and the loss per domain (token-weighted). Given the MoE run and its dense
baseline, a comparison table at equal training FLOPs: both trained on the same tokens, and the
dense-active baseline has the MoE's active FLOPs per token, so equal steps are equal FLOPs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def stratified_indices(domain_ids_N: np.ndarray, cap: int) -> np.ndarray:
    """Indices of at most ``cap`` sequences taken evenly from every domain (round-robin over domains,
    first rows of each), sorted; all of them when ``cap`` is 0 or covers the split."""
    n = len(domain_ids_N)
    if cap <= 0 or cap >= n:
        return np.arange(n)
    by_domain = [np.flatnonzero(domain_ids_N == d) for d in np.unique(domain_ids_N)]
    picked, depth = [], 0
    while len(picked) < cap:
        for rows in by_domain:
            if depth < len(rows) and len(picked) < cap:
                picked.append(rows[depth])
        depth += 1
    return np.sort(np.array(picked, dtype=np.int64))


@torch.no_grad()
def sequence_losses(model, data_dir: Path, split: str, batch_size: int = 16, max_sequences: int = 0,
                    indices: np.ndarray | None = None) -> np.ndarray:
    """[N] mean next-token loss of each sequence of a split (``indices``, default all, in shard order).
    Encoder-decoder models (Switch) get their pretraining objective instead: the loss on the spans
    removed by T5 span corruption (15% of tokens, mean span 3), with the same seeded noise for every
    model compared. ``max_sequences`` keeps the first N of ``indices`` (use ``stratified_indices`` to
    cap without dropping domains)."""
    from moe_engine.data.loader import ShardDataset
    from moe_engine.data.span_corruption import SpanCorruption

    data = ShardDataset(data_dir, split=split, batch_size=batch_size, shuffle=False, epochs=1, drop_last=False)
    index_N = np.arange(data.num_sequences) if indices is None else np.asarray(indices)
    if max_sequences:
        index_N = index_N[:max_sequences]
    device = next(model.parameters()).device
    corrupt = SpanCorruption(data.seq_len) if model.config.is_encoder_decoder else None
    losses = []
    for i, start in enumerate(range(0, len(index_N), batch_size)):
        batch = torch.from_numpy(data.read(index_N[start:start + batch_size]))
        if corrupt is not None:
            inputs, targets = corrupt(batch, model.config.vocab_size, torch.Generator().manual_seed(i))
            inputs, targets = inputs.to(device), targets.to(device)
            decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=targets)  # teacher forcing, no loss
            logits = model(input_ids=inputs, decoder_input_ids=decoder_input_ids).logits.float()
        else:
            targets = batch[:, 1:].to(device)
            logits = model(input_ids=batch.to(device)).logits[:, :-1].float()
        loss_BT = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        losses.append(loss_BT.mean(1).cpu())
    return torch.cat(losses).numpy() if losses else np.zeros(0)


def load_model(model_dir: Path, expect_moe: bool | None = None):
    """A trained checkpoint: MoE ones with engine layers, dense ones as they are. ``expect_moe``
    refuses the wrong kind (a dense baseline passed as the MoE run would be labelled MoE)."""
    from transformers import AutoModelForCausalLM

    from moe_engine.errors import InputError
    from moe_engine.models.adapters import ADAPTERS, moe_layers
    from moe_engine.models.loading import load, read_config
    from moe_engine.models.io import check_weight_files

    model_dir = Path(model_dir)
    config = read_config(model_dir, "pass a `moe-lab pretrain --out` folder")
    if config.model_type in ADAPTERS:
        model = load(model_dir)
    else:
        check_weight_files(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    is_moe = bool(moe_layers(model))
    if expect_moe is not None and is_moe != expect_moe:
        what = "an MoE" if is_moe else f"a dense model ({config.model_type}, no MoE layers)"
        flag = "--dense" if is_moe else "--moe"
        raise InputError(f"{model_dir} holds {what}; it cannot be evaluated as the {'dense baseline' if expect_moe is False else 'MoE'} "
                         f"(pass it as {flag})")
    return model.eval()


def evaluate_model(model_dir: Path, data_dir: Path, batch_size: int = 16, max_sequences: int = 0,
                   expect_moe: bool | None = None) -> dict:
    from moe_engine.data.shards import read_manifest, sequence_domains

    manifest = read_manifest(data_dir)
    model = load_model(model_dir, expect_moe)
    result: dict = {"domains": {}}
    for split, key in (("val", "val"), ("ood", "ood")):
        if manifest["splits"].get(split, {}).get("sequences", 0) == 0:
            continue
        names, ids = sequence_domains(manifest, split)
        index_N = stratified_indices(ids, max_sequences)
        losses = sequence_losses(model, data_dir, split, batch_size, indices=index_N)
        ids = ids[index_N]
        result[f"{key}_loss"] = float(losses.mean())
        result[f"{key}_perplexity"] = float(math.exp(losses.mean()))
        result[f"{key}_sequences"] = int(len(losses))
        for i, name in enumerate(names):
            mask = ids == i
            if mask.any():
                result["domains"][name] = {"split": split, "loss": float(losses[mask].mean()), "sequences": int(mask.sum())}
    return result


def comparison_table(moe: dict, dense: dict, moe_train: dict, dense_train: dict) -> str:
    """Markdown: MoE vs dense baseline at equal training FLOPs."""
    rows = [("", "MoE", "dense baseline")]

    def fmt(x, spec="{:.4f}"):
        return spec.format(x) if isinstance(x, (int, float)) else "-"

    g = lambda m, section, key: (m.get(section) or {}).get(key)  # noqa: E731 - pretrain's nested metrics.json
    rows.append(("params total", fmt(g(moe_train, "size", "params_total"), "{:,}"), fmt(g(dense_train, "size", "params_total"), "{:,}")))
    rows.append(("params active / token", fmt(g(moe_train, "size", "params_active"), "{:,}"),
                 fmt(g(dense_train, "size", "params_active"), "{:,}")))
    rows.append(("training FLOPs", fmt(g(moe_train, "cost", "train_flops"), "{:.3e}"), fmt(g(dense_train, "cost", "train_flops"), "{:.3e}")))
    rows.append(("tokens trained", fmt(g(moe_train, "cost", "tokens_trained"), "{:,}"),
                 fmt(g(dense_train, "cost", "tokens_trained"), "{:,}")))
    rows.append(("training tokens/s", fmt(g(moe_train, "throughput", "tokens_per_s"), "{:,.0f}"),
                 fmt(g(dense_train, "throughput", "tokens_per_s"), "{:,.0f}")))
    for key in ("val_loss", "val_perplexity", "ood_loss", "ood_perplexity"):
        rows.append((key, fmt(moe.get(key)), fmt(dense.get(key))))
    for name in sorted(moe["domains"]):
        rows.append((f"loss: {name}", fmt(moe["domains"][name]["loss"]), fmt(dense.get("domains", {}).get(name, {}).get("loss"))))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|---|---:|---:|")
    return "\n".join(lines) + "\n"


def run(data_dir: Path, moe_dir: Path, out_dir: Path, dense_dir: Path | None = None, batch_size: int = 16,
        max_sequences: int = 0) -> dict:
    """Evaluate the MoE run (and its dense baseline) and write metrics.json, domain_loss.csv, compare.md."""
    out_dir = Path(out_dir)
    moe_train = _train_metrics(moe_dir)
    moe = evaluate_model(Path(moe_dir) / "model", data_dir, batch_size, max_sequences, expect_moe=True)
    metrics = {"moe": {k: v for k, v in moe.items() if k != "domains"}}
    csv = ["model,domain,split,loss"] + [f"moe,{d},{v['split']},{v['loss']:.6f}" for d, v in sorted(moe["domains"].items())]
    if dense_dir is not None:
        dense_train = _train_metrics(dense_dir)
        dense = evaluate_model(Path(dense_dir) / "model", data_dir, batch_size, max_sequences, expect_moe=False)
        metrics["dense"] = {k: v for k, v in dense.items() if k != "domains"}
        metrics["moe_minus_dense"] = {key: moe[f"{key}_loss"] - dense[f"{key}_loss"] for key in ("val", "ood")
                                      if f"{key}_loss" in moe and f"{key}_loss" in dense}
        csv += [f"dense,{d},{v['split']},{v['loss']:.6f}" for d, v in sorted(dense["domains"].items())]
        table = comparison_table(moe, dense, moe_train, dense_train)
    else:
        table = comparison_table(moe, {"domains": {}}, moe_train, {})
    from moe_engine.io import atomic_output

    with atomic_output(out_dir) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (tmp / "domain_loss.csv").write_text("\n".join(csv) + "\n")
        (tmp / "compare.md").write_text(table)
    return metrics


def _train_metrics(run_dir: Path) -> dict:
    from moe_engine.errors import InputError

    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        raise InputError(f"{path} is missing: is {run_dir} the --out directory of a finished `moe-lab pretrain`?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path} cannot be read as JSON ({exc}): re-run `moe-lab pretrain` for {run_dir}") from None
