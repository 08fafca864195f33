"""Fused SwiGLU on the expert hidden state: ``h_AF = silu(gate) * up`` from ``h_A2F = [gate | up]``.

Memory-bound: eager PyTorch reads/writes the [A, 2F] tensor several times (chunk, silu, mul, and in
backward a cat of the two halves' gradients). The Triton kernels read it once and write once in
each direction and save only ``h_A2F`` for backward. Used on CUDA when Triton is importable;
elsewhere (CPU, tests) the eager formula runs, which is also the numerical reference.
Benchmark: ``benchmarks/moe_layer.py`` (the engine variant with and without it).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def swiglu_reference(h_A2F: torch.Tensor) -> torch.Tensor:
    gate_AF, up_AF = h_A2F.chunk(2, dim=-1)
    return F.silu(gate_AF) * up_AF


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(h_ptr, out_ptr, n_elem, F_: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elem
        row, col = offs // F_, offs % F_
        g = tl.load(h_ptr + row * (2 * F_) + col, mask=mask).to(tl.float32)
        u = tl.load(h_ptr + row * (2 * F_) + F_ + col, mask=mask).to(tl.float32)
        out = g * tl.sigmoid(g) * u
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd(h_ptr, grad_out_ptr, grad_h_ptr, n_elem, F_: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elem
        row, col = offs // F_, offs % F_
        g = tl.load(h_ptr + row * (2 * F_) + col, mask=mask).to(tl.float32)
        u = tl.load(h_ptr + row * (2 * F_) + F_ + col, mask=mask).to(tl.float32)
        go = tl.load(grad_out_ptr + offs, mask=mask).to(tl.float32)
        s = tl.sigmoid(g)
        d_up = go * g * s
        d_gate = go * u * s * (1.0 + g * (1.0 - s))  # d/dg [g * sigmoid(g)]
        tl.store(grad_h_ptr + row * (2 * F_) + col, d_gate.to(grad_h_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_h_ptr + row * (2 * F_) + F_ + col, d_up.to(grad_h_ptr.dtype.element_ty), mask=mask)

    return triton, fwd, bwd


_BLOCK = 1024


class _FusedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_A2F):
        triton, fwd, _ = _kernels()
        h_A2F = h_A2F.contiguous()
        width = h_A2F.shape[-1]
        out_AF = h_A2F.new_empty(*h_A2F.shape[:-1], width // 2)
        n = out_AF.numel()
        fwd[(triton.cdiv(n, _BLOCK),)](h_A2F, out_AF, n, width // 2, BLOCK=_BLOCK)
        ctx.save_for_backward(h_A2F)
        return out_AF

    @staticmethod
    def backward(ctx, grad_AF):
        triton, _, bwd = _kernels()
        (h_A2F,) = ctx.saved_tensors
        grad_AF = grad_AF.contiguous()
        grad_A2F = torch.empty_like(h_A2F)
        n = grad_AF.numel()
        bwd[(triton.cdiv(n, _BLOCK),)](h_A2F, grad_AF, grad_A2F, n, h_A2F.shape[-1] // 2, BLOCK=_BLOCK)
        return grad_A2F


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


FUSED = {"enabled": True}  # benchmarks flip this to measure the eager path side by side


def swiglu(h_A2F: torch.Tensor) -> torch.Tensor:
    # Below ~1M elements (decode, tiny batches) a Triton launch costs more than it saves.
    if FUSED["enabled"] and h_A2F.is_cuda and h_A2F.numel() >= (1 << 20) and triton_available():
        return _FusedSwiGLU.apply(h_A2F)
    return swiglu_reference(h_A2F)
