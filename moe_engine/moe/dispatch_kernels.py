"""Fused gather-and-sum kernels behind ``dispatch.py``. Shape legend in ``routing.py``.

Two memory-bound steps of token dispatch read every [A, D] row once more than needed when written
with PyTorch ops (gather into a [T, K, D] copy, then a batched matmul or a sum; the batched matmul
with inner dimension K is a particularly slow cuBLAS case for K = 1), and the forward permute reads
each token row K times when written as ``index_select``:

    scatter_rows:      out_AD[idx_A[t*K + k]] = x_TD[t]      (each token row read once, stored K times)
    gather_sum:        out_TD[t]  = sum_k w_TK[t, k] * src_AD[idx_A[t*K + k]]      (fp32 accumulation)
    combine_backward:  grad_src_AD[idx_A[t*K + k]] = w_TK[t, k] * g_TD[t]
                       grad_w_TK[t, k]            = <src_AD[idx_A[t*K + k]], g_TD[t]>

On CUDA with Triton each is one kernel that reads each row once; elsewhere the PyTorch formulas
below run, and they are the reference the GPU tests compare against.
"""

from __future__ import annotations

import functools

import torch


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulate in at least float32 (bf16 sums of K rows lose bits); float64 stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


def gather_sum_reference(src_AD, idx_A, w_TK, top_k):
    rows_TKD = src_AD.index_select(0, idx_A).view(-1, top_k, src_AD.shape[-1]).to(_acc(src_AD))
    if w_TK is not None:
        rows_TKD = rows_TKD * w_TK.to(rows_TKD.dtype)[..., None]
    return rows_TKD.sum(1).to(src_AD.dtype)


def combine_backward_reference(g_TD, src_AD, idx_A, w_TK):
    num_tokens, top_k = w_TK.shape
    grad_src_AD = torch.empty_like(src_AD)
    grad_rows = (w_TK.to(g_TD.dtype)[..., None] * g_TD[:, None, :]).view(num_tokens * top_k, -1)
    grad_src_AD[idx_A] = grad_rows.to(src_AD.dtype)
    rows_TKD = src_AD.index_select(0, idx_A).view(num_tokens, top_k, -1)
    acc = _acc(src_AD)
    grad_w_TK = (rows_TKD.to(acc) * g_TD.to(acc)[:, None, :]).sum(-1).to(w_TK.dtype)
    return grad_src_AD, grad_w_TK


