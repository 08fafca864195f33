"""Fused RMSNorm for the transformer blocks around the MoE layers (any model: MoE or dense).

transformers writes RMSNorm as eager ops: a cast to float32, ``pow``, ``mean``, ``rsqrt``, two
multiplies and a cast back, each a full pass over the [T, D] activation in float32, and about twice
as many in backward. On an H200 that is ~1 ms per norm per training step at 16k tokens x 2048, and a
decoder layer has two of them, OLMoE's and Qwen3's attention two more (q/k norms): 15-25% of a
small model's step (``benchmarks/NOTES.md``). The Triton kernels here read the input once and write
the output once in each direction, save only the input and one float32 per row for backward, and
reduce the weight gradient through per-program partial sums (deterministic: no atomics).

The function is transformers' own: ``weight * round(x * rsqrt(mean(x^2) + eps))`` with the mean in
float32 and ``round`` to the input dtype (the bf16 rounding of the normalised value that transformers
applies before the weight multiply is kept, so outputs differ from the eager module only by the order
of the float32 sum of squares). Gradients are computed in float32 from the unrounded value.

``fuse_rms_norms(model)`` switches every RMSNorm module of a model to the kernel where it can run (a
CUDA tensor whose dtype equals the weight's, not under ``torch.compile``) and leaves the module, its
parameter and its ``state_dict`` key as they are; elsewhere (CPU, export, mixed dtypes) the module's
own forward runs, so the CPU path is bit-for-bit the stock one. A module is fused only if it behaves
as the formula above on a probe input (so Gemma-style ``(1 + weight)`` norms, LayerNorms with a
mean or a bias, and anything unrecognised keep their own forward).
"""

from __future__ import annotations

import copy
import functools
import types

import torch
from torch import nn

