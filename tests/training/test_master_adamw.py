"""MasterAdamW against torch's AdamW on float32 copies, its checkpoint round trip, and the trainer's
bf16 ZeRO-0 path that uses it. The Triton kernel runs on a CUDA GPU, or without one in Triton's CPU
interpreter (a subprocess: the interpreter must be on before Triton is first imported)."""

import copy
import importlib.util
import os
import re

import pytest
import torch

from moe_engine.training import master_adamw
from moe_engine.training.master_adamw import MasterAdamW

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernel_test = pytest.mark.skipif(not HAS_TRITON or (DEVICE == "cpu" and not INTERPRETED),
                                 reason="needs a CUDA GPU, or Triton's interpreter (test_kernel_in_triton_interpreter)")


def _params(device, dtype=torch.bfloat16):
    torch.manual_seed(0)
    shapes = [(33, 17), (5000,), (3, 7, 11)]  # 5000: several kernel blocks and a ragged tail
    return [torch.nn.Parameter((torch.randn(*s) * 0.5).to(device=device, dtype=dtype)) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=g) * (3.0 if step == 1 else 0.1)).to(p.device, p.dtype) for p in params]


def _groups(params):
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def _run_master(params, steps, max_grad_norm, fused, opt=None, start=1, moment_dtype=torch.float32):
    opt = opt or MasterAdamW(_groups(params), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=max_grad_norm,
                             fused=fused, moment_dtype=moment_dtype)
    for step in range(start, start + steps):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    return opt


@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_reference_path_is_torch_adamw_on_float32_masters_bitwise(max_grad_norm, moment_dtype):
    """Step for step the same floats as torch.optim.AdamW stepping float32 copies with the same clipped
    gradients, and the bf16 weights are the masters rounded. With bf16 moments, torch's AdamW has its
    moments rounded to bf16 after each of its steps (what storing them in bf16 means), and the state
    holds exactly those roundings."""
    params = _params("cpu")
    masters = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    ref = torch.optim.AdamW(_groups(masters), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    opt = MasterAdamW(_groups(params), lr=1e-2, betas=(0.9, 0.95), max_grad_norm=max_grad_norm, fused=False,
                      moment_dtype=moment_dtype)
    clipped = False
    for step in range(1, 6):
        grads = _grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
        scale = min(1.0, max_grad_norm / (norm.item() + 1e-6)) if max_grad_norm > 0 else 1.0
        clipped |= scale < 1.0
        for m, g in zip(masters, grads):
            m.grad = g.float() * torch.tensor(scale, dtype=torch.float32)
        ref.step()
        for m in masters:  # the reference's moments as bf16 storage would keep them (a no-op for float32)
            for key in ("exp_avg", "exp_avg_sq"):
                ref.state[m][key].copy_(ref.state[m][key].to(moment_dtype))
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-6, atol=0)
        for p, m in zip(params, masters):
            assert torch.equal(opt.state[p]["master"], m.detach())
            assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))
            for key in ("exp_avg", "exp_avg_sq"):
                assert opt.state[p][key].dtype == moment_dtype
                assert torch.equal(opt.state[p][key].float(), ref.state[m][key])
    assert clipped == (max_grad_norm > 0)  # the first step's large gradient is clipped when clipping is on