@functools.cache
def _triton_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_sum_kernel(src_ptr, idx_ptr, w_ptr, out_ptr, D, K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(idx_ptr + t * K + k).to(tl.int64)
            v = tl.load(src_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + t * K + k).to(tl.float32)
            acc += v
        tl.store(out_ptr + t * D + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def combine_bwd_kernel(g_ptr, src_ptr, idx_ptr, w_ptr, grad_src_ptr, grad_w_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        for k in tl.static_range(K):
            row = tl.load(idx_ptr + t * K + k).to(tl.int64)
            w = tl.load(w_ptr + t * K + k).to(tl.float32)
            dot = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs = d0 + tl.arange(0, BLOCK_D)
                mask = offs < D
                g = tl.load(g_ptr + t * D + offs, mask=mask, other=0.0).to(tl.float32)
                v = tl.load(src_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(grad_src_ptr + row * D + offs, (w * g).to(grad_src_ptr.dtype.element_ty), mask=mask)
                dot += v * g
            tl.store(grad_w_ptr + t * K + k, tl.sum(dot, axis=0).to(grad_w_ptr.dtype.element_ty))

    @triton.jit
    def scatter_rows_kernel(x_ptr, idx_ptr, out_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < D
        row = tl.load(x_ptr + t * D + offs, mask=mask)
        for k in tl.static_range(K):
            dest = tl.load(idx_ptr + t * K + k).to(tl.int64)
            tl.store(out_ptr + dest * D + offs, row, mask=mask)

    return triton, gather_sum_kernel, combine_bwd_kernel, scatter_rows_kernel


@functools.cache
def triton_importable() -> bool:
    """Whether Triton can be imported (checked once): the GPU kernels of the engine need it."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run for ``t`` (a CUDA tensor of a float type Triton loads, Triton there)."""
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16, torch.float32) and triton_importable()


def gather_sum(src_AD: torch.Tensor, idx_A: torch.Tensor, w_TK: torch.Tensor | None, top_k: int) -> torch.Tensor:
    if not use_triton(src_AD):
        return gather_sum_reference(src_AD, idx_A, w_TK, top_k)
    triton, kernel, _, _ = _triton_kernels()
    src_AD, idx_A = src_AD.contiguous(), idx_A.contiguous()
    num_tokens, dim = idx_A.numel() // top_k, src_AD.shape[-1]
    out_TD = src_AD.new_empty(num_tokens, dim)
    block = min(1024, triton.next_power_of_2(dim))
    w = w_TK.contiguous() if w_TK is not None else idx_A  # dummy pointer when unweighted
    kernel[(num_tokens, triton.cdiv(dim, block))](src_AD, idx_A, w, out_TD, dim, K=top_k, HAS_W=w_TK is not None, BLOCK_D=block)
    return out_TD


def combine_backward(g_TD, src_AD, idx_A, w_TK):
    if not use_triton(src_AD):
        return combine_backward_reference(g_TD, src_AD, idx_A, w_TK)
    triton, _, kernel, _ = _triton_kernels()
    g_TD, src_AD, idx_A, w_TK = g_TD.contiguous(), src_AD.contiguous(), idx_A.contiguous(), w_TK.contiguous()
    num_tokens, top_k = w_TK.shape
    dim = src_AD.shape[-1]
    grad_src_AD = torch.empty_like(src_AD)
    grad_w_TK = torch.empty_like(w_TK)
    block = min(1024, triton.next_power_of_2(dim))
    kernel[(num_tokens,)](g_TD, src_AD, idx_A, w_TK, grad_src_AD, grad_w_TK, dim, K=top_k, BLOCK_D=block)
    return grad_src_AD, grad_w_TK


def scatter_rows_reference(x_TD, idx_A, top_k, rows=None):
    out_AD = x_TD.new_empty(rows or idx_A.numel(), x_TD.shape[-1])
    out_AD[idx_A] = x_TD.repeat_interleave(top_k, dim=0)
    return out_AD


def scatter_rows(x_TD: torch.Tensor, idx_A: torch.Tensor, top_k: int, rows: int | None = None) -> torch.Tensor:
    """``out_AD[idx_A[t*K + k]] = x_TD[t]`` for a permutation ``idx_A`` of the A = T*K rows: equals
    ``x_TD.index_select(0, order_A // K)`` bit for bit (``idx_A`` the inverse of ``order_A``; every row is
    written once, no atomics) but reads T x D instead of A x D. ``rows`` > A: a buffer of that many rows
    (aligned groups), the rows ``idx_A`` does not name left as they are."""
    if not use_triton(x_TD):
        return scatter_rows_reference(x_TD, idx_A, top_k, rows)
    return scatter_rows_triton(x_TD, idx_A, top_k, rows)


def scatter_rows_triton(x_TD: torch.Tensor, idx_A: torch.Tensor, top_k: int, rows: int | None = None) -> torch.Tensor:
    """The Triton kernel of ``scatter_rows`` on any device Triton runs on (the tests run it in Triton's
    CPU interpreter too)."""
    triton, _, _, kernel = _triton_kernels()
    x_TD, idx_A = x_TD.contiguous(), idx_A.contiguous()
    num_tokens, dim = x_TD.shape
    out_AD = x_TD.new_empty(rows or num_tokens * top_k, dim)
    block = min(1024, triton.next_power_of_2(dim))
    kernel[(num_tokens, triton.cdiv(dim, block))](x_TD, idx_A, out_AD, dim, K=top_k, BLOCK_D=block)
    return out_AD
