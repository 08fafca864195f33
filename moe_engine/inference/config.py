"""Typed settings of generation and expert offloading (a ``generate:`` params section, or the
flags of ``moe-lab generate``; both go through the one config system, so errors name the key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moe_engine.config import Config


@dataclass
class OffloadConfig(Config):
    """Experts kept off the device, with a per-layer device cache (``offload.py``)."""

    section = "generate.offload"

    enabled: bool = False  # False: every expert stays on the device (the settings below are ignored)
    resident: float = 0.5  # fraction of each layer's experts the device cache holds (0: load every use)
    store: Literal["pinned", "disk"] = "pinned"  # where every expert lives: pinned RAM, or the model's safetensors (mmap)
    policy: Literal["lru", "stats"] = "lru"  # eviction: least recently used, or lowest routing frequency
    stats: str | None = None  # policy "stats": tokens_per_expert.json (pretrain) or expert_load.csv (analyze); None: counted online
    # apply the next layer's router to this layer's input and load its likely experts early. Off by default:
    # on one H200 (benchmarks/results/decode_h200_run2.json) the guesses were 49-61% right on random-weight
    # models, copies are bound by the 55 GB/s host link, and a wrong guess costs a whole expert's copy
    prefetch: bool = False
    low_precision_bits: int = 0  # 8 or 4: on a miss, copy a quantized version instead (HOBBIT); 0: off (exact)
    low_precision_below: float = 1.0  # ...only for assignments whose routing weight is below this

    def check(self) -> None:
        self.require(0.0 <= self.resident <= 1.0, "resident", "in [0, 1]")
        self.require(self.low_precision_bits in (0, 4, 8), "low_precision_bits", "0 (off), 4 or 8")
        self.require(self.low_precision_below > 0.0, "low_precision_below", "> 0")


@dataclass
class GenerateConfig(Config):
    """How ``me.generate`` / ``moe-lab generate`` decodes."""

    section = "generate"

    max_new_tokens: int = 64
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int | None = None
    stop_at_eos: bool = True
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on a GPU, float32 on a CPU
    cache: Literal["dynamic", "static"] = "dynamic"  # the KV cache of transformers' generate
    compile: bool = False  # static cache + torch.compile of the decode step (transformers' generate, GPU)
    cuda_graphs: bool = False  # static cache + the engine's decode loop, one step captured as a CUDA graph (GPU)
    experts_mode: Literal["auto", "grouped", "gathered"] = "auto"  # see MoELayer.experts_mode
    fused_norms: bool = False  # the model's RMSNorms on torch's fused F.rms_norm (models/norms.py; GPU, not with compile)
    offload: OffloadConfig = field(default_factory=OffloadConfig)

    def check(self) -> None:
        self.require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1")
        self.require(self.temperature > 0.0, "temperature", "> 0")
        self.require(self.top_k >= 0, "top_k", ">= 0 (0 turns it off)")
        self.require(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]")
        self.require(not (self.compile and self.cuda_graphs), "compile", "false when cuda_graphs is true (choose one)")
        if self.offload.enabled:
            self.require(not self.compile, "compile", "false with offload (expert loading needs host synchronisation)")
            self.require(not self.cuda_graphs, "cuda_graphs", "false with offload (expert loading needs host synchronisation)")
