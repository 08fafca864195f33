"""The decode path (moe/decode.py) against the training path, a float64 loop and stock transformers;
its choice by ``experts_mode``; torch.compile without graph breaks. GPU cases (the Triton kernels,
CUDA-graph capture) are skipped without CUDA and run on the lent GPU with ``pytest tests/moe``."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import moe_engine as me
from moe_engine.moe import decode
from moe_engine.moe.layer import MoEConfig
from moe_engine.moe.router import RouterConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _loop_reference(x_TD, idx_TK, w_TK, w_in, w_out, gated, act):
    """float64, one assignment at a time, from the definition."""
    out = torch.zeros(x_TD.shape, dtype=torch.float64)
    for t in range(idx_TK.shape[0]):
        for k in range(idx_TK.shape[1]):
            e = idx_TK[t, k].item()
            h = w_in[e].double() @ x_TD[t].double()
            h = act(h.chunk(2)[0]) * h.chunk(2)[1] if gated else act(h)
            out[t] += w_TK[t, k].double() * (w_out[e].double() @ h)
    return out


@pytest.mark.parametrize("gated,act", [(True, F.silu), (False, F.relu), (False, F.gelu)])
def test_gathered_experts_matches_a_float64_loop(gated, act):
    T, K, E, D, Fh = 5, 3, 8, 16, 24
    x = torch.randn(T, D)
    w_in, w_out = torch.randn(E, 2 * Fh if gated else Fh, D), torch.randn(E, D, Fh)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    out = decode.gathered_experts(x, idx, w, w_in, w_out, gated, act)
    assert _rel(out, _loop_reference(x, idx, w, w_in, w_out, gated, act)) < 1e-6


TOKEN_CHOICE = [
    RouterConfig(kind="topk", num_experts=8, top_k=2, aux_loss_coef=0.0),
    RouterConfig(kind="topk", num_experts=16, top_k=4, norm_topk_prob=False, aux_loss_coef=0.0),
    RouterConfig(kind="sigmoid_grouped", num_experts=8, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.0),
]


def _layer(rc, gated=True, shared=0):
    return MoEConfig(hidden_size=32, ffn_size=48, gated=gated, shared_expert_size=shared, router=rc).build().eval()


@pytest.mark.parametrize("rc", TOKEN_CHOICE, ids=lambda rc: f"{rc.kind}-k{rc.top_k}")
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_decode_path_equals_grouped_path(rc, gated, tokens):
    layer = _layer(rc, gated, shared=16)
    x = torch.randn(tokens, 1, 32)
    with torch.no_grad():
        layer.experts_mode = "grouped"
        grouped = layer(x)
        layer.experts_mode = "gathered"
        gathered = layer(x)
    assert layer.uses_decode_path(layer._last_routing[0])
    assert _rel(gathered, grouped) < 1e-6


def test_gathered_mode_backward_matches_grouped():
    layer = _layer(TOKEN_CHOICE[0]).train()
    x = torch.randn(2, 5, 32)
    grads = {}
    for mode in ("grouped", "gathered"):
        layer.experts_mode = mode
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        layer(xi).pow(2).sum().backward()
        grads[mode] = [xi.grad] + [p.grad.clone() for p in layer.parameters()]
    for a, b in zip(grads["gathered"], grads["grouped"]):
        assert _rel(a, b) < 1e-5


def test_auto_mode_picks_decode_only_for_small_inference_forwards():
    layer = _layer(TOKEN_CHOICE[0])
    small = layer.moe_router(torch.randn(4, 32))
    large = layer.moe_router(torch.randn(decode.BLOCK_ASSIGNMENTS, 32))  # K=2: two blocks, only 8 experts
    with torch.no_grad():
        assert layer.uses_decode_path(small) and not layer.uses_decode_path(large)
    assert not layer.uses_decode_path(small)  # a gradient is needed: the grouped path trains
    layer.experts_mode = "grouped"
    with torch.no_grad():
        assert not layer.uses_decode_path(small)
    with pytest.raises(ValueError, match="experts_mode"):
        layer.experts_mode = "batched"


def test_worth_it_follows_the_measured_crossover():
    assert decode.worth_it(64, 8) and not decode.worth_it(128, 8)  # top-2 of 8: up to 32 tokens
    assert decode.worth_it(128, 128) and not decode.worth_it(256, 128)  # top-8 of 128: up to 16 tokens


@pytest.mark.parametrize("rc", [
    RouterConfig(kind="switch", num_experts=4, top_k=1, capacity_factor=0.5),
    RouterConfig(kind="expert_choice", num_experts=4, top_k=2),
], ids=lambda rc: rc.kind)
def test_capacity_and_expert_choice_routing_keep_the_grouped_path(rc):
    layer = _layer(rc)
    layer.experts_mode = "gathered"
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        out = layer(x)
        assert not layer.uses_decode_path(layer._last_routing[0])
        layer.experts_mode = "grouped"
        assert torch.equal(out, layer(x))


def test_decode_path_feeds_routing_hooks_and_counts():
    layer = _layer(TOKEN_CHOICE[0])
    seen = []
    layer.register_routing_hook(lambda lay, routing, counts: seen.append(counts.clone()))
    with torch.no_grad():
        layer(torch.randn(3, 1, 32))
    expected = layer._last_routing[0].tokens_per_expert()
    assert torch.equal(seen[0], expected) and torch.equal(layer.last_tokens_per_expert, expected)
    assert layer.last_stats["tokens_per_expert"][0].sum().item() == 3 * 2


DECODERS = ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3"]


@pytest.mark.parametrize("arch", DECODERS)
def test_patched_model_in_each_mode_matches_stock_transformers(arch):
    stock = AutoModelForCausalLM.from_config(me.model_config(arch)).eval()
    for name, buf in stock.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.normal_(0, 0.05)
    patched = me.patch(copy.deepcopy(stock))
    ids = torch.randint(0, stock.config.vocab_size, (3, 7))
    with torch.no_grad():
        ref = stock(ids).logits
        for mode in ("auto", "grouped", "gathered"):
            for layer in me.moe_layers(patched):
                layer.experts_mode = mode
            assert _rel(patched(ids).logits, ref) < 1e-5, mode
            # one decode step (batch 3 x 1 token) on the cache of the prompt
            out = patched(ids[:, :-1], use_cache=True)
            step = patched(ids[:, -1:], past_key_values=out.past_key_values).logits[:, -1]
            assert _rel(step, ref[:, -1]) < 1e-5, mode


def test_decode_layer_compiles_without_graph_breaks():
    layer = _layer(TOKEN_CHOICE[0], shared=16)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        assert _rel(compiled(x), layer(x)) < 1e-6


# ----------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("tokens,top_k,experts", [(1, 2, 8), (8, 2, 8), (32, 8, 64), (16, 8, 128)])
def test_triton_decode_kernels_match_float64(dtype, tol, tokens, top_k, experts):
    D, Fh = 256, 192
    x = torch.randn(tokens, D, device="cuda").to(dtype)
    w_in = (torch.randn(experts, 2 * Fh, D, device="cuda") / D**0.5).to(dtype)
    w_out = (torch.randn(experts, D, Fh, device="cuda") / Fh**0.5).to(dtype)
    idx = torch.stack([torch.randperm(experts, device="cuda")[:top_k] for _ in range(tokens)])
    w = torch.rand(tokens, top_k, device="cuda").to(dtype)
    out = decode.fused_experts(x, idx, w, w_in, w_out, True, "silu")
    ref = decode.gathered_experts(*(t.double() if t.is_floating_point() else t for t in (x, idx, w, w_in, w_out)), True, F.silu)
    assert _rel(out, ref) < tol


@cuda
def test_decode_layer_is_capturable_in_a_cuda_graph():
    layer = _layer(TOKEN_CHOICE[0], shared=16).cuda().to(torch.bfloat16)
    x = torch.randn(4, 1, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = layer(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x)  # warm-up (Triton compiles) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(out, layer(x)) < 1e-2 and _rel(ref, out) > 1e-3
