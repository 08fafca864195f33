"""CUDA graphs for the MoE layers of a training step: each layer's forward and backward replayed
from one captured graph instead of ~50 separate kernel launches. Shape legend in ``routing.py``.

Why: an MoE layer launches about 50-60 kernels per forward+backward (router, sort and dispatch plan,
gathers, grouped GEMMs, combine, aux losses) against ~8 for a dense MLP, so at a few thousand tokens
per GPU its step is bound by the CPU's launch rate (switch-like layer on one H200: 3.05 ms eager,
1.87 ms replayed). The engine's dropless dispatch never syncs with the host and keeps every shape
fixed for a fixed token count (the expert group offsets stay on the device), so a captured layer
replays correctly whatever the routing: the same kernels run on the same buffers, same bits.

How (``MoEGraphs``; the trainer's ``cuda_graphs: true`` drives it):
    graphs = MoEGraphs(moe_layers(model)).record()  # the next training forward notes each layer's input
    ...one ordinary (eager) training step...
    graphs.capture()  # one forward and one backward graph per layer (two memory pools)
    ...later training forwards of the same shape replay; anything else runs eagerly...

A layer replays only in training mode with gradients on, for the token count, dtype and capacity
group it was captured with, without a padding mask and without transformers' router-logit
recording; every other call (evaluation, no_grad, the last short batch, fine-tuning with padding)
runs the eager path, which computes the same function. What a replay hands out (the output, the
``Routing`` the routing hooks see, ``last_aux_loss``, the token counts) lives in the graph's memory and
is overwritten by the layer's next replay: copy what must outlive it.

The forward graphs share one memory pool and the backward graphs another, so buffers freed inside one
capture are reused by later ones: replays must come in capture order (forwards layer by layer,
backwards in reverse), as a training step runs them. Each replay checks it: a backward whose saved activations a later replay may have overwritten
raises instead of computing wrong gradients (so does a layer called twice in one forward, as with
weights shared across depth: train such a model with the graphs off). Parameter gradients come out of
the graphs' own buffers: the first micro-batch's gradient becomes ``param.grad`` without a copy (as in
eager mode), and a ``param.grad`` still on such a buffer is copied out before a replay that may write
there (gradient accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class GraphOrderError(RuntimeError):
    """A replayed backward whose saved activations a later replay may have overwritten."""


@dataclass
class _Captured:
    """One layer's forward and backward graphs and the buffers they read and write."""

    index: int
    layer: Any  # the MoELayer
    group: int | None
    sample_x: torch.Tensor | None  # the recorded input, for warm-up and capture; dropped after
    params: tuple[torch.nn.Parameter, ...] = ()
    leaves: tuple[torch.nn.Parameter, ...] = ()  # the stand-ins the capture differentiated (same memory)
    grad_params: tuple[bool, ...] = ()
    ptrs: tuple[int, ...] = ()
    static_x: torch.Tensor | None = None
    static_out: torch.Tensor | None = None
    static_grad_out: torch.Tensor | None = None
    grad_x: torch.Tensor | None = None
    grads: tuple[torch.Tensor | None, ...] = ()
    routing: Any = None  # the Routing the capture produced: its tensors hold each replay's values
    counts_E: torch.Tensor | None = None
    aux: torch.Tensor | None = None
    fwd: Any = None
    bwd: Any = None

    def key(self) -> tuple:
        return _key(self.sample_x if self.static_x is None else self.static_x, self.group)


def _key(x_TD: torch.Tensor, group: int | None) -> tuple:
    return (tuple(x_TD.shape), x_TD.dtype, x_TD.device, group, x_TD.requires_grad)


class _Replay(torch.autograd.Function):
    """One autograd node per layer: forward replays the forward graph, backward the backward graph."""

    @staticmethod
    def forward(ctx, graphs: "MoEGraphs", c: _Captured, x_TD: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.graphs, ctx.c = graphs, c
        ctx.generation = graphs._begin_forward(c)
        if c.static_x.data_ptr() != x_TD.data_ptr():
            c.static_x.copy_(x_TD)
        c.fwd.replay()
        return c.static_out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out_TD: torch.Tensor):
        graphs, c = ctx.graphs, ctx.c
        graphs._begin_backward(c, ctx.generation)
        graphs._copy_out_grads(c.index)
        c.static_grad_out.copy_(grad_out_TD)
        c.bwd.replay()
        # fresh tensor objects on the graph's buffers: autograd makes the first one .grad without a copy
        grads = tuple(None if g is None else g.detach() for g in c.grads)
        graphs._lent.extend((c.index, p, g) for p, g in zip(c.params, c.grads) if g is not None)
        return (None, None, c.grad_x, *grads)


