"""Typed settings of the quantize stage; fields equal the keys of params.yaml ``quantize:``.

    quantize:
      bits: 4                 # 8: int8 per output row (symmetric); 4: int4 in groups along the input (asymmetric)
      group_size: 32          # int4 only: input columns per scale and zero point
      attention: false        # also quantize the attention projections
      dense: false            # also quantize the other linears (shared experts, dense MLPs)
      calibration: {sequences: 8, split: train}
      gate: {int8_max_ppl_increase: 0.005, int4_max_ppl_increase: 0.03, max_sequences: 256}

Expert weights are always quantized: the stage fails if any stays in floating point. Routers,
embeddings, norms and the LM head are never quantized (they are small, and routing decisions and
logits are the most sensitive to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_engine.config import Config


@dataclass
class GateConfig(Config):
    """Perplexity of the quantized model on the val and ood shards vs the unquantized one."""

    section = "quantize.gate"
    enabled: bool = True
    # relative perplexity increase allowed (0.005 = +0.5%). llama.cpp's Q8_0 on Mixtral 8x7B costs about
    # nothing and Q4_K_M about +1.5%; the defaults leave room for a small model's larger sensitivity.
    int8_max_ppl_increase: float = 0.005
    int4_max_ppl_increase: float = 0.03
    splits: list[str] = field(default_factory=lambda: ["val", "ood"])
    batch_size: int = 16
    max_sequences: int = 256  # per split; 0 = all

    def check(self) -> None:
        self.require(0 <= self.int8_max_ppl_increase < 10, "int8_max_ppl_increase", "in [0, 10)")
        self.require(0 <= self.int4_max_ppl_increase < 10, "int4_max_ppl_increase", "in [0, 10)")
        self.require(bool(self.splits) and set(self.splits) <= {"train", "val", "ood"}, "splits",
                     "a non-empty list of train, val, ood")
        self.require(self.batch_size > 0, "batch_size", "> 0")
        self.require(self.max_sequences >= 0, "max_sequences", ">= 0 (0 = all)")

    def limit(self, bits: int) -> float:
        return self.int8_max_ppl_increase if bits == 8 else self.int4_max_ppl_increase


@dataclass
class CalibrationConfig(Config):
    """Tokens the per-expert output errors are measured on (the first sequences of a split)."""

    section = "quantize.calibration"
    sequences: int = 8
    split: str = "train"
    seed: int = 0  # random token ids when no --data is given

    def check(self) -> None:
        self.require(self.sequences > 0, "sequences", "> 0")
        self.require(self.split in ("train", "val", "ood"), "split", "train, val or ood")


@dataclass
class QuantizeConfig(Config):
    section = "quantize"
    bits: int = 8
    group_size: int = 32
    attention: bool = False
    dense: bool = False
    verify_reload: bool = True  # load the saved checkpoint back and require the same logits
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def check(self) -> None:
        self.require(self.bits in (4, 8), "bits", "4 or 8")
        # int4 values are packed two to a byte along the input, so a group holds an even count
        self.require(self.group_size >= 2 and self.group_size % 2 == 0, "group_size", "an even number >= 2")
