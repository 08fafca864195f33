"""The small-batch decode path: only the selected experts' weights are read. Shape legend in
``routing.py``; H is the expert's input-projection width (2F when gated).

    out_TD[t] = sum_k w_TK[t, k] * down_e(act(gate_e(x_t)) * up_e(x_t)),   e = idx_TK[t, k]

At decode a layer sees a handful of tokens, so it is bound by reading expert weights and by kernel
launches, not by arithmetic. The training path (sort, permute, grouped GEMM, SwiGLU, combine) issues
~15 kernels whose cost does not shrink with the batch; here, on CUDA with Triton, the experts are three
kernels with no host synchronisation (so a whole decode step can be captured in a CUDA graph):

    1. ``expert_rows`` over [experts x output blocks]: each program loads one block of one expert's
       ``gate_up`` rows once and multiplies it with every assignment routed to that expert (an expert
       no token chose returns at once, reading nothing), with the activation (SwiGLU) fused;
    2. the same kernel for ``down``;
    3. a weighted sum of each token's K rows in float32 (as the training path combines).
Unlike transformers' ``batched_mm`` (which gathers a copy of every selected expert's weights per
token), no weight is copied, and an expert chosen by several tokens is read once per block of
``BLOCK_ASSIGNMENTS`` assignments. Elsewhere (CPU, float64, no Triton) the same function is computed as a
gathered-weight batched GEMM, which is also the reference the GPU tests compare against.

Under ``torch.compile`` the whole computation is one custom op (``moe_engine::decode_experts``), a
single opaque node with a known output shape; eager calls skip the op dispatcher. It has no autograd formula; ``decode_experts`` uses the
differentiable gathered formula whenever a gradient is needed.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from moe_engine.moe.dispatch_kernels import triton_importable
from moe_engine.moe.experts import _ACTIVATIONS

# The kernels read an expert's weights once per block of this many assignments.
BLOCK_ASSIGNMENTS = 64

# activation name -> code inside the kernel (the names the engine's ``activation()`` knows)
_ACT_CODES = {"silu": 0, "swish": 0, "gelu": 1, "gelu_new": 2, "relu": 3}
IDENTITY = 4


def worth_it(num_assignments: int, num_experts: int) -> bool:
    """Whether the decode path beats the grouped path for a forward (the layer's "auto" mode). Measured
    per layer in CUDA graphs on an H200 (benchmarks/results/decode_h200.json, "crossover"): it wins up
    to one block of assignments (1.4-2.1x at 1-32 tokens with top-2 of 8 experts); past that an expert
    is read once per block, which pays only while experts outnumber assignments (fine-grained MoEs:
    128 experts, top-8, 16 tokens: 281 vs 338 us; 32 tokens: 533 vs 473 us)."""
    return num_assignments <= BLOCK_ASSIGNMENTS or num_assignments <= num_experts


def activation_name(act: Callable) -> str | None:
    """The registered name of an activation callable, or None for a callable the op cannot name."""
    for name, fn in _ACTIVATIONS.items():
        if fn is act:
            return name
    return None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def gathered_experts(x_TD, idx_TK, weight_TK, w_in_EHD, w_out_EDF, gated: bool, act: Callable) -> torch.Tensor:
    """Gathered-weight batched GEMM (transformers' ``batched_mm`` formulation): differentiable, any
    device and dtype; the reference of the fused kernels."""
    num_tokens, top_k = idx_TK.shape
    idx_A = idx_TK.reshape(-1)
    x_AD = x_TD.repeat_interleave(top_k, dim=0)
    h_AH = torch.bmm(w_in_EHD.index_select(0, idx_A), x_AD.unsqueeze(-1)).squeeze(-1)
    if gated:
        gate_AF, up_AF = h_AH.chunk(2, dim=-1)
        h_AF = act(gate_AF) * up_AF
    else:
        h_AF = act(h_AH)
    y_AD = torch.bmm(w_out_EDF.index_select(0, idx_A), h_AF.unsqueeze(-1)).squeeze(-1)
    acc = _acc(y_AD.dtype)
    y_TKD = y_AD.view(num_tokens, top_k, -1).to(acc)
    return (y_TKD * weight_TK.to(acc)[..., None]).sum(1).to(x_TD.dtype)


# ----------------------------------------------------------------------------- Triton kernels
@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def expert_rows(
        src_ptr, idx_ptr, w_ptr, out_ptr,
        A, N, KD, stride_src, stride_we, stride_wn, stride_out,
        ROW_DIV: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[a, n] = act(src[a // ROW_DIV] . w[e, n]) (* src . w[e, N + n] when gated) for every
        assignment a with idx[a] == e. Program (i, j): e = idx[i] if i is e's first assignment (else it
        returns at once), rows n of block j. So only chosen experts get programs, each reads its block
        of weights once per BLOCK_A assignments."""
        first = tl.program_id(0)
        e = tl.load(idx_ptr + first)
        earlier = 0
        for a0 in range(0, first, BLOCK_A):
            offs_a = a0 + tl.arange(0, BLOCK_A)
            ids = tl.load(idx_ptr + offs_a, mask=offs_a < first, other=-1)
            earlier += tl.sum((ids == e).to(tl.int32), axis=0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        w_rows = w_ptr + e.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
        start = first - first % BLOCK_A  # no earlier block holds e
        stop = tl.where(earlier == 0, A, start)  # a later assignment of e: nothing to do
        for a0 in range(start, stop, BLOCK_A):
            offs_a = a0 + tl.arange(0, BLOCK_A)
            ids = tl.load(idx_ptr + offs_a, mask=offs_a < A, other=-1)
            sel = ids == e
            if tl.max(sel.to(tl.int32), axis=0) > 0:
                src_rows = src_ptr + (offs_a // ROW_DIV)[:, None].to(tl.int64) * stride_src
                acc = tl.zeros((BLOCK_A, BLOCK_N), dtype=tl.float32)
                acc_up = tl.zeros((BLOCK_A, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, KD, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = offs_k < KD
                    xs = tl.load(src_rows + offs_k[None, :], mask=sel[:, None] & k_ok[None, :], other=0.0)
                    wt = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                    if IEEE:
                        acc = tl.dot(xs, tl.trans(wt), acc, input_precision="ieee")
                    else:
                        acc = tl.dot(xs, tl.trans(wt), acc)
                    if GATED:
                        wu = tl.load(w_rows + N * stride_wn + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                        if IEEE:
                            acc_up = tl.dot(xs, tl.trans(wu), acc_up, input_precision="ieee")
                        else:
                            acc_up = tl.dot(xs, tl.trans(wu), acc_up)
                # the activation, inline (the interpreter and closures: no nested jit helpers)
                if ACT == 0:  # silu
                    h = acc * tl.sigmoid(acc)
                elif ACT == 1:  # gelu (erf)
                    h = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
                elif ACT == 2:  # gelu, tanh approximation: 0.5 (1 + tanh z) = sigmoid(2z)
                    h = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
                elif ACT == 3:  # relu
                    h = tl.maximum(acc, 0.0)
                else:
                    h = acc
                if GATED:
                    h = h * acc_up
                out = out_ptr + offs_a[:, None].to(tl.int64) * stride_out + offs_n[None, :]
                tl.store(out, h.to(out_ptr.dtype.element_ty), mask=sel[:, None] & n_ok[None, :])

    @triton.jit
    def combine(y_ptr, w_ptr, out_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = offs < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k in tl.static_range(K):
            w = tl.load(w_ptr + t * K + k).to(tl.float32)
            acc += w * tl.load(y_ptr + (t * K + k) * D + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * D + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)

    return triton, expert_rows, combine


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_n(active_experts: int, rows: int, sms: int) -> int:
    """The widest block of weight rows that still gives every SM a few programs: at batch 1 only K
    experts are active, and a memory-bound kernel needs many loads in flight."""
    for block in (64, 32):
        if active_experts * -(-rows // block) >= 2 * sms:
            return block
    return 16


def fused_experts(x_TD, idx_TK, weight_TK, w_in_EHD, w_out_EDF, gated: bool, act: str, sms: int | None = None) -> torch.Tensor:
    """The three-kernel Triton path (any device Triton runs on; ``sms`` sizes the blocks)."""
    triton, expert_rows, combine = _kernels()
    num_tokens, top_k = idx_TK.shape
    num_experts, width, dim = w_in_EHD.shape
    ffn = width // 2 if gated else width
    num_assign = num_tokens * top_k
    x_TD = x_TD.contiguous()
    idx_A = idx_TK.reshape(-1).contiguous()
    w_in_EHD, w_out_EDF = w_in_EHD.contiguous(), w_out_EDF.contiguous()
    if sms is None:
        sms = _num_sms(x_TD.device.index or 0) if x_TD.is_cuda else 8
    active = min(num_assign, num_experts)
    block_a = min(BLOCK_ASSIGNMENTS, max(16, triton.next_power_of_2(num_assign)))
    ieee = x_TD.dtype == torch.float32
    common = dict(IEEE=ieee, BLOCK_A=block_a, BLOCK_K=64 if ieee else 128, num_warps=4, num_stages=3)

    h_AF = x_TD.new_empty(num_assign, ffn)
    block = _block_n(active, ffn, sms)
    expert_rows[(num_assign, triton.cdiv(ffn, block))](
        x_TD, idx_A, w_in_EHD, h_AF, num_assign, ffn, dim, x_TD.stride(0), w_in_EHD.stride(0), w_in_EHD.stride(1),
        h_AF.stride(0), ROW_DIV=top_k, GATED=gated, ACT=_ACT_CODES[act], BLOCK_N=block, **common,
    )
    y_AD = x_TD.new_empty(num_assign, dim)
    block = _block_n(active, dim, sms)
    expert_rows[(num_assign, triton.cdiv(dim, block))](
        h_AF, idx_A, w_out_EDF, y_AD, num_assign, dim, ffn, h_AF.stride(0), w_out_EDF.stride(0), w_out_EDF.stride(1),
        y_AD.stride(0), ROW_DIV=1, GATED=False, ACT=IDENTITY, BLOCK_N=block, **common,
    )
    out_TD = torch.empty_like(x_TD)
    block_d = min(1024, triton.next_power_of_2(dim))
    combine[(num_tokens, triton.cdiv(dim, block_d))](y_AD, weight_TK.contiguous(), out_TD, dim, K=top_k, BLOCK_D=block_d)
    return out_TD


def _use_kernels(x_TD: torch.Tensor, w_in_EHD: torch.Tensor) -> bool:
    return (
        x_TD.is_cuda
        and x_TD.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and w_in_EHD.dtype == x_TD.dtype
        and triton_importable()
    )


def _decode_experts_impl(x_TD, idx_TK, weight_TK, w_in_EHD, w_out_EDF, gated: bool, act: str) -> torch.Tensor:
    if _use_kernels(x_TD, w_in_EHD):
        return fused_experts(x_TD, idx_TK, weight_TK, w_in_EHD, w_out_EDF, gated, act)
    return gathered_experts(x_TD, idx_TK, weight_TK, w_in_EHD, w_out_EDF, gated, _ACTIVATIONS[act])


@torch.library.custom_op("moe_engine::decode_experts", mutates_args=())
def _decode_experts_op(
    x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor, w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor, gated: bool, act: str,
) -> torch.Tensor:
    return _decode_experts_impl(x_TD, idx_TK, weight_TK, w_in_EHD, w_out_EDF, gated, act)


@_decode_experts_op.register_fake
def _(x_TD, idx_TK, weight_TK, w_in_EHD, w_out_EDF, gated, act):
    return torch.empty_like(x_TD)


def decode_experts(x_TD, idx_TK, weight_TK, w_in_EHD, w_out_EDF, gated: bool, act: Callable) -> torch.Tensor:
    """``out_TD`` of the routed experts for token-major routing ``idx_TK`` / ``weight_TK``, reading only
    the selected experts. Differentiable (through the gathered formula) when a gradient is needed."""
    name = activation_name(act)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, weight_TK, w_in_EHD, w_out_EDF))
    if needs_grad or name is None:
        return gathered_experts(x_TD, idx_TK, weight_TK, w_in_EHD, w_out_EDF, gated, act)
    if torch.compiler.is_compiling():  # one opaque node for dynamo; eager skips the op dispatcher's overhead
        return _decode_experts_op(x_TD, idx_TK, weight_TK, w_in_EHD, w_out_EDF, gated, name)
    return _decode_experts_impl(x_TD, idx_TK, weight_TK, w_in_EHD, w_out_EDF, gated, name)
