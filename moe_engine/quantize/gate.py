"""The quality gate of a quantized model: its perplexity against the unquantized model's.

Perplexity is ``exp(mean sequence loss)`` from ``evaluation.evaluate.sequence_losses`` on the
prepared shards (next-token loss; span-corruption loss for Switch), the same numbers the evaluate
stage reports. The gate passes when ``ppl_quantized / ppl_original - 1 <= limit`` on every split;
otherwise :class:`QualityGateFailed` carries the table (``moe-lab`` exits 2, so ``dvc repro`` stops
at the stage and Prefect does not retry it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from moe_engine.errors import InputError, UserError


class QualityGateFailed(UserError):
    """The quantized model's perplexity rose past the allowed limit."""


@dataclass
class GateRow:
    split: str
    ppl_original: float
    ppl_quantized: float
    limit: float

    @property
    def increase(self) -> float:
        return self.ppl_quantized / self.ppl_original - 1.0

    @property
    def passed(self) -> bool:
        return math.isfinite(self.ppl_quantized) and self.increase <= self.limit

    def to_dict(self) -> dict:
        return {"ppl_original": self.ppl_original, "ppl_quantized": self.ppl_quantized,
                "increase": self.increase, "limit": self.limit, "passed": self.passed}


def available_splits(data_dir: Path, splits: list[str]) -> list[str]:
    from moe_engine.data.shards import read_manifest

    manifest = read_manifest(data_dir)
    have = [s for s in splits if manifest["splits"].get(s, {}).get("sequences", 0) > 0]
    if not have:
        raise InputError(f"{data_dir} has no sequences in the gate's splits {splits}; prepare data with val/ood splits "
                         "or set gate.splits")
    return have


def perplexities(model, data_dir: Path, splits: list[str], batch_size: int, max_sequences: int) -> dict[str, float]:
    from moe_engine.evaluation.evaluate import sequence_losses

    out = {}
    for split in splits:
        losses = sequence_losses(model, Path(data_dir), split, batch_size, max_sequences)
        out[split] = float(math.exp(float(losses.mean())))
    return out


def judge(original: dict[str, float], quantized: dict[str, float], limit: float) -> list[GateRow]:
    return [GateRow(s, original[s], quantized[s], limit) for s in original]


def table(rows: list[GateRow], what: str = "quantized") -> str:
    lines = [f"| split | ppl original | ppl {what} | increase | limit | |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.split} | {r.ppl_original:.4f} | {r.ppl_quantized:.4f} | {r.increase:+.3%} | "
                     f"{r.limit:+.3%} | {'pass' if r.passed else 'FAIL'} |")
    return "\n".join(lines)


def enforce(rows: list[GateRow], what: str, hint: str) -> None:
    if not all(r.passed for r in rows):
        raise QualityGateFailed(f"quality gate failed for the {what} model (perplexity vs the unquantized model):\n"
                                f"{table(rows, what)}\n{hint}")