MAX_BLOCK = 16384  # widest row one program holds in registers; wider norms keep their eager forward


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The formula of transformers' RMSNorm modules (Llama, Mixtral, OLMoE, Qwen, DeepSeek, Switch's
    T5-style norm) for an input of the weight's dtype."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, D, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        normed = (x * rstd[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)  # transformers rounds it first
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (normed * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def bwd(x_ptr, w_ptr, g_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, D, blocks_per_program,
            ROWS: tl.constexpr, BLOCK: tl.constexpr, WEIGHT_GRAD: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_ok = cols < D
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(blocks_per_program):
            rows = (pid.to(tl.int64) * blocks_per_program + i) * ROWS + tl.arange(0, ROWS)
            row_ok = rows < n_rows
            mask = row_ok[:, None] & col_ok[None, :]
            offs = rows[:, None] * D + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            normed = x * rstd[:, None]
            dn = g * w[None, :]
            # d/dx of x * rstd(x): rstd * (dn - normed * mean(dn * normed))
            dx = rstd[:, None] * (dn - normed * (tl.sum(dn * normed, axis=1) / D)[:, None])
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if WEIGHT_GRAD:  # the forward multiplied the weight by the rounded normalised value
                dw += tl.sum(g * normed.to(dx_ptr.dtype.element_ty).to(tl.float32), axis=0)
        if WEIGHT_GRAD:
            tl.store(dw_ptr + pid.to(tl.int64) * D + cols, dw, mask=col_ok)

    return triton, fwd, bwd


def _launch_shape(dim: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps): rows of ``dim`` columns, ~4k elements per program."""
    import triton

    block = triton.next_power_of_2(dim)
    rows = max(1, min(64, 4096 // block))
    elems = block * rows
    return block, rows, 4 if elems <= 2048 else 8 if elems <= 8192 else 16


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        triton, fwd, _ = _kernels()
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1]).contiguous()
        n_rows, dim = x_ND.shape
        block, rows, warps = _launch_shape(dim)
        y_ND = torch.empty_like(x_ND)
        rstd_N = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        fwd[(triton.cdiv(n_rows, rows),)](x_ND, weight, y_ND, rstd_N, n_rows, dim, eps, ROWS=rows, BLOCK=block,
                                          num_warps=warps)
        ctx.save_for_backward(x_ND, weight, rstd_N)
        ctx.shape = shape
        return y_ND.view(shape)

    @staticmethod
    def backward(ctx, grad_y):
        triton, _, bwd = _kernels()
        x_ND, weight, rstd_N = ctx.saved_tensors
        n_rows, dim = x_ND.shape
        g_ND = grad_y.reshape(n_rows, dim).contiguous()
        block, rows, warps = _launch_shape(dim)
        row_blocks = triton.cdiv(n_rows, rows)
        programs = min(row_blocks, 4 * torch.cuda.get_device_properties(x_ND.device).multi_processor_count)
        per_program = triton.cdiv(row_blocks, programs)
        programs = triton.cdiv(row_blocks, per_program)
        weight_grad = ctx.needs_input_grad[1]
        dx_ND = torch.empty_like(x_ND)
        dw_PD = torch.empty(programs if weight_grad else 1, dim, dtype=torch.float32, device=x_ND.device)
        bwd[(programs,)](x_ND, weight, g_ND, rstd_N, dx_ND, dw_PD, n_rows, dim, per_program, ROWS=rows, BLOCK=block,
                         WEIGHT_GRAD=weight_grad, num_warps=warps)
        dw = dw_PD.sum(0).to(weight.dtype) if weight_grad else None
        return dx_ND.view(ctx.shape), dw, None


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel runs for this call (else the module's own forward does)."""
    return (x.is_cuda and weight.is_cuda and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and weight.dim() == 1 and x.shape[-1] == weight.shape[0] and weight.shape[0] <= MAX_BLOCK
            and not torch.compiler.is_compiling() and triton_available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dimension: the Triton kernels where ``fusable``, else the reference formula."""
    if fusable(x, weight):
        return _FusedRMSNorm.apply(x, weight, float(eps))
    return rms_norm_reference(x, weight, eps)


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if fusable(hidden_states, self.weight):
        return _FusedRMSNorm.apply(hidden_states, self.weight, self._moe_lab_norm_eps)
    return type(self).forward(self, hidden_states)


def _behaves_as_rms_norm(module: nn.Module, eps: float) -> bool:
    """The module's own forward equals the formula on a probe: a copy of the module with a float32 CPU
    weight, so the check neither touches the module nor depends on where it lives (float32: some
    modules compute the mean of squares in float32 whatever the input's dtype)."""
    probe = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(0)
    weight = torch.rand(module.weight.shape[0], generator=gen, dtype=torch.float32) + 0.5
    probe.weight = nn.Parameter(weight, requires_grad=False)  # replaces the copy's parameter (same name)
    x = torch.randn(3, weight.shape[0], generator=gen, dtype=torch.float32) * 3
    try:
        with torch.no_grad():
            out = type(module).forward(probe, x)
    except Exception:  # noqa: BLE001 - a module that cannot run the probe is not ours to fuse
        return False
    return isinstance(out, torch.Tensor) and out.shape == x.shape and torch.allclose(out, rms_norm_reference(x, weight, eps),
                                                                                     rtol=1e-5, atol=1e-6)


def fuse_rms_norms(model: nn.Module) -> int:
    """Run every RMSNorm module of ``model`` on the fused kernels where they apply; returns how many.
    Idempotent; parameters, names and ``state_dict`` are untouched (only the forward changes)."""
    checked: dict[tuple[type, float], bool] = {}
    fused = 0
    for module in model.modules():
        if getattr(module, "_moe_lab_norm_eps", None) is not None:
            fused += 1
            continue
        weight, eps = getattr(module, "weight", None), _eps(module)
        if (eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1 or getattr(module, "bias", None) is not None
                or list(module.children()) or "norm" not in type(module).__name__.lower()):
            continue
        key = (type(module), eps)
        if key not in checked:
            checked[key] = _behaves_as_rms_norm(module, eps)
        if checked[key]:
            module._moe_lab_norm_eps = eps
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused
