"""Grouped GEMMs that gather their row operand through an index (Triton, CUDA): the kernels of the
gather-fused study in ``gather_gemm.py``. Shape legend in ``moe_engine/moe/routing.py``; N and K are a
GEMM's output and contraction widths.

A study, not engine code: on an H200 these kernels lose to torch's cutlass grouped GEMM on a gathered
copy (benchmarks/NOTES.md, fifth session), so the MoE layer keeps its materialised gather.

The dispatch materialises ``x_AD = x_TD[token_A]`` before the grouped GEMM, and the combine's
backward materialises ``grad_y_AD`` from ``grad_TD``: two [A, D] tensors written once and read
once or twice. These kernels read the rows straight from the [T, D] source instead:

    gather_mm:     out_AN[r]   = src[rows[r]] @ w_E..[e(r)]      (rows sorted by expert, groups
                                                                  given by ``offsets_E`` ends)
    gather_wgrad:  out_ENK[e]  = sum_{r in e} g[g_rows[r]]^T x[x_rows[r]]

``rows`` may be None (the identity). ``w`` is read through strides, so ``w`` [E, N, K] (a linear's
weight, out = src @ w^T) and [E, K, N] (its transpose, for the input gradient) need no copy. Rows
past the last group are not written. The PyTorch formulas below are the reference the tests
(tests/benchmarks/test_gather_gemm.py) compare the kernels with.
"""

from __future__ import annotations

import functools

import torch


def gather_mm_reference(src, rows, w, offsets_E, transpose_w: bool):
    """out[r] = src[rows[r]] @ (w[e]^T if transpose_w else w[e]) for r in group e; zero elsewhere."""
    a = src if rows is None else src.index_select(0, rows)
    ends = offsets_E.tolist()
    n = w.shape[1] if transpose_w else w.shape[2]
    out = a.new_zeros(a.shape[0], n)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            we = w[e].t() if transpose_w else w[e]
            out[start:end] = (a[start:end].to(torch.float32) @ we.to(torch.float32)).to(out.dtype)
        start = end
    return out


