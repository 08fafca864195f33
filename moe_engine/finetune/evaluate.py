"""Before/after measurements of a fine-tune: task loss and token accuracy on held-out records, exact
match of greedy answers, general-domain retention (loss on the pretraining val/ood shards), and
router drift (the share of tokens whose top-k expert set changed against the base model, per layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_engine.finetune.data import IGNORE, TaskEncoder, collate
from moe_engine.models.adapters import moe_layers


def _batches(encoded, pad_id, batch_size):
    for i in range(0, len(encoded), batch_size):
        yield collate(encoded[i:i + batch_size], pad_id)


@torch.no_grad()
def task_scores(model, encoded, pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Token-weighted loss on response tokens and the share of them predicted exactly (teacher forced)."""
    device = next(model.parameters()).device
    total_loss, total_right, total = 0.0, 0, 0
    for batch in _batches(encoded, pad_id, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
        total_loss += float(losses[keep].sum())
        total_right += int((logits.argmax(-1) == targets)[keep].sum())
        total += int(keep.sum())
    return {"task_loss": total_loss / max(total, 1), "task_token_accuracy": total_right / max(total, 1), "task_tokens": total}


def _normal(text: str) -> str:
    return " ".join(text.strip().lower().split())


@torch.no_grad()
def exact_match(model, encoder: TaskEncoder, records: list[dict], max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers to held-out prompts, compared with the reference after whitespace/case normalisation."""
    device = next(model.parameters()).device
    hits, examples = 0, []
    for record in records:
        ids = torch.tensor([encoder.prompt_ids(record["prompt"])], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=encoder.eos_id, pad_token_id=encoder.pad_id)
        answer = encoder.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        hit = _normal(answer) == _normal(record["response"])
        hits += hit
        if len(examples) < 3:
            examples.append({"prompt": record["prompt"][:200], "reference": record["response"][:200], "answer": answer[:200]})
    return {"exact_match": hits / max(len(records), 1), "answered": len(records), "examples": examples}


@torch.no_grad()
def router_choices(model, encoded, pad_id: int, batch_size: int = 16) -> dict[str, np.ndarray]:
    """{layer: [tokens, K] sorted top-k expert ids} over the non-padding tokens of ``encoded``; layers are
    named as in the bare model (a peft wrapper's ``base_model.model.`` prefix removed), so a LoRA model's
    choices compare with its base model's."""
    names = {m: n.removeprefix("base_model.model.") for n, m in model.named_modules() if m in set(moe_layers(model))}
    chosen: dict[str, list[np.ndarray]] = {n: [] for n in names.values()}

    def hook(layer, routing, counts):
        if not routing.token_major:
            return
        idx = routing.topk_idx_TK().sort(dim=-1).values
        mask = layer.padding_mask_BS
        keep = mask.reshape(-1).bool() if mask is not None and mask.numel() == idx.shape[0] else torch.ones(idx.shape[0], dtype=torch.bool)
        chosen[names[layer]].append(idx[keep.to(idx.device)].cpu().numpy())

    handles = [layer.register_routing_hook(hook) for layer in names]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in _batches(encoded, pad_id, batch_size):
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {n: np.concatenate(v) if v else np.zeros((0, 1), dtype=np.int64) for n, v in chosen.items()}


def router_drift(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict[str, float]:
    """Per layer, the share of tokens whose top-k set differs between the two models."""
    if set(before) != set(after):
        raise ValueError(f"router choices of other layers: {sorted(before)} vs {sorted(after)}")
    return {layer: float((before[layer] != after[layer]).any(axis=1).mean()) if len(before[layer]) else 0.0
            for layer in before}


def retention(model, data_dir: Path | None, sequences: int, batch_size: int) -> dict[str, float]:
    """Mean loss on the pretraining corpus' held-out val and out-of-domain shards (domain-stratified cap)."""
    if data_dir is None or sequences <= 0:
        return {}
    from moe_engine.data.shards import read_manifest, sequence_domains
    from moe_engine.evaluation.evaluate import sequence_losses, stratified_indices

    manifest = read_manifest(data_dir)
    out = {}
    for split in ("val", "ood"):
        if manifest["splits"].get(split, {}).get("sequences", 0) == 0:
            continue
        _, ids = sequence_domains(manifest, split)
        losses = sequence_losses(model, Path(data_dir), split, batch_size, indices=stratified_indices(ids, sequences))
        out[f"{split}_loss"] = float(losses.mean())
    return out


def measure(model, encoder: TaskEncoder, test_records: list[dict], test_encoded, cfg, retention_data: Path | None) -> dict:
    """Every before/after number of one model."""
    was_training = model.training
    model.eval()
    try:
        result = task_scores(model, test_encoded, encoder.pad_id, cfg.batch_size)
        if cfg.generate_records:
            em = exact_match(model, encoder, test_records[: cfg.generate_records], cfg.max_new_tokens)
            result["exact_match"], result["answers"] = em["exact_match"], em["examples"]
        result.update(retention(model, retention_data, cfg.retention_sequences, cfg.batch_size))
    finally:
        model.train(was_training)
    return result
