"""Training objectives: how a batch from the loader becomes model inputs with labels.

The loop asks the objective for ``inputs(model, batch, noise_key)`` and backpropagates the model's
own ``.loss`` (transformers' shifted cross-entropy with ``-100`` ignored); the MoE layers' aux
losses ride on their outputs (``moe.losses.AttachAuxLoss``), so every objective trains router
balance too. ``noise_key`` is (seed, step, micro-batch, rank): objectives that draw noise seed it
from the key, so a resumed run replays the same noise.

- :class:`NextToken`: decoder-only pretraining on token shards (``batch`` is ``[B, L]`` ids).
- :class:`SpanCorruptionObjective`: T5 span corruption for encoder-decoder models (Switch).
- :class:`SupervisedObjective`: supervised fine-tuning on (prompt, response) records; the loss is on
  response tokens only (``batch`` is a dict with ``input_ids``, ``attention_mask``, ``labels``
  whose prompt and padding positions are -100).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100  # transformers' ignore index for labels


class Objective:
    name = "objective"

    def inputs(self, model, batch: Any, noise_key: tuple[int, ...]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tokens(self, batch: Any) -> int:
        """Tokens the model reads for this batch (throughput)."""
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        return int(ids.numel())


class NextToken(Objective):
    name = "next_token"

    def inputs(self, model, batch_BL, noise_key):
        return {"input_ids": batch_BL, "labels": batch_BL}


@dataclass
class SpanCorruptionObjective(Objective):
    """Input = the sequence with noise spans replaced by sentinels; labels = the spans (T5)."""

    corruption: Any  # moe_engine.data.span_corruption.SpanCorruption
    name = "span_corruption"

    def inputs(self, model, batch_BL, noise_key):
        generator = torch.Generator().manual_seed(hash(noise_key) & (2**63 - 1))  # ints hash the same in every process
        input_ids, labels = self.corruption(batch_BL.cpu(), model.config.vocab_size, generator)
        return {"input_ids": input_ids.to(batch_BL.device), "labels": labels.to(batch_BL.device)}


class SupervisedObjective(Objective):
    """Loss on response tokens only: the batch already carries labels with prompts masked."""

    name = "sft"

    def inputs(self, model, batch, noise_key):
        if model.config.is_encoder_decoder:
            raise ValueError("supervised fine-tuning of encoder-decoder models uses the seq2seq batch layout")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}

    def tokens(self, batch):
        return int(batch["attention_mask"].sum())


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)
