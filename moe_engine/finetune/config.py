"""Typed settings of fine-tuning; fields equal the keys of params.yaml ``finetune:``.

The optimisation and bookkeeping fields are the training loop's own (``LoopConfig``); the method
settings are nested sections (``lora:``, ``esft:``, ``task:``, ``eval:``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from moe_engine.config import Config
from moe_engine.training.config import LoopConfig

METHODS = ("lora", "esft", "full")


@dataclass
class TaskConfig(Config):
    """How records become training sequences."""

    max_length: int = 256  # tokens per sequence (prompt + response); longer responses are cut, longer prompts refused
    template: str = "auto"  # auto: the tokenizer's chat template if it has one, else "plain"; or "plain"
    test_fraction: float = 0.2  # held-out share when DATA is one file (a folder with train/test files keeps its split)
    max_records: int = 0  # use at most this many training records (0 = all)
    max_duplicate_share: float = 0.05  # validation: exact duplicate (prompt, response) pairs
    max_overlong_share: float = 0.05  # validation: prompts with no room for a response in max_length (dropped, counted)
    min_records: int = 8

    def check(self) -> None:
        self.require(self.max_length >= 8, "max_length", ">= 8")
        self.require(self.template in ("auto", "plain"), "template", "'auto' or 'plain'")
        self.require(0.0 < self.test_fraction < 1.0, "test_fraction", "in (0, 1)")
        self.require(self.max_records >= 0, "max_records", ">= 0")
        self.require(0.0 <= self.max_duplicate_share <= 1.0, "max_duplicate_share", "in [0, 1]")
        self.require(0.0 <= self.max_overlong_share <= 1.0, "max_overlong_share", "in [0, 1]")
        self.require(self.min_records >= 1, "min_records", ">= 1")


@dataclass
class LoraSettings(Config):
    """LoRA (Hu et al. 2021) through peft, on attention projections and on the fused experts."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # on every adapter's input; the engine applies it on experts too (peft's own path cannot)
    attention: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # module names
    experts: bool = True  # LoRA on every routed expert (target_parameters on fused [E, ...] weights)
    shared_experts: bool = False  # also on shared experts (Qwen2-MoE / DeepSeek-V3 dense MLPs every token takes)

    def check(self) -> None:
        self.require(self.r >= 1, "r", ">= 1")
        self.require(self.alpha > 0, "alpha", "> 0")
        self.require(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")


@dataclass
class EsftSettings(Config):
    """Expert-specialised fine-tuning (Wang et al. 2024, "Let the Expert Stick to His Last"): score
    every routed expert on the task data, keep per layer the best until their share of the layer's
    total score reaches ``threshold``, train only those; everything else stays bit-for-bit."""

    score: str = "gate"  # gate: average gate score | token: token selection ratio (ESFT-Gate / ESFT-Token)
    threshold: float = 0.5  # cumulative share of the layer's score to cover (the paper's p)
    score_records: int = 256  # training records scored
    train_shared_experts: bool = False
    train_non_experts: bool = False  # also attention, norms, embeddings

    def check(self) -> None:
        self.require(self.score in ("gate", "token"), "score", "'gate' or 'token'")
        self.require(0.0 < self.threshold <= 1.0, "threshold", "in (0, 1]")
        self.require(self.score_records >= 1, "score_records", ">= 1")


@dataclass
class FinetuneEvalConfig(Config):
    """Before/after evaluation."""

    test_records: int = 256  # held-out records for task loss and token accuracy (0 = all)
    generate_records: int = 32  # held-out records answered by greedy generation for exact match (0: none)
    max_new_tokens: int = 32
    retention_sequences: int = 128  # pretraining val/ood sequences for general-domain loss (0: skip)
    batch_size: int = 16

    def check(self) -> None:
        for key in ("test_records", "generate_records", "retention_sequences"):
            self.require(getattr(self, key) >= 0, key, ">= 0")
        self.require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1")
        self.require(self.batch_size >= 1, "batch_size", ">= 1")


@dataclass
class FinetuneConfig(LoopConfig):
    section: ClassVar[str] = "finetune"
    method: str = "lora"  # lora | esft | full
    train_router: bool = False  # the router is frozen (bitwise) unless this is set
    task: TaskConfig = field(default_factory=TaskConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    esft: EsftSettings = field(default_factory=EsftSettings)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    # fine-tuning defaults differ from pretraining's
    steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    save_every: int = 0

    def check(self) -> None:
        super().check()
        self.require(self.method in METHODS, "method", f"one of {', '.join(METHODS)}")
