"""Fused top-k softmax routing: one Triton kernel forward, one backward. Shape legend in ``routing.py``.

From the router logits ``logits_TE`` one pass over each token's row computes what ``TopKRouter`` and
the balance and z-losses otherwise compute with ~25 small kernels forward and ~40 backward:

    probs_TE = softmax(logits_TE)                          (float32)
    topk_idx_TK, topk_w_TK = top-K of probs_TE             (renormalised to sum 1 if ``norm``)
    psum_E   = sum_t m_t * probs_TE[t]                     (the balance loss's P_e times its denominator)
    counts_E = sum_t m_t * [e in topk_idx_TK[t]]           (its f_e times the denominator; no gradient)
    zsq      = sum_t logsumexp(logits_TE[t])^2             (the z-loss times T)

with ``m_t`` the padding mask (1 where absent). Sums over tokens are per-block partials added in a
fixed order, so results are deterministic (no atomics). Ties in top-k go to the lower expert index.
The backward is the exact gradient of all differentiable outputs (probs, weights, psum, zsq) with
respect to the logits. Used on CUDA when Triton is importable (``usable``); elsewhere, and as the
reference the GPU tests compare against, the PyTorch router code runs.
"""

from __future__ import annotations

import functools

import torch

from moe_engine.moe.dispatch_kernels import triton_importable

FUSED = {"enabled": True, "monitor": True}  # benchmarks flip these to measure the unfused versions side by side
MAX_EXPERTS = 512


