"""Typed configuration of training; fields equal the keys of params.yaml ``pretrain:`` (and of the
fine-tuning section, which shares :class:`LoopConfig`).

Nested settings are typed too: ``router:`` holds :class:`RouterSettings` (every
:class:`~moe_engine.moe.router.RouterConfig` field, None = keep the architecture's default) and
``router_monitor:`` the analytics monitor's thresholds. Everything is checked by
``PretrainConfig.from_dict`` before any model, data or DeepSpeed work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from moe_engine.analytics.online import MonitorConfig
from moe_engine.config import Config, optional_fields
from moe_engine.moe.router import RouterConfig
from moe_engine.training.master_adamw import BF16_MOMENT_MAX_BETA

RouterSettings = optional_fields(
    RouterConfig, "RouterSettings",
    "Router overrides for every MoE layer (fields of RouterConfig); None keeps what the architecture's config says.",
)


@dataclass
class LoopConfig(Config):
    """The training loop's own settings: optimisation, parallelism, bookkeeping, tracking."""

    # optimisation
    steps: int = 300
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    fused_adamw: bool = True  # torch's fused AdamW kernel on GPU (one pass over the fp32 master weights); CPU runs the foreach one
    moment_dtype: str = "float32"  # float32 | bf16: AdamW's two moments stored in bf16 (as DeepSeek-V3); bf16 training at zero_stage 0
    seed: int = 0
    # parallelism and precision
    zero_stage: int = 0  # 0, 1 or 2 (ZeRO-3 is refused by DeepSpeed's MoE support)
    ep_size: int = 1  # expert-parallel ranks; must divide the world size and the expert count
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    cuda_graphs: bool = False  # replay each MoE layer's forward and backward from a CUDA graph (GPU, ep_size 1, same bits)
    fused_norms: bool = True  # the model's RMSNorms on torch's fused F.rms_norm on GPU (models/norms.py); CPU runs transformers' own
    # bookkeeping
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    eval_batches: int = 8  # validation batches per evaluation (0: none)
    eval_every: int = 0  # also validate every N steps (val/loss curve in MLflow); 0: only at the end
    profile_steps: list[int] = field(default_factory=list)  # [first, last] optimizer steps under torch.profiler -> out_dir/profile/
    # tracking and cost
    mlflow_tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI or no MLflow run; e.g. sqlite:///mlflow/mlflow.db
    experiment: str = "moe-lab"
    gpu_hour_usd: float = 2.5  # $ per GPU-hour, for cost per million tokens
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look up the GPU (H100/H200/A100), none on CPU

    # Settings a resumed run may change (see checkpoint.check_resumable): the schedule's length and
    # shape, the peak lr (applied from the resume step on), and bookkeeping. Anything else would
    # silently mix two runs, so a resume with it changed is refused.
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({
        "steps", "lr", "min_lr_ratio", "warmup_steps", "log_every", "save_every", "keep_checkpoints",
        "eval_batches", "eval_every", "profile_steps", "mlflow_tracking_uri", "experiment", "gpu_hour_usd",
        "peak_tflops", "snapshot_every", "fused_adamw", "cuda_graphs", "fused_norms",
    })

    def check(self) -> None:
        self.require(self.steps > 0, "steps", "> 0")
        self.require(self.micro_batch_size > 0, "micro_batch_size", "> 0")
        self.require(self.grad_accum > 0, "grad_accum", "> 0")
        self.require(self.lr > 0, "lr", "> 0")
        self.require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "in [0, 1]")
        self.require(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        self.require(self.weight_decay >= 0, "weight_decay", ">= 0")
        self.require(0.0 <= self.beta1 < 1.0, "beta1", "in [0, 1)")
        self.require(0.0 <= self.beta2 < 1.0, "beta2", "in [0, 1)")
        self.require(self.grad_clip >= 0, "grad_clip", ">= 0 (0 turns clipping off)")
        self.require(self.zero_stage in (0, 1, 2), "zero_stage", "0, 1 or 2 (DeepSpeed refuses ZeRO-3 with MoE)")
        self.require(self.ep_size >= 1, "ep_size", ">= 1")
        self.require(self.precision in ("auto", "bf16", "fp32"), "precision", "auto, bf16 or fp32")
        self.require(self.moment_dtype in ("float32", "bf16"), "moment_dtype", "float32 or bf16")
        self.require(self.moment_dtype == "float32" or (self.zero_stage == 0 and self.precision != "fp32"), "moment_dtype",
                     "float32 unless training in bf16 at zero_stage 0 (the engine's master-weight AdamW stores bf16 "
                     "moments; DeepSpeed's ZeRO optimizers keep float32 ones)")
        self.require(self.moment_dtype == "float32" or max(self.beta1, self.beta2) <= BF16_MOMENT_MAX_BETA, "moment_dtype",
                     f"float32 with beta1 {self.beta1} and beta2 {self.beta2}: a bf16 moment cannot decay by less than "
                     f"1/256 of itself (beta2 0.999 would freeze exp_avg_sq); use betas <= {BF16_MOMENT_MAX_BETA} "
                     "(DeepSeek-V3 trained with 0.9, 0.95)")
        for key in ("log_every", "save_every", "keep_checkpoints", "eval_batches", "eval_every"):
            self.require(getattr(self, key) >= 0, key, ">= 0")
        self.require(self.log_every > 0, "log_every", "> 0")
        p = self.profile_steps
        self.require(not p or (len(p) == 2 and 1 <= p[0] <= p[1] <= self.steps), "profile_steps",
                     f"[] or [first, last] with 1 <= first <= last <= steps ({self.steps})")
        self.require(self.gpu_hour_usd >= 0 and self.peak_tflops >= 0, "gpu_hour_usd", ">= 0 (and peak_tflops >= 0)")


@dataclass
class PretrainConfig(LoopConfig):
    """``moe-lab pretrain``: an MoE (or its dense baseline) from scratch on token shards."""

    section: ClassVar[str] = "pretrain"
    # model
    arch: str = "mixtral"  # mixtral | olmoe | qwen2_moe | deepseek_v3 | switch
    preset: str = "tiny"  # a debug size, or a named shape (moe-lab presets lists them)
    model: dict[str, Any] = field(default_factory=dict)  # transformers config overrides (any config field)
    router: RouterSettings = field(default_factory=RouterSettings)  # type: ignore[valid-type]
    router_monitor: MonitorConfig = field(default_factory=MonitorConfig)
    dense_baseline: str = ""  # "" (train the MoE) | "active" | "total": a dense model matched on those params
    # encoder-decoder models (switch) pretrain with T5 span corruption (moe_engine.data.span_corruption)
    noise_density: float = 0.15  # share of each sequence's tokens removed into spans
    mean_noise_span_length: float = 3.0
    snapshot_every: int = 0  # also export a Hugging Face snapshot every N steps and at the end (router analytics over time)

    def check(self) -> None:
        super().check()
        from moe_engine.models.presets import ARCH_ALIASES, PRESETS, canonical_arch

        self.require(self.arch.lower() in ARCH_ALIASES, "arch", f"one of {', '.join(sorted(set(ARCH_ALIASES)))}")
        self.require(self.preset in PRESETS[canonical_arch(self.arch)], "preset",
                     f"a preset of {self.arch}: {', '.join(sorted(PRESETS[canonical_arch(self.arch)]))}")
        self.require(self.dense_baseline in ("", "active", "total"), "dense_baseline", "'', 'active' or 'total'")
        self.require(0.0 < self.noise_density < 1.0, "noise_density", "in (0, 1)")
        self.require(self.mean_noise_span_length >= 1.0, "mean_noise_span_length", ">= 1")
        self.require(self.snapshot_every >= 0, "snapshot_every", ">= 0")
