"""AdamW on low-precision parameters with float32 master weights, one pass per tensor.

DeepSpeed's ZeRO-1/2 bf16 path touches every parameter many times per step: the bf16 gradients are
copied into buckets, averaged, flattened, cast to a float32 partition, scaled for clipping, stepped
by AdamW, and the float32 result is cast back into the bf16 weights. Its cost scales with *total*
parameters, so an MoE with six times its active parameters pays it six times (benchmarks/NOTES.md:
~20 ms per billion parameters per step on an H200, against ~6 ms for the traffic AdamW needs).

``MasterAdamW`` keeps, per parameter, a float32 master copy and the two moments in its state. Its
step reads each bf16 gradient once, updates master and moments, and writes the bf16 weight, in one
Triton kernel per tensor on CUDA (28 bytes per parameter); the gradient clipping
factor is computed on the device from one multi-tensor norm and applied inside that kernel, so the
step has no host sync. Elsewhere the same arithmetic runs as PyTorch ops (the reference the GPU
tests compare with). The update is exactly ``torch.optim.AdamW``'s on the master weights.

``moment_dtype=torch.bfloat16`` stores the two moments in bf16, as DeepSeek-V3 trained (its report:
AdamW's moments in BF16 "without observable performance degradation"): 20 instead of 28 bytes of
traffic per parameter per step and 4 bytes less memory per parameter. The arithmetic stays float32:
each step widens the stored moments, updates them and the master weight in float32, and rounds the
new moments to nearest bf16 when it stores them (the update itself uses the unrounded values).

The trainer uses it for bf16 training at ``zero_stage: 0`` (DeepSpeed then leaves dtypes and the
optimizer alone); every data-parallel rank holds the full optimizer state (no ZeRO sharding).
"""

from __future__ import annotations

import functools
import math

import torch

from moe_engine.moe.dispatch_kernels import triton_importable


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def adamw(master_ptr, m_ptr, v_ptr, g_ptr, p_ptr, scale_ptr, n, lr, beta1, beta2, eps, decay, step_size,
              bc2_sqrt, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(scale_ptr)
        w = tl.load(master_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = w * (1.0 - lr * decay)
        m = m + (1.0 - beta1) * (g - m)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        v = v * beta2 + (1.0 - beta2) * g * g
        w = w - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
        tl.store(master_ptr + offs, w, mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(p_ptr + offs, w.to(p_ptr.dtype.element_ty), mask=mask)

    return triton, adamw


_BLOCK = 2048
# A bf16 moment m decays as m * beta, which rounds back to m when 1 - beta is below half a bf16 ulp
# (2**-9 to 2**-8 of m): beta 0.999 would freeze it. 0.99 keeps a 2.5x margin.
BF16_MOMENT_MAX_BETA = 0.99


class MasterAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) over parameters of any floating dtype, with
    float32 master weights and moments stored in ``moment_dtype`` (float32 or bfloat16);
    ``max_grad_norm`` > 0 clips the global gradient norm first.

    ``last_grad_norm`` is the global norm of the gradients of the last step (a device tensor, before
    clipping), for a divergence check. ``fused=False`` (or no CUDA/Triton) runs the PyTorch ops."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 max_grad_norm: float = 0.0, fused: bool = True, moment_dtype: torch.dtype = torch.float32):
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0 or max_grad_norm < 0:
            raise ValueError(f"invalid MasterAdamW settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}, max_grad_norm={max_grad_norm}")
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"MasterAdamW stores moments as torch.float32 or torch.bfloat16, not {moment_dtype}")
        if moment_dtype == torch.bfloat16 and max(betas) > BF16_MOMENT_MAX_BETA:
            raise ValueError(f"bf16 moments with betas {tuple(betas)}: a bf16 value rounds away a decay of less than "
                             f"1/256 of itself, so a moment would stop decaying; use betas <= {BF16_MOMENT_MAX_BETA} "
                             "or float32 moments")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype
        self.max_grad_norm = max_grad_norm
        self.fused = fused
        self.last_grad_norm: torch.Tensor | None = None

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the master weights stay float32 and the moments ``moment_dtype`` (torch casts
        floating state to each parameter's dtype, which would round them to bf16)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for key, dtype in (("master", torch.float32), ("exp_avg", self.moment_dtype), ("exp_avg_sq", self.moment_dtype)):
                if saved[key].dtype != dtype:
                    raise ValueError(f"this optimizer state holds {key} as {saved[key].dtype}, but the optimizer "
                                     f"keeps it as {dtype}: resume with the moment dtype the run was saved with")
                state[key] = saved[key].to(device=p.device, copy=True)
            state["step"] = saved["step"].to(device="cpu", dtype=torch.float64, copy=True)

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)  # on the CPU: bias corrections need no sync
            state["master"] = p.detach().to(torch.float32, copy=True)
            state["exp_avg"] = torch.zeros_like(state["master"], dtype=self.moment_dtype)
            state["exp_avg_sq"] = torch.zeros_like(state["master"], dtype=self.moment_dtype)
        return state

    @torch.no_grad()
    def clip_scale(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """The factor every gradient is multiplied by (a device scalar), and ``last_grad_norm``."""
        if not grads:
            self.last_grad_norm = None
            return None
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(norms))
        self.last_grad_norm = total
        if self.max_grad_norm > 0:
            return (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
        return torch.ones((), device=total.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        scale = self.clip_scale([p.grad for p in params])
        if scale is None:
            return loss
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                t = state["step"].item()
                bc2_sqrt = math.sqrt(1.0 - beta2**t)
                step_size = lr / (1.0 - beta1**t)
                if self._use_kernel(p):
                    self._fused_update(p, state, scale, lr, beta1, beta2, eps, decay, step_size, bc2_sqrt)
                else:
                    self._reference_update(p, state, scale, lr, beta1, beta2, eps, decay, step_size, bc2_sqrt)
        return loss

    def _use_kernel(self, p: torch.Tensor) -> bool:
        return self.fused and p.is_cuda and p.is_contiguous() and p.grad.is_contiguous() and triton_importable()

    @staticmethod
    def _reference_update(p, state, scale, lr, beta1, beta2, eps, decay, step_size, bc2_sqrt):
        w = state["master"]
        m, v = state["exp_avg"].to(torch.float32), state["exp_avg_sq"].to(torch.float32)  # the same tensors when float32
        g = p.grad.to(torch.float32) * scale
        w.mul_(1.0 - lr * decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        w.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-step_size)
        if m is not state["exp_avg"]:  # bf16 moments: stored rounded to nearest, after the update used them
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)
        p.copy_(w)

    @staticmethod
    def _fused_update(p, state, scale, lr, beta1, beta2, eps, decay, step_size, bc2_sqrt):
        triton, kernel = _kernel()
        n = p.numel()
        kernel[(triton.cdiv(n, _BLOCK),)](
            state["master"], state["exp_avg"], state["exp_avg_sq"], p.grad, p, scale.reshape(1), n,
            lr, beta1, beta2, eps, decay, step_size, bc2_sqrt, BLOCK=_BLOCK,
        )


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters to ``dtype`` in place; buffers (rotary frequencies, router biases) keep theirs, as
    DeepSpeed's own bf16 cast does."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