def usable(logits_TE: torch.Tensor, top_k: int) -> bool:
    return (
        FUSED["enabled"]
        and logits_TE.is_cuda
        and logits_TE.dim() == 2
        and logits_TE.shape[1] <= MAX_EXPERTS
        and top_k <= 32
        and logits_TE.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not torch.compiler.is_compiling()  # under compile Inductor fuses the PyTorch router itself
        and triton_importable()
    )


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(logits_ptr, mask_ptr, probs_ptr, idx_ptr, w_ptr, lse_ptr, psum_ptr, cnt_ptr, zsq_ptr, mon_ptr, T, E, stride,
            K: tl.constexpr, NORM: tl.constexpr, HAS_MASK: tl.constexpr, STATS: tl.constexpr, MONITOR: tl.constexpr,
            KSEL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        kcols = tl.arange(0, BLOCK_K)
        rmask = rows < T
        cmask = cols < E
        m2 = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(logits_ptr + rows64[:, None] * stride + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        x = tl.where(rmask[:, None], x, 0.0)  # rows past T: finite junk, never stored or counted
        mx = tl.max(x, axis=1)
        ex = tl.exp(x - mx[:, None])
        s = tl.sum(ex, axis=1)
        p = ex / s[:, None]
        lse = mx + tl.log(s)
        tl.store(probs_ptr + rows64[:, None] * E + cols[None, :], p, mask=m2)
        tl.store(lse_ptr + rows, lse, mask=rmask)
        work = tl.where(cmask[None, :], p, -1.0)
        top_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        top_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
        top1 = tl.zeros([BLOCK_T], dtype=tl.float32)
        top2 = tl.zeros([BLOCK_T], dtype=tl.float32)
        for k in tl.static_range(KSEL):  # KSEL = K, or 2 when the monitor needs the runner-up of a top-1 router
            best = tl.max(work, axis=1)
            if k == 0:
                top1 = best
            if k == 1:
                top2 = best
            if k < K:
                pick = tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_E), axis=1)  # lowest index of the max
                top_w = tl.where(kcols[None, :] == k, best[:, None], top_w)
                top_i = tl.where(kcols[None, :] == k, pick[:, None], top_i)
                work = tl.where(cols[None, :] == pick[:, None], -2.0, work)
        if NORM:
            top_w = top_w / tl.sum(top_w, axis=1)[:, None]
        km = rmask[:, None] & (kcols[None, :] < K)
        tl.store(idx_ptr + rows64[:, None] * K + kcols[None, :], top_i.to(tl.int64), mask=km)
        tl.store(w_ptr + rows64[:, None] * K + kcols[None, :], top_w.to(w_ptr.dtype.element_ty), mask=km)
        if STATS:
            if HAS_MASK:
                mt = tl.load(mask_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            else:
                mt = rmask.to(tl.float32)
            chosen = (work == -2.0).to(tl.float32)
            tl.store(psum_ptr + pid * E + cols, tl.sum(p * mt[:, None], axis=0), mask=cmask)
            tl.store(cnt_ptr + pid * E + cols, tl.sum(chosen * mt[:, None], axis=0), mask=cmask)
            tl.store(zsq_ptr + pid, tl.sum(tl.where(rmask, lse * lse, 0.0), axis=0))
        if MONITOR:  # sums over every token for analytics.online.RouterMonitor: entropy, top-1, margin, lse^2, probs
            base = mon_ptr + pid * (4 + E)
            entropy = tl.sum(tl.where(m2 & (p > 0), -p * tl.log(p), 0.0), axis=1)
            margin = tl.where(E >= 2, top1 - top2, top1)
            tl.store(base, tl.sum(tl.where(rmask, entropy, 0.0), axis=0))
            tl.store(base + 1, tl.sum(tl.where(rmask, top1, 0.0), axis=0))
            tl.store(base + 2, tl.sum(tl.where(rmask, margin, 0.0), axis=0))
            tl.store(base + 3, tl.sum(tl.where(rmask, lse * lse, 0.0), axis=0))
            tl.store(base + 4 + cols, tl.sum(tl.where(m2, p, 0.0), axis=0), mask=cmask)

    @triton.jit
    def bwd(logits_ptr, lse_ptr, mask_ptr, idx_ptr, gw_ptr, gpsum_ptr, gprobs_ptr, gz_ptr, gl_ptr, T, E, stride,
            K: tl.constexpr, NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GW: tl.constexpr,
            HAS_GPSUM: tl.constexpr, HAS_GPROBS: tl.constexpr, HAS_GZ: tl.constexpr,
            BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < T
        cmask = cols < E
        m2 = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(logits_ptr + rows64[:, None] * stride + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        p = tl.where(m2, tl.exp(x - lse[:, None]), 0.0)
        g = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        if HAS_GPSUM:
            if HAS_MASK:
                mt = tl.load(mask_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            else:
                mt = rmask.to(tl.float32)
            g += mt[:, None] * tl.load(gpsum_ptr + cols, mask=cmask, other=0.0)[None, :]
        if HAS_GPROBS:
            g += tl.load(gprobs_ptr + rows64[:, None] * E + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_GW:
            g_top = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
            chosen = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
            s = tl.zeros([BLOCK_T], dtype=tl.float32)
            gp = tl.zeros([BLOCK_T], dtype=tl.float32)
            for k in tl.static_range(K):
                i_k = tl.load(idx_ptr + rows64 * K + k, mask=rmask, other=0).to(tl.int32)
                gw_k = tl.load(gw_ptr + rows64 * K + k, mask=rmask, other=0.0).to(tl.float32)
                sel = cols[None, :] == i_k[:, None]
                p_k = tl.sum(tl.where(sel, p, 0.0), axis=1)
                s += p_k
                gp += gw_k * p_k
                g_top = tl.where(sel, gw_k[:, None], g_top)
                chosen = chosen | sel
            s = tl.where(rmask, s, 1.0)  # rows past T
            if NORM:  # w_k = p_k / S:  dL/dp_j = (gw_j - sum_k gw_k w_k) / S  for chosen j
                g += tl.where(chosen, (g_top - (gp / s)[:, None]) / s[:, None], 0.0)
            else:
                g += g_top
        dot = tl.sum(p * g, axis=1)
        gl = p * (g - dot[:, None])
        if HAS_GZ:  # d lse^2 / d logits = 2 lse softmax
            gl += tl.load(gz_ptr) * 2.0 * lse[:, None] * p
        tl.store(gl_ptr + rows64[:, None] * E + cols[None, :], gl.to(gl_ptr.dtype.element_ty), mask=m2)

    return triton, fwd, bwd


def _blocks(num_experts: int, top_k: int) -> tuple[int, int, int]:
    import triton

    block_e = max(16, triton.next_power_of_2(num_experts))
    block_t = max(1, min(128, 4096 // block_e))
    return block_t, block_e, max(2, triton.next_power_of_2(top_k))


class _FusedTopKRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, mask_T, top_k, norm, stats, out_dtype, monitor):
        triton, fwd, _ = _kernels()
        logits_TE = logits_TE if logits_TE.stride(1) == 1 else logits_TE.contiguous()
        num_tokens, num_experts = logits_TE.shape
        block_t, block_e, block_k = _blocks(num_experts, top_k)
        grid = triton.cdiv(num_tokens, block_t)
        dev = logits_TE.device
        probs_TE = torch.empty(num_tokens, num_experts, device=dev, dtype=torch.float32)
        idx_TK = torch.empty(num_tokens, top_k, device=dev, dtype=torch.long)
        w_TK = torch.empty(num_tokens, top_k, device=dev, dtype=out_dtype)
        lse_T = torch.empty(num_tokens, device=dev, dtype=torch.float32)
        if stats:
            psum_GE = torch.empty(grid, num_experts, device=dev, dtype=torch.float32)
            cnt_GE = torch.empty_like(psum_GE)
            zsq_G = torch.empty(grid, device=dev, dtype=torch.float32)
        else:
            psum_GE = cnt_GE = zsq_G = lse_T  # unused pointers
        mask = mask_T if mask_T is not None else lse_T
        mon_G = torch.empty(grid, 4 + num_experts, device=dev, dtype=torch.float32) if monitor else lse_T
        fwd[(grid,)](logits_TE, mask, probs_TE, idx_TK, w_TK, lse_T, psum_GE, cnt_GE, zsq_G, mon_G, num_tokens, num_experts,
                     logits_TE.stride(0), K=top_k, NORM=norm, HAS_MASK=mask_T is not None, STATS=stats, MONITOR=monitor,
                     KSEL=max(top_k, 2) if monitor else top_k, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k)
        monitor_sums = mon_G.sum(0) if monitor else None
        if stats:
            psum_E, counts_E, zsq = psum_GE.sum(0), cnt_GE.sum(0), zsq_G.sum()
        else:
            psum_E = counts_E = zsq = None
        ctx.save_for_backward(logits_TE, lse_T, idx_TK, mask_T)
        ctx.top_k, ctx.norm = top_k, norm
        ctx.mark_non_differentiable(idx_TK, *(t for t in (counts_E, monitor_sums) if t is not None))
        ctx.set_materialize_grads(False)
        return probs_TE, idx_TK, w_TK, psum_E, counts_E, zsq, monitor_sums

    @staticmethod
    def backward(ctx, g_probs, _g_idx, g_w, g_psum, _g_counts, g_zsq, _g_monitor):
        triton, _, bwd = _kernels()
        logits_TE, lse_T, idx_TK, mask_T = ctx.saved_tensors
        num_tokens, num_experts = logits_TE.shape
        block_t, block_e, _ = _blocks(num_experts, ctx.top_k)
        grad_TE = torch.empty(num_tokens, num_experts, device=logits_TE.device, dtype=logits_TE.dtype)
        dummy = lse_T
        bwd[(triton.cdiv(num_tokens, block_t),)](
            logits_TE, lse_T, mask_T if mask_T is not None else dummy, idx_TK,
            g_w.contiguous() if g_w is not None else dummy, g_psum.contiguous() if g_psum is not None else dummy,
            g_probs.contiguous() if g_probs is not None else dummy, g_zsq.float().reshape(1) if g_zsq is not None else dummy,
            grad_TE, num_tokens, num_experts, logits_TE.stride(0), K=ctx.top_k, NORM=ctx.norm,
            HAS_MASK=mask_T is not None, HAS_GW=g_w is not None, HAS_GPSUM=g_psum is not None,
            HAS_GPROBS=g_probs is not None, HAS_GZ=g_zsq is not None, BLOCK_T=block_t, BLOCK_E=block_e,
        )
        return grad_TE, None, None, None, None, None, None


def topk_route(logits_TE: torch.Tensor, mask_T: torch.Tensor | None, top_k: int, norm: bool, stats: bool,
               out_dtype: torch.dtype, monitor: bool = False):
    """(probs_TE, topk_idx_TK, topk_w_TK, psum_E, counts_E, zsq, monitor_sums); psum, counts and zsq are None
    without ``stats``; ``monitor_sums`` [4 + E] (sums over all tokens of the probabilities' entropy, the top-1
    probability, its margin over the second, logsumexp^2, then the per-expert probability sums) None without
    ``monitor``."""
    mask = mask_T.reshape(-1).to(device=logits_TE.device, dtype=torch.float32) if mask_T is not None else None
    return _FusedTopKRoute.apply(logits_TE, mask, top_k, norm, stats, out_dtype, monitor)