def gather_wgrad_reference(g, g_rows, x, x_rows, offsets_E):
    ga = g if g_rows is None else g.index_select(0, g_rows)
    xa = x if x_rows is None else x.index_select(0, x_rows)
    ends = offsets_E.tolist()
    out = g.new_zeros(len(ends), g.shape[1], x.shape[1])
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[e] = (ga[start:end].to(torch.float32).t() @ xa[start:end].to(torch.float32)).to(out.dtype)
        start = end
    return out


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_mm_kernel(src_ptr, rows_ptr, w_ptr, out_ptr, offs_ptr, E, N, K, num_m,
                         stride_src, stride_we, stride_wn, stride_wk, stride_out,
                         GATHER: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        # which group M tile pid_m belongs to: groups take cdiv(rows, BLOCK_M) tiles each, in order
        e_idx = tl.arange(0, BLOCK_E)
        ends = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
        starts = tl.load(offs_ptr + e_idx - 1, mask=(e_idx > 0) & (e_idx < E), other=0)
        tiles = (tl.where(e_idx < E, ends - starts, 0) + BLOCK_M - 1) // BLOCK_M
        tile_end = tl.cumsum(tiles, 0)
        e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
        here = e_idx == e
        row0 = tl.sum(tl.where(here, starts, 0), 0) + (pid_m - tl.sum(tl.where(here, tile_end - tiles, 0), 0)) * BLOCK_M
        row_end = tl.sum(tl.where(here, ends, 0), 0)
        if e >= E:
            return
        rm = row0 + tl.arange(0, BLOCK_M)
        row_mask = rm < row_end
        if GATHER:
            src_rows = tl.load(rows_ptr + rm, mask=row_mask, other=0).to(tl.int64)
        else:
            src_rows = rm.to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = src_ptr + src_rows[:, None] * stride_src + rk[None, :]
        b_ptrs = w_ptr + e.to(tl.int64) * stride_we + rn[None, :] * stride_wn + rk[:, None] * stride_wk
        n_mask = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):  # K % BLOCK_K == 0 (checked by the caller)
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_wk
        out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_out + rn[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])

    @triton.jit
    def gather_wgrad_kernel(g_ptr, g_rows_ptr, x_ptr, x_rows_ptr, out_ptr, offs_ptr, N, K,
                            stride_g, stride_x, GATHER_G: tl.constexpr, GATHER_X: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        e = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        end = tl.load(offs_ptr + e)
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        n_mask = rn < N
        k_mask = rk < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_mask = rr < end
            if GATHER_G:
                g_rows = tl.load(g_rows_ptr + rr, mask=r_mask, other=0).to(tl.int64)
            else:
                g_rows = rr.to(tl.int64)
            if GATHER_X:
                x_rows = tl.load(x_rows_ptr + rr, mask=r_mask, other=0).to(tl.int64)
            else:
                x_rows = rr.to(tl.int64)
            g = tl.load(g_ptr + g_rows[:, None] * stride_g + rn[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            x = tl.load(x_ptr + x_rows[:, None] * stride_x + rk[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(tl.trans(g), x, acc)
        out_ptrs = out_ptr + e.to(tl.int64) * N * K + rn[:, None] * K + rk[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])

    return triton, gather_mm_kernel, gather_wgrad_kernel


# Tile settings per call site (chosen on an H200; benchmarks/gather_gemm.py sweeps them).
MM_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
WGRAD_CONFIG = dict(BLOCK_N=128, BLOCK_K=128, BLOCK_R=64, num_warps=8, num_stages=3)


def gather_mm(src, rows, w, offsets_E, transpose_w: bool, num_rows: int | None = None, config: dict | None = None):
    """``gather_mm_reference`` as one Triton kernel (CUDA). ``num_rows`` is A (default: len(rows))."""
    triton, kernel, _ = _kernels()
    cfg = dict(MM_CONFIG, **(config or {}))
    num_rows = (rows.numel() if rows is not None else src.shape[0]) if num_rows is None else num_rows
    E = w.shape[0]
    if transpose_w:  # w [E, N, K]: out = a @ w[e]^T
        N, K = w.shape[1], w.shape[2]
        stride_wn, stride_wk = w.stride(1), w.stride(2)
    else:  # w [E, K, N]
        K, N = w.shape[1], w.shape[2]
        stride_wn, stride_wk = w.stride(2), w.stride(1)
    assert K % cfg["BLOCK_K"] == 0 and src.stride(-1) == 1 and src.shape[-1] == K
    out = src.new_empty(num_rows, N)
    num_m = triton.cdiv(num_rows, cfg["BLOCK_M"]) + E
    grid = (num_m * triton.cdiv(N, cfg["BLOCK_N"]),)
    kernel[grid](src, rows if rows is not None else offsets_E, w, out, offsets_E, E, N, K, num_m,
                 src.stride(0), w.stride(0), stride_wn, stride_wk, out.stride(0),
                 GATHER=rows is not None, BLOCK_E=triton.next_power_of_2(E), **cfg)
    return out


def gather_wgrad(g, g_rows, x, x_rows, offsets_E, config: dict | None = None):
    triton, _, kernel = _kernels()
    cfg = dict(WGRAD_CONFIG, **(config or {}))
    E, N, K = offsets_E.numel(), g.shape[1], x.shape[1]
    out = g.new_empty(E, N, K)
    grid = (E, triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]))
    dummy = offsets_E
    kernel[grid](g, g_rows if g_rows is not None else dummy, x, x_rows if x_rows is not None else dummy, out,
                 offsets_E, N, K, g.stride(0), x.stride(0), GATHER_G=g_rows is not None, GATHER_X=x_rows is not None, **cfg)
    return out