def test_state_dict_round_trip_keeps_float32_state_and_resumes_bitwise():
    straight = _params("cpu")
    _run_master(straight, 6, 1.0, fused=False)
    first = _params("cpu")
    opt = _run_master(first, 3, 1.0, fused=False)
    saved = copy.deepcopy(opt.state_dict())
    assert all(s["master"].dtype == torch.float32 for s in saved["state"].values())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    fresh = MasterAdamW(_groups(resumed), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=1.0, fused=False)
    fresh.load_state_dict(saved)
    assert all(fresh.state[p]["exp_avg_sq"].dtype == torch.float32 for p in resumed)  # torch would cast to bf16
    _run_master(resumed, 3, 1.0, fused=False, opt=fresh, start=4)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_bf16_moments_round_trip_and_a_mismatched_state_is_refused():
    straight = _params("cpu")
    _run_master(straight, 4, 1.0, fused=False, moment_dtype=torch.bfloat16)
    first = _params("cpu")
    opt = _run_master(first, 2, 1.0, fused=False, moment_dtype=torch.bfloat16)
    saved = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    fresh = MasterAdamW(_groups(resumed), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=1.0, fused=False,
                        moment_dtype=torch.bfloat16)
    fresh.load_state_dict(saved)
    assert {fresh.state[p][k].dtype for p in resumed for k in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}
    assert all(fresh.state[p]["master"].dtype == torch.float32 for p in resumed)
    _run_master(resumed, 2, 1.0, fused=False, opt=fresh, start=3)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    other = MasterAdamW(_groups([torch.nn.Parameter(p.detach().clone()) for p in first]), fused=False)  # float32 moments
    with pytest.raises(ValueError, match="exp_avg as torch.bfloat16.*moment dtype the run was saved with"):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match="float32 or torch.bfloat16"):
        MasterAdamW(_groups(first), moment_dtype=torch.float16)


def test_bf16_moments_refuse_betas_whose_decay_bf16_rounds_away():
    """m * 0.999 rounds back to m in bf16 for every m (the step is below half an ulp): with beta2 0.999 the
    second moment would never decay. The optimizer refuses such betas; 0.95 decays, as computed."""
    m = torch.tensor([1.0, 1.5, 1.99], dtype=torch.bfloat16)
    assert torch.equal((m.float() * 0.999).to(torch.bfloat16), m)
    assert (m.float() * 0.95).to(torch.bfloat16).lt(m).all()
    with pytest.raises(ValueError, match=r"betas \(0.9, 0.999\).*stop decaying"):
        MasterAdamW(_groups(_params("cpu")), betas=(0.9, 0.999), moment_dtype=torch.bfloat16)
    MasterAdamW(_groups(_params("cpu")), betas=(0.9, 0.999))  # float32 moments: fine


@pytest.mark.skipif(not HAS_TRITON or DEVICE == "cuda" or INTERPRETED, reason="the kernel runs directly here")
def test_kernel_in_triton_interpreter(run_in_triton_interpreter):
    summary = run_in_triton_interpreter(__file__, "kernel")
    assert re.search(r"\b4 passed, 1 skipped\b", summary), summary


@kernel_test
@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_kernel_matches_the_reference_path(max_grad_norm, moment_dtype, monkeypatch):
    if DEVICE == "cpu":  # the interpreter runs the kernel on CPU tensors
        monkeypatch.setattr(MasterAdamW, "_use_kernel", lambda self, p: True)
    master_adamw._kernel.cache_clear()
    fused_params, ref_params = _params(DEVICE), _params(DEVICE)
    fused = ref = None
    for step in range(1, 5):  # step by step, so each step is compared from the same state
        fused = _run_master(fused_params, 1, max_grad_norm, fused=True, opt=fused, start=step, moment_dtype=moment_dtype)
        ref = _run_master(ref_params, 1, max_grad_norm, fused=False, opt=ref, start=step, moment_dtype=moment_dtype)
        for a, b in zip(fused_params, ref_params):
            sa, sb = fused.state[a], ref.state[b]
            torch.testing.assert_close(sa["master"], sb["master"], rtol=1e-6, atol=1e-7)
            for key in ("exp_avg", "exp_avg_sq"):
                assert sa[key].dtype == moment_dtype
                if moment_dtype == torch.float32:
                    torch.testing.assert_close(sa[key], sb[key], rtol=1e-6, atol=1e-7)
                else:  # the same float32 value rounded to bf16, or (a float32 ulp apart at a rounding boundary) its neighbour
                    torch.testing.assert_close(sa[key].float(), sb[key].float(), rtol=2 ** -7, atol=1e-30)
            if DEVICE == "cuda":  # the kernel rounds to nearest like torch; the CPU interpreter truncates
                assert torch.equal(a.detach(), sa["master"].to(a.dtype))
            if moment_dtype != torch.float32:  # a 1-ulp moment flip would otherwise grow over the next steps
                for key in ("master", "exp_avg", "exp_avg_sq"):
                    sa[key].copy_(sb[key])
                a.data.copy_(b.detach())
