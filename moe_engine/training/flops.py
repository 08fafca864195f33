"""Parameter counts, FLOPs per token, MFU and cost per token.

Training FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): ``6 * N + 12 * L * D * S``
with N the parameters a token actually passes through (for MoE: router, shared experts and K of
the E routed experts — the "active" parameters), plus the LM-head matmul, and the second term for
attention scores over a sequence of S tokens. MFU is achieved FLOP/s over the devices' peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_engine.models.adapters import moe_layers

# dense bf16 tensor-core peaks (no sparsity), FLOP/s per device
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


@dataclass
class ParamCounts:
    total: int
    active: int  # per token
    embedding: int  # input embeddings + untied LM head

    @property
    def active_nonembedding(self) -> int:
        return self.active - self.embedding


def count_params(model: nn.Module) -> ParamCounts:
    """Counts from the model as built (call before experts are sharded over ranks)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in moe_layers(model):
        expert_numel = sum(p.numel() for p in layer.experts.parameters())
        inactive += expert_numel - expert_numel * layer.top_k // layer.num_experts
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        emb += head.weight.numel()
    return ParamCounts(total=total, active=total - inactive, embedding=emb)


def train_flops_per_token(model: nn.Module, seq_len: int, counts: ParamCounts | None = None) -> float:
    counts = counts or count_params(model)
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or cfg.d_model
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.num_layers
    lm_head = hidden * cfg.vocab_size
    return 6.0 * (counts.active_nonembedding + lm_head) + 12.0 * layers * hidden * seq_len


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def usd_per_million_tokens(tokens_per_s: float, num_devices: int, usd_per_device_hour: float) -> float:
    return usd_per_device_hour * num_devices / max(tokens_per_s, 1e-9) / 3600.0 * 1e6
