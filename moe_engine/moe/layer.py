"""MoELayer: router + experts + dispatch, the one sparse block behind every architecture.
Shape legend in ``routing.py``.

The layer takes ``hidden_BSD`` and returns ``out_BSD`` like the transformers block it replaces. It
keeps the replaced block's parameter tensors and attribute names (``gate``/``router``, ``experts``,
``shared_expert``...), so ``state_dict`` keys, ``save_pretrained`` and peft targets are unchanged.

Auxiliary losses are attached to the output through autograd (see ``losses.AttachAuxLoss``): any
loss computed from the model output also trains router balance. Their values, and cheap routing
statistics, are kept after each forward in ``last_aux_loss`` / ``last_stats`` and passed to the
routing hooks (``register_routing_hook``) that analytics attach.

Two ways to run the experts (``experts_mode``): the grouped path (sort assignments by expert, one
grouped GEMM; training, prefill) and the decode path (``decode.py``: only the selected experts' weights
are read, no host syncs, a few kernels; small token counts). ``"auto"`` takes the decode path when a
forward needs no gradient and has few assignments (``decode.worth_it``: measured crossover), the way
transformers switches ``grouped_mm`` to ``batched_mm`` for decoding. Both compute the same function.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from moe_engine.moe import decode, dispatch
from moe_engine.moe.expert_parallel import ExpertParallel, ep_routed_experts
from moe_engine.moe.experts import (
    Experts, activation, expert_lora, expert_mlp, expert_weights, fetch_experts, row_alignment,
)
from moe_engine.moe.losses import AttachAuxLoss
from moe_engine.moe.router import Router, RouterConfig
from moe_engine.moe.routing import Routing, routing_stats

RoutingHook = Callable[["MoELayer", Routing, torch.Tensor], None]
EXPERTS_MODES = ("auto", "grouped", "gathered")


def _router_logits_sink() -> list | None:
    """The list transformers collects ``router_logits`` into during this forward (a model called with
    ``output_router_logits=True``), or None. transformers records them with hooks on its own router
    classes, which a patched model no longer has, so the engine layer appends its logits itself."""
    if torch.compiler.is_compiling():  # dynamo cannot trace ContextVar.get; compiled decoding records nothing
        return None
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older transformers: no output capturing to join
        return None
    collected = _active_collector.get()
    if not collected or "router_logits" not in collected:
        return None
    return collected["router_logits"]


@dataclass
class MoEConfig:
    """A standalone engine layer (benchmarks, custom models); fields equal params.yaml keys."""

    hidden_size: int = 256
    ffn_size: int = 512
    act: str = "silu"
    gated: bool = True
    shared_expert_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    router: RouterConfig = field(default_factory=RouterConfig)

    def build(self) -> "MoELayer":
        router = self.router.build(self.hidden_size)
        experts = Experts(self.router.num_experts, self.hidden_size, self.ffn_size, self.act, self.gated)
        shared = gate = None
        if self.shared_expert_size:
            shared = SharedExpert(self.hidden_size, self.shared_expert_size, self.act)
            gate = nn.Linear(self.hidden_size, 1, bias=False) if self.shared_expert_gate else None
        return MoELayer(router, experts, act=activation(self.act), shared_expert=shared, shared_expert_gate=gate)


class SharedExpert(nn.Module):
    """A dense SwiGLU MLP every token passes through (DeepSeekMoE, Qwen2-MoE)."""

    def __init__(self, hidden_size: int, ffn_size: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=False)
        self.act_fn = activation(act)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoELayer(nn.Module):
    def __init__(
        self,
        router: Router,
        experts: nn.Module,
        *,
        act: Callable[[torch.Tensor], torch.Tensor],
        router_name: str = "gate",
        shared_expert: nn.Module | None = None,
        shared_expert_name: str = "shared_expert",
        shared_expert_gate: nn.Module | None = None,
        expert_dropout: float = 0.0,
        capacity_per_sequence: bool = True,
    ):
        super().__init__()
        self.router_name, self.shared_expert_name = router_name, shared_expert_name
        self.add_module(router_name, router)
        self.experts = experts
        if shared_expert is not None:
            self.add_module(shared_expert_name, shared_expert)
        if shared_expert_gate is not None:
            self.shared_expert_gate = shared_expert_gate
        self.act = act
        self.expert_dropout = expert_dropout
        self.capacity_per_sequence = capacity_per_sequence
        self.num_experts = router.num_experts
        self.top_k = router.top_k
        self.expert_parallel: ExpertParallel | None = None  # set by training.parallel.shard_experts
        self.experts_mode = "auto"
        self.aux_grad_scale = 1.0  # the trainer sets 1 / gradient-accumulation steps, like the LM loss
        # Set by the model adapter's hooks for one forward: the [B, S] padding mask of this layer's
        # sequence (False = padding), and whether router logits are recorded [B, S, E] (Switch) or [T, E]
        self.padding_mask_BS: torch.Tensor | None = None
        self.lora_dropout = 0.0  # dropout on the input of LoRA adapters on the experts (peft's own path allows none)
        self.router_logits_3d = False
        self.last_aux_loss: torch.Tensor | None = None
        self._last_routing: tuple[Routing, torch.Tensor] | None = None
        self.graphs = None  # a graphs.MoEGraphs replaying this layer's training forward and backward, or None
        self._routing_hooks: OrderedDict[int, RoutingHook] = OrderedDict()  # weak-referenceable, unlike dict

    @property
    def moe_router(self) -> Router:
        router = self._modules[self.router_name]
        if hasattr(router, "modules_to_save") and hasattr(router, "original_module"):  # peft trains a copy of it
            active = getattr(router, "active_adapter", None)
            active = active[0] if isinstance(active, (list, tuple)) else active
            if not getattr(router, "disable_adapters", False) and active in router.modules_to_save:
                return router.modules_to_save[active]
            return router.original_module
        return router

    @property
    def shared(self) -> nn.Module | None:
        return self._modules.get(self.shared_expert_name)

    @property
    def experts_mode(self) -> str:
        """``"auto"`` (decode path for small inference forwards, else grouped), ``"grouped"`` (always the
        grouped path) or ``"gathered"`` (the decode path wherever it applies: token-choice routing without
        capacity drops and without expert parallelism; elsewhere the grouped path runs)."""
        return self._experts_mode

    @experts_mode.setter
    def experts_mode(self, mode: str) -> None:
        if mode not in EXPERTS_MODES:
            raise ValueError(f"experts_mode={mode!r}; choose one of {', '.join(EXPERTS_MODES)}")
        self._experts_mode = mode

    @property
    def last_stats(self) -> dict[str, tuple[torch.Tensor, str]]:
        """Routing statistics of the last forward, computed on first access (off the hot path)."""
        return routing_stats(*self._last_routing) if self._last_routing is not None else {}

    @property
    def last_tokens_per_expert(self) -> torch.Tensor | None:
        """[E] assignments per expert in the last forward (this rank's tokens), without other stats."""
        if self._last_routing is None:
            return None
        routing, counts_E = self._last_routing
        return counts_E if counts_E is not None else routing.tokens_per_expert()

    def register_routing_hook(self, hook: RoutingHook) -> RemovableHandle:
        """``hook(layer, routing, tokens_per_expert_E)`` runs after every forward (analytics)."""
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        shape = hidden_BSD.shape
        x_TD = hidden_BSD.reshape(-1, shape[-1])
        group = shape[-2] if (self.capacity_per_sequence and hidden_BSD.dim() == 3) else None
        mask_T = self._token_mask(shape)
        recorded = _router_logits_sink()
        replayed = None
        if self.graphs is not None and mask_T is None and recorded is None:
            replayed = self.graphs.replay(self, x_TD, group)  # None: not captured for this call, run eagerly
        if replayed is not None:
            out_TD, routing, counts_E, self.last_aux_loss = replayed
        else:
            out_TD, routing, counts_E = self.compute(x_TD, group, mask_T, recorded, shape[:-1])
        self._last_routing = (routing.detached() if torch.is_grad_enabled() else routing, counts_E)
        if self._routing_hooks and counts_E is None:  # the decode path counts nothing it does not need
            counts_E = routing.tokens_per_expert()
        for hook in self._routing_hooks.values():
            hook(self, routing, counts_E)
        return out_TD.view(shape)

    def compute(self, x_TD: torch.Tensor, group: int | None = None, mask_T: torch.Tensor | None = None,
                recorded: list | None = None, logits_shape: tuple = ()) -> tuple[torch.Tensor, Routing, torch.Tensor | None]:
        """(out_TD, routing, tokens_per_expert_E or None): router, experts, shared expert and aux losses,
        everything of ``forward`` but its bookkeeping and hooks (what ``graphs.MoEGraphs`` captures)."""
        router = self.moe_router
        router.token_mask_T = mask_T
        router.monitor_stats = bool(self._routing_hooks)
        try:
            routing = router(x_TD, group_size=group)
        finally:
            router.token_mask_T = None
            router.monitor_stats = False
        if recorded is not None:  # output_router_logits=True: the model's own loss adds the aux loss
            recorded.append(routing.logits_TE.view(*logits_shape, -1) if self.router_logits_3d else routing.logits_TE)
            routing.aux_losses = {}
        out_TD, counts_E = self.routed_experts(x_TD, routing)
        shared = self.shared
        if shared is not None:
            shared_TD = shared(x_TD)
            if hasattr(self, "shared_expert_gate"):
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD
        return self._attach_aux_losses(out_TD, routing), routing, counts_E

    def _token_mask(self, shape) -> torch.Tensor | None:
        """[T] bool from the padding mask of this forward when it matches the tokens (during cached
        generation the mask covers past tokens too: the last S columns are these)."""
        mask = self.padding_mask_BS
        if mask is None or len(shape) != 3 or mask.dim() != 2 or mask.shape[0] != shape[0] or mask.shape[1] < shape[1]:
            return None
        return mask[:, -shape[1]:].bool().reshape(-1)  # all True weighs like no mask: no host sync to check

    def uses_decode_path(self, routing: Routing) -> bool:
        """Whether this forward's experts run on the decode path (see ``experts_mode``)."""
        mode = self.experts_mode
        if mode == "grouped" or self.expert_parallel is not None or not routing.token_major or routing.may_drop:
            return False
        if self.training and self.expert_dropout > 0:
            return False
        if mode == "gathered":
            return True
        return not torch.is_grad_enabled() and decode.worth_it(routing.expert_idx_A.numel(), routing.num_experts)

    def routed_experts(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(out_TD, tokens_per_expert_E or None): run the selected experts and combine. The decode path
        returns None for the counts (``last_tokens_per_expert`` computes them when asked). LoRA adapters
        on the experts (peft) run inside the grouped path."""
        experts, lora = expert_lora(self.experts, self.lora_dropout)
        has_lora = bool(lora["in"] or lora["out"])
        if self.expert_parallel is not None:
            if lora["in"] or lora["out"]:
                raise ValueError("LoRA on experts is not supported with expert parallelism (ep_size > 1)")
            if not routing.token_major:
                raise ValueError("expert-choice routing is not supported with expert parallelism (ep_size > 1)")
            if callable(getattr(type(experts), "fetch_experts", None)):
                raise ValueError("offloaded experts (fetch_experts) are not supported with expert parallelism")
            w_in, w_out, gated = expert_weights(experts)
            return ep_routed_experts(
                self.expert_parallel, x_TD, routing, w_in, w_out, gated, self.act, self.expert_dropout, self.training
            )
        slots = fetch_experts(experts, routing, x_TD)
        w_in, w_out, gated, slot_A = slots.w_in_SHD, slots.w_out_SDF, slots.gated, slots.slot_idx_A
        resident = slots.num_slots == self.num_experts and slot_A is routing.expert_idx_A
        if not has_lora and self.uses_decode_path(routing):
            top_k = routing.top_k
            out_TD = decode.decode_experts(
                x_TD, slot_A.view(-1, top_k), routing.weight_A.view(-1, top_k), w_in, w_out, gated, self.act
            )
            return out_TD, None
        align = row_alignment(x_TD, w_in, w_out) if routing.token_major else 0
        plan = dispatch.plan(slot_A, slots.num_slots, may_drop=routing.may_drop, align=align)
        if routing.token_major:
            x_AD = dispatch.permute(x_TD, plan, routing.top_k)
            y_AD = expert_mlp(x_AD, plan, w_in, w_out, gated, self.act, self.expert_dropout, self.training, lora)
            out_TD = dispatch.unpermute(y_AD, routing.weight_A, plan, routing.top_k)
        else:  # expert choice: a token appears 0..E times, combine by index_add
            token_A = routing.token_idx_A.index_select(0, plan.order_A)
            y_AD = expert_mlp(x_TD.index_select(0, token_A), plan, w_in, w_out, gated, self.act, self.expert_dropout,
                              self.training, lora)
            y_AD = y_AD * routing.weight_A.index_select(0, plan.order_A)[:, None]
            out_TD = torch.zeros_like(x_TD).index_add(0, token_A, y_AD.to(x_TD.dtype))
        return out_TD, (plan.counts_E if resident else None)

    def _attach_aux_losses(self, out_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        if not routing.aux_losses:
            self.last_aux_loss = None
            return out_TD
        aux = torch.stack([v.float() for v in routing.aux_losses.values()]).sum()
        self.last_aux_loss = aux.detach()
        if aux.requires_grad:
            out_TD = AttachAuxLoss.apply(out_TD, aux, self.aux_grad_scale)
        return out_TD
