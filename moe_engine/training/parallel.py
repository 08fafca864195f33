"""Distributed setup on DeepSpeed: process groups, expert sharding, optimizer parameter groups.

Kept apart from the model (torchtitan's model / parallelize split): the model is a plain patched
transformers model; this file makes it expert-parallel.

- ``init_distributed()``: DeepSpeed's ``init_distributed`` (nccl on GPUs, gloo on CPUs). Works
  under the ``deepspeed`` launcher, ``torchrun`` or as a single plain process.
- ``shard_experts(model, ep_size)``: each rank keeps E / ep_size experts of every MoE layer
  (a slice of the fused [E, ...] weights), marks them as expert parameters the way DeepSpeed's
  MoE does (``allreduce=False``, ``group_name``), and points the layers at DeepSpeed's
  expert-parallel group. Expert gradients are then reduced over the expert-*data*-parallel group
  and the rest over the data-parallel group, by DeepSpeed's engine and ZeRO optimizer.
- ``param_groups(model, weight_decay)``: decay / no-decay groups, split into MoE groups with
  DeepSpeed's ``split_params_into_different_moe_groups_for_optimizer``.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from moe_engine.models.adapters import moe_layers
from moe_engine.moe.expert_parallel import ExpertParallel


def prepare_environment() -> None:
    """Set what DeepSpeed reads at import: the CPU accelerator where no GPU is, no telemetry."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _skip_cpu_inference_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce C++ op when it starts (about a
    minute on a fresh 2-core machine) that only DeepSpeed inference calls; training never uses it, so
    it is marked unavailable and torch.distributed's own all-reduce serves every reduction."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # the mapping is built on first access


def _launched() -> bool:
    """True under torchrun / the deepspeed launcher / MPI (they set the rank variables)."""
    return "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def init_distributed() -> tuple[int, int]:
    """(rank, world_size). Under a launcher: DeepSpeed's ``init_distributed`` (nccl on GPUs, gloo on
    CPUs). A plain single process gets a one-rank group over an in-process store: no TCP port is
    opened (torch's TCPStore would listen on every interface), gloo is pinned to the loopback
    device, and no rank variable is left in the environment for child processes to trip on."""
    prepare_environment()
    import deepspeed
    import torch.distributed as dist

    if not torch.cuda.is_available():
        _skip_cpu_inference_op()
    if not dist.is_initialized():
        if _launched():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        else:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            pinned = backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ and sys.platform == "linux"
            if pinned:
                os.environ["GLOO_SOCKET_IFNAME"] = "lo"
            try:
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            finally:
                if pinned:
                    os.environ.pop("GLOO_SOCKET_IFNAME", None)
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine asserts it is set
            deepspeed.init_distributed(dist_backend=backend)  # adopts the existing group
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def _expert_group_marker_class():
    from deepspeed.moe.layer import MoE

    class DeepSpeedExpertGroup(MoE):
        """Parameter-free stand-in that tells DeepSpeed's engine this model has expert-parallel
        layers. The engine finds MoE layers by ``isinstance(module, deepspeed.moe.layer.MoE)`` and
        only then passes the expert process groups to ZeRO; our experts live in the engine layer."""

        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)
            self.num_experts, self.ep_size = num_experts, ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = f"ep_size_{ep_size}"

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_=False):
            pass  # the groups were created by shard_experts before the engine was built

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedExpertGroup is a marker; it is never called")

    return DeepSpeedExpertGroup


def shard_experts(model: nn.Module, ep_size: int) -> None:
    """Keep this rank's slice of every MoE layer's experts and wire the layers to DeepSpeed's
    expert-parallel group. With ep_size == 1 experts stay whole but are still marked, so the
    same code path (and DeepSpeed's MoE gradient handling) runs at every scale."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the number of ranks ({world})")
    groups._create_expert_and_data_parallel(ep_size)
    group_name = f"ep_size_{ep_size}"
    ep_group = groups._get_expert_parallel_group(group_name)
    ep_rank = dist.get_rank(group=ep_group)
    marker_cls = _expert_group_marker_class()
    for layer in moe_layers(model):
        E = layer.num_experts
        if E % ep_size:
            raise ValueError(f"{E} experts cannot be split evenly over ep_size={ep_size}")
        local = slice(ep_rank * (E // ep_size), (ep_rank + 1) * (E // ep_size))
        fused = list(layer.experts.named_parameters(recurse=False))
        if not fused and ep_size > 1:
            raise ValueError(
                f"expert parallelism needs fused [E, ...] expert weights; {type(layer.experts).__name__} keeps "
                "one module per expert (Switch Transformers): train it with ep_size=1"
            )
        for name, param in fused:
            if ep_size > 1:
                param = nn.Parameter(param.data[local].clone())
                setattr(layer.experts, name, param)
        # every expert parameter (fused tensors, or one module per expert at ep_size 1) goes into
        # DeepSpeed's MoE optimizer groups, which ZeRO >= 1 requires once the layer is marked as MoE
        for param in layer.experts.parameters():
            param.allreduce = False
            param.group_name = group_name
        if ep_size > 1:
            layer.expert_parallel = ExpertParallel(ep_group, ep_size, ep_rank, E)
        layer.ds_expert_group = marker_cls(E, ep_size)


def is_expert_param(param: torch.Tensor) -> bool:
    return getattr(param, "allreduce", True) is False


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms and embeddings' 1-D params; expert params in
    DeepSpeed MoE groups so ZeRO partitions and reduces them over the expert-data-parallel group."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:  # no decay on 1-D params, nor where a method asks (ESFT's partly frozen experts)
            (decay if p.dim() >= 2 and not getattr(p, "no_weight_decay", False) else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    # one optimizer group per (decay, expert group): DeepSpeed's default splits expert params into
    # ~179M-element groups, and ZeRO pays a few host syncs per group every step
    split = split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]], max_group_size=2**62)
    return [g for g in split if g["params"]]  # the split can empty a group (every param of it an expert's); DeepSpeed drops those


def gather_experts(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (all-ranks) expert tensors, keyed by state-dict name, for an HF export. Non-expert
    parameters are identical on every rank and need no gathering."""
    import torch.distributed as dist

    full = {}
    for layer_name, layer in ((n, m) for n, m in model.named_modules() if m in set(moe_layers(model))):
        ep = layer.expert_parallel
        for name, param in layer.experts.named_parameters(recurse=False):
            key = f"{layer_name}.experts.{name}"
            if ep is None:
                full[key] = param.detach()
                continue
            parts = [torch.empty_like(param) for _ in range(ep.size)]
            dist.all_gather(parts, param.detach().contiguous(), group=ep.group)
            full[key] = torch.cat(parts)
    return full
