"""Typed settings of the evaluate stage; fields equal the keys of params.yaml ``evaluate:``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe_engine.config import Config


@dataclass
class EvaluateConfig(Config):
    section: ClassVar[str] = "evaluate"
    batch_size: int = 16
    # at most this many sequences per split, taken evenly from every domain (0 = all): a cap never
    # drops a domain, whatever order the split is stored in
    max_sequences: int = 0

    def check(self) -> None:
        self.require(self.batch_size > 0, "batch_size", "> 0")
        self.require(self.max_sequences >= 0, "max_sequences", ">= 0 (0 = every sequence)")
