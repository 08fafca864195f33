"""A bf16 MoE layer on the GPU for the expert-GEMM backend tests (CUTLASS, DeepGEMM)."""

import torch

from moe_engine.moe.layer import MoEConfig
from moe_engine.moe.router import RouterConfig


def gpu_layer(num_experts, top_k, capacity_factor=None):
    """Top-k routing, or Switch routing with capacity drops when ``capacity_factor`` is given; D 256, F 512."""
    router = RouterConfig(kind="switch" if capacity_factor else "topk", num_experts=num_experts, top_k=top_k,
                          aux_loss_coef=0.01, **({"capacity_factor": capacity_factor} if capacity_factor else {}))
    return MoEConfig(hidden_size=256, ffn_size=512, router=router).build().to("cuda", torch.bfloat16).train()
