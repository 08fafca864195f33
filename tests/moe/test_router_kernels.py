"""The fused top-k routing kernel against float64 PyTorch math and against the unfused router.

Runs on a CUDA GPU. Without one, where Triton is installed, the module runs again in a subprocess
under Triton's CPU interpreter (which must be switched on before Triton is first imported); skipped
where Triton is absent."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_engine.moe import router_kernels as rk
from moe_engine.moe.losses import load_balancing_loss, router_z_loss
from moe_engine.moe.router import RouterConfig

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernel_test = pytest.mark.skipif(not HAS_TRITON or (DEVICE == "cpu" and not INTERPRETED),
                                 reason="needs a CUDA GPU, or Triton's interpreter (test_in_triton_interpreter)")


@pytest.mark.skipif(not HAS_TRITON or DEVICE == "cuda" or INTERPRETED, reason="the kernels run directly here")
def test_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("COVERAGE_PROCESS_START", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__],
                         env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert re.search(r"\b13 passed, 2 skipped\b", summary), summary  # every kernel test ran; skipped: this one and the CUDA-only layer test


@pytest.fixture(autouse=True)
def fresh_kernels():
    rk._kernels.cache_clear()
    yield
    rk._kernels.cache_clear()


def _reference(logits_TE, mask_T, top_k, norm):
    probs_TE = logits_TE.softmax(-1)
    w_TK, idx_TK = probs_TE.topk(top_k, dim=-1)
    if norm:
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    return probs_TE, idx_TK, w_TK, load_balancing_loss(probs_TE, idx_TK, logits_TE.shape[1], mask_T).double(), \
        router_z_loss(logits_TE).double()


@kernel_test
@pytest.mark.parametrize("T,E,K,norm,masked", [(37, 8, 2, True, False), (50, 128, 8, True, True),
                                               (33, 64, 8, False, False), (20, 32, 1, False, True), (9, 5, 3, True, False)])
def test_outputs_and_gradients_match_float64(T, E, K, norm, masked):
    torch.manual_seed(T)
    logits = 2 * torch.randn(T, E, device=DEVICE)
    mask = torch.rand(T, device=DEVICE) > 0.3 if masked else None
    fused_in = logits.clone().requires_grad_(True)
    probs, idx, w, psum, counts, zsq, _ = rk.topk_route(fused_in, mask, K, norm, True, torch.float32)
    ref_in = logits.double().clone().requires_grad_(True)
    ref_probs, ref_idx, ref_w, ref_balance, ref_z = _reference(ref_in, mask, K, norm)

    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs.double(), ref_probs, atol=1e-6, rtol=1e-5)
    den = float(T) if mask is None else mask.float().sum().clamp_min(1)
    balance = E * torch.sum((counts / den) * (psum / den))
    torch.testing.assert_close(balance.double(), ref_balance, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((zsq / T).double(), ref_z, atol=1e-4, rtol=1e-5)

    g_w, g_probs = torch.randn(T, K, device=DEVICE), torch.randn(T, E, device=DEVICE)
    ((w * g_w).sum() + 0.3 * balance + 0.7 * zsq / T + (probs * g_probs).sum()).backward()
    ((ref_w * g_w.double()).sum() + 0.3 * ref_balance + 0.7 * ref_z + (ref_probs * g_probs.double()).sum()).backward()
    torch.testing.assert_close(fused_in.grad.double(), ref_in.grad, atol=1e-5, rtol=1e-4)


@kernel_test
def test_only_the_weights_carry_gradient_without_stats():
    logits = torch.randn(40, 16, device=DEVICE)
    a = logits.clone().requires_grad_(True)
    _, _, w, psum, counts, zsq, monitor = rk.topk_route(a, None, 4, True, False, torch.float32)
    assert psum is None and counts is None and zsq is None and monitor is None
    g = torch.randn_like(w)
    (w * g).sum().backward()
    b = logits.double().clone().requires_grad_(True)
    (_reference(b, None, 4, True)[2] * g.double()).sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-6, rtol=1e-5)


@kernel_test
def test_ties_go_to_the_lower_expert_index():
    logits = torch.zeros(4, 8, device=DEVICE)
    logits[:, 5] = 1.0
    _, idx, w, *_ = rk.topk_route(logits, None, 3, False, False, torch.float32)
    assert idx.tolist() == [[5, 0, 1]] * 4
    assert torch.all(w[:, 1] == w[:, 2])


@kernel_test
@pytest.mark.parametrize("norm", [True, False])
def test_fused_router_equals_the_pytorch_router(norm, monkeypatch):
    """TopKRouter's fused path gives the unfused path's routing, aux losses and gradients."""
    torch.manual_seed(0)
    rc = RouterConfig(kind="topk", num_experts=16, top_k=4, norm_topk_prob=norm, aux_loss_coef=0.02, z_loss_coef=0.003)
    router = rc.build(32).to(DEVICE)
    x = torch.randn(64, 32, device=DEVICE)
    mask = torch.rand(64, device=DEVICE) > 0.2
    results = []
    for fused in (True, False):
        router.zero_grad()
        router.token_mask_T = mask
        x_in = x.clone().requires_grad_(True)
        if fused:
            routing = router.fused_route(router.logits(x_in), x.dtype)
        else:
            monkeypatch.setitem(rk.FUSED, "enabled", False)  # the PyTorch router, also on a GPU
            routing = router.route(x_in)
        loss = (routing.weight_A * torch.arange(routing.weight_A.numel(), device=DEVICE)).sum() + sum(routing.aux_losses.values())
        loss.backward()
        results.append((routing, {k: v.item() for k, v in routing.aux_losses.items()}, x_in.grad, router.weight.grad.clone()))
    (r_f, aux_f, gx_f, gw_f), (r_u, aux_u, gx_u, gw_u) = results
    assert torch.equal(r_f.expert_idx_A, r_u.expert_idx_A)
    torch.testing.assert_close(r_f.weight_A, r_u.weight_A)
    assert aux_f.keys() == aux_u.keys() == {"load_balancing_loss", "router_z_loss"}
    for key in aux_f:
        assert aux_f[key] == pytest.approx(aux_u[key], rel=1e-5)
    for fused_grad, grad in ((gx_f, gx_u), (gw_f, gw_u)):  # float32 sums in another order (1.1e-5 seen on an H200)
        assert ((fused_grad - grad).norm() / grad.norm()).item() < 1e-4


@kernel_test
@pytest.mark.parametrize("T,E,K", [(70, 16, 4), (45, 32, 1), (10, 1, 1), (33, 128, 8)])
def test_monitor_sums_equal_the_monitor_formulas(T, E, K):
    """The sums RouterMonitor reads from the fused pass equal its own PyTorch formulas."""
    torch.manual_seed(E)
    logits = 2 * torch.randn(T, E, device=DEVICE)
    *_, sums = rk.topk_route(logits, None, K, True, False, torch.float32, monitor=True)
    probs = logits.double().softmax(-1)
    top = probs.topk(min(2, E), dim=-1).values
    margin = top[:, 0] - top[:, 1] if E >= 2 else top[:, 0]
    expected = torch.cat([torch.stack([torch.special.entr(probs).sum(), top[:, 0].sum(), margin.sum(),
                                       logits.double().logsumexp(-1).square().sum()]), probs.sum(0)])
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="the layer takes the fused router on CUDA only")
def test_router_monitor_reads_the_same_metrics_from_the_fused_sums(monkeypatch):
    from moe_engine.analytics.online import RouterMonitor
    from moe_engine.moe.layer import MoEConfig

    rc = RouterConfig(kind="topk", num_experts=16, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001)
    layer = MoEConfig(hidden_size=64, ffn_size=128, router=rc).build().cuda().train()
    x = torch.randn(2, 96, 64, device="cuda")
    metrics = []
    for fused in (True, False):
        monkeypatch.setitem(rk.FUSED, "monitor", fused)
        monitor = RouterMonitor(layer).attach()
        layer(x).sum().backward()
        metrics.append(monitor.compute())
        monitor.detach()
    assert metrics[0].keys() == metrics[1].keys() and len(metrics[0]) > 5
    for key in metrics[0]:
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-4, abs=1e-6), key
