"""Typed configuration of the pretraining stage; fields equal the keys of params.yaml ``pretrain:``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PretrainConfig:
    # model
    arch: str = "mixtral"  # mixtral | olmoe | qwen2_moe | deepseek_v3 | switch
    preset: str = "tiny"  # a debug size, or a named shape (see moe_engine.models.presets)
    model: dict[str, Any] = field(default_factory=dict)  # transformers config overrides
    router: dict[str, Any] = field(default_factory=dict)  # RouterConfig overrides (aux_loss_coef, kind, ...)
    router_monitor: dict[str, Any] = field(default_factory=dict)  # analytics.online.MonitorConfig (alert thresholds)
    dense_baseline: str = ""  # "" (train the MoE) | "active" | "total": a dense model matched on those params
    # encoder-decoder models (switch) pretrain with T5 span corruption (moe_engine.data.span_corruption)
    noise_density: float = 0.15  # share of each sequence's tokens removed into spans
    mean_noise_span_length: float = 3.0
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
    seed: int = 0
    # parallelism and precision
    zero_stage: int = 0  # 0, 1 or 2 (ZeRO-3 is refused by DeepSpeed's MoE support)
    ep_size: int = 1  # expert-parallel ranks; must divide the world size and the expert count
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    # bookkeeping
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    snapshot_every: int = 0  # also export a Hugging Face snapshot every N steps (router analytics over time)
    eval_batches: int = 8  # validation batches at the end (0: none)
    profile_steps: list[int] = field(default_factory=list)  # [first, last] optimizer steps under torch.profiler -> out_dir/profile/
    # tracking and cost
    mlflow_tracking_uri: str = ""  # "" = no MLflow run; e.g. sqlite:///mlflow/mlflow.db or http://127.0.0.1:5000
    experiment: str = "moe-lab"
    gpu_hour_usd: float = 2.5  # $ per GPU-hour, for cost per million tokens
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look up the GPU (H100/H200/A100), none on CPU

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "PretrainConfig":
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown pretrain setting(s) {unknown}; valid keys: {sorted(names)}")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        checks = [
            (self.steps > 0, "steps must be > 0"),
            (self.micro_batch_size > 0 and self.grad_accum > 0, "micro_batch_size and grad_accum must be > 0"),
            (self.zero_stage in (0, 1, 2), "zero_stage must be 0, 1 or 2 (DeepSpeed refuses ZeRO-3 with MoE)"),
            (self.ep_size >= 1, "ep_size must be >= 1"),
            (self.precision in ("auto", "bf16", "fp32"), "precision must be auto, bf16 or fp32"),
            (self.dense_baseline in ("", "active", "total"), "dense_baseline must be '', 'active' or 'total'"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0.0 < self.noise_density < 1.0 and self.mean_noise_span_length >= 1.0,
             "noise_density must be in (0, 1) and mean_noise_span_length >= 1"),
            (not self.profile_steps or (len(self.profile_steps) == 2 and 1 <= self.profile_steps[0] <= self.profile_steps[1] <= self.steps),
             f"profile_steps must be [] or [first, last] with 1 <= first <= last <= steps, got {self.profile_steps}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"pretrain config: {message}")