def _stand_ins(c: _Captured):
    """Put a fresh leaf sharing each parameter's memory in the parameter's place (``c.leaves``, in
    ``c.params`` order); returns the function that puts the parameters back."""
    leaf_of = {id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in c.params}
    c.leaves = tuple(leaf_of[id(p)] for p in c.params)
    slots = [(m, name, p) for m in c.layer.modules() for name, p in m._parameters.items() if p is not None]
    for m, name, p in slots:
        m._parameters[name] = leaf_of[id(p)]

    def restore():
        for m, name, p in slots:
            m._parameters[name] = p

    return restore


class MoEGraphs:
    """CUDA graphs of the given MoE layers (in the order a forward runs them); see the module docstring."""

    def __init__(self, layers, warmup: int = 2):
        self.layers = list(layers)
        self.warmup = warmup
        self.state = "off"  # off | recording | captured
        self._captures: list[_Captured] = []
        self._by_layer: dict[int, _Captured] = {}
        self._pending: list[int | None] = []  # per capture: generation of a forward awaiting its backward
        self._generation = 0
        self._lent: list[tuple[int, torch.nn.Parameter, torch.Tensor]] = []  # gradient buffers handed to autograd
        self.replays = 0  # forward replays so far (tests and logs read it)

    def __deepcopy__(self, memo):  # a copied model gets eager layers (graphs hold this model's buffers)
        return None

    # ------------------------------------------------------------------ the layer's entry point
    def replay(self, layer, x_TD: torch.Tensor, group: int | None):
        """(out_TD, routing, counts_E, aux) from the layer's graph, or None: run it eagerly."""
        if not (layer.training and torch.is_grad_enabled() and x_TD.is_cuda):
            return None
        if self.state == "recording":
            self._note(layer, x_TD, group)
            return None
        c = self._by_layer.get(id(layer))
        if self.state != "captured" or c is None or c.key() != _key(x_TD, group):
            return None
        if tuple(p.data_ptr() for p in c.params) != c.ptrs or tuple(p.requires_grad for p in c.params) != c.grad_params:
            raise RuntimeError("an MoE layer's parameters were replaced or (un)frozen after its CUDA graph was captured; "
                               "capture again (MoEGraphs.capture after a new record()) or train with cuda_graphs off")
        out_TD = _Replay.apply(self, c, x_TD, *c.params)
        self.replays += 1
        return out_TD, c.routing, c.counts_E, c.aux

    # ------------------------------------------------------------------ recording and capture
    def record(self) -> "MoEGraphs":
        """Note each layer's input during the next training forward (which runs eagerly)."""
        for layer in self.layers:
            layer.graphs = self
        self._captures, self._by_layer = [], {}
        self.state = "recording"
        return self

    def _note(self, layer, x_TD: torch.Tensor, group: int | None) -> None:
        if id(layer) in self._by_layer:  # the recorded step's later micro-batches: the first call is what counts
            return
        c = _Captured(len(self._captures), layer, group, x_TD.detach().clone().requires_grad_(x_TD.requires_grad))
        self._captures.append(c)
        self._by_layer[id(layer)] = c

    def capture(self) -> int:
        """Capture every recorded layer (call after the recorded step's backward); returns how many."""
        if self.state != "recording":
            raise RuntimeError("MoEGraphs.capture() needs a recorded training forward first: call record()")
        captures = self._captures
        self._pending = [None] * len(captures)
        if not captures:
            self.state = "off"
            return 0
        for c in captures:
            c.params = tuple(c.layer.parameters())
            c.grad_params = tuple(p.requires_grad for p in c.params)
            c.ptrs = tuple(p.data_ptr() for p in c.params)
        torch.cuda.synchronize()
        # The captures run the layers on stand-in leaves that share the parameters' memory (replays read
        # the live weights): autograd nodes the real parameters already have, made on the default stream,
        # must not join a capture (CUDA refuses the cross-stream wait).
        swapped = [_stand_ins(c) for c in captures]
        try:
            self._warm_up_and_capture(captures)
        finally:
            for restore in swapped:
                restore()
        for c in captures:
            c.sample_x = None
            c.layer.last_aux_loss = None
        torch.cuda.synchronize()
        self.state = "captured"
        return len(captures)

    def _warm_up_and_capture(self, captures: list[_Captured]) -> None:
        # Warm up on a side stream (Triton autotuning, cuBLAS handles, lazy allocations stay out of the capture)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for c in captures:
                for _ in range(self.warmup):
                    out_TD = c.layer.compute(c.sample_x, c.group)[0]
                    inputs = self._grad_inputs(c, c.sample_x)
                    if inputs:
                        torch.autograd.grad(out_TD, inputs, torch.zeros_like(out_TD), allow_unused=True)
                    del out_TD
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        # Two pools: forwards (activations and their temporaries) and backwards (temporaries and the parameter
        # gradients). A gradient buffer must survive the next micro-batch's forward replays (it is .grad
        # while gradients accumulate), so no forward may have freed the memory it sits in.
        pool_fwd, pool_bwd = torch.cuda.graph_pool_handle(), torch.cuda.graph_pool_handle()
        for c in captures:  # forwards in the order a step runs them
            c.static_x = c.sample_x.detach().clone().requires_grad_(c.sample_x.requires_grad)
            c.fwd = torch.cuda.CUDAGraph()
            with torch.cuda.graph(c.fwd, pool=pool_fwd):
                out_TD, routing, counts_E = c.layer.compute(c.static_x, c.group)
            c.static_out, c.routing, c.counts_E, c.aux = out_TD, routing.detached(), counts_E, c.layer.last_aux_loss
        for c in reversed(captures):  # backwards in reverse
            c.static_grad_out = torch.zeros_like(c.static_out)
            inputs = self._grad_inputs(c, c.static_x)
            c.bwd = torch.cuda.CUDAGraph()
            with torch.cuda.graph(c.bwd, pool=pool_bwd):
                grads = torch.autograd.grad(c.static_out, inputs, c.static_grad_out, allow_unused=True) if inputs else ()
            grads = iter(grads)
            c.grad_x = next(grads) if c.static_x.requires_grad else None
            c.grads = tuple(next(grads) if g else None for g in c.grad_params)

    @staticmethod
    def _grad_inputs(c: _Captured, x_TD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ((x_TD,) if x_TD.requires_grad else ()) + tuple(p for p, g in zip(c.leaves, c.grad_params) if g)

    def release(self) -> None:
        """Drop the graphs and their memory; the layers run eagerly again."""
        for layer in self.layers:
            layer.graphs = None
        self._captures, self._by_layer, self._pending, self._lent = [], {}, [], []
        self.state = "off"

    # ------------------------------------------------------------------ replay order (shared pools)
    def _begin_forward(self, c: _Captured) -> int:
        # A forward's temporaries may sit where later captures keep activations for their backward, and
        # its own saved activations are rewritten: those pending backwards are no longer valid.
        for j in range(c.index, len(self._pending)):
            self._pending[j] = None
        self._generation += 1
        self._pending[c.index] = self._generation
        return self._generation

    def _copy_out_grads(self, index: int) -> None:
        """Before backward ``index`` replays: a ``.grad`` that is still the buffer of a backward captured
        after it (or its own) gets its own copy, since this replay may write there (the backward pool
        reuses what earlier-captured backwards freed). Other lent buffers stay lent."""
        kept = []
        for j, p, g in self._lent:
            if j <= index:
                if p.grad is not None and p.grad.data_ptr() == g.data_ptr():
                    p.grad = p.grad.clone()
            else:
                kept.append((j, p, g))
        self._lent = kept

    def _begin_backward(self, c: _Captured, generation: int) -> None:
        if self._pending[c.index] != generation:
            raise GraphOrderError(
                f"MoE layer {c.index}'s CUDA graph was replayed again (or a later layer's was) before this backward, "
                "so its saved activations are gone: run each backward before the next training forward, or set "
                "cuda_graphs: false")
        self._pending[c.index] = None
        for j in range(c.index + 1, len(self._pending)):  # this backward's temporaries may reuse their memory
            self._pending[j] = None
