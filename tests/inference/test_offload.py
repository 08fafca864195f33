"""Offloaded experts (inference/offload.py) on the CPU: disk (memory-mapped safetensors) or RAM store ->
a RAM cache per layer. Same logits and greedy tokens as the resident model; the cache, prefetch,
policy, low-precision copies and their statistics."""

import json

import pytest
import torch

import moe_engine as me
from moe_engine.errors import ConfigError, InputError
from moe_engine.inference.config import OffloadConfig
from moe_engine.inference.offload import OffloadedExperts, offload_experts, offload_stats, offloaded, reset_offload_stats

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GREEDY = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, save_tiny):
    root = tmp_path_factory.mktemp("offload")
    return {(arch, layout): save_tiny(root / f"{arch}-{layout}", arch=arch, layout=layout)
            for arch in ("mixtral", "olmoe", "qwen2_moe", "deepseek_v3") for layout in ("engine", "hf")}


def _ids(model, batch=2, length=6):
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(5))


def _offloaded(path, **settings):
    model = me.load(path).eval()
    return offload_experts(model, OffloadConfig(**settings), device="cpu", weights_dir=path)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("layout,store", [("engine", "disk"), ("hf", "disk"), ("engine", "pinned")])
def test_offloaded_model_gives_the_resident_logits_and_tokens(saved, arch, layout, store):
    path = saved[(arch, layout)]
    resident = me.load(path).eval()
    ids = _ids(resident)
    with torch.no_grad():
        ref = resident(ids).logits
    ref_tokens = resident.generate(ids, **GREEDY)
    for fraction in (0.0, 0.25, 0.5):
        model = _offloaded(path, resident=fraction, store=store)
        assert all(p.capacity == round(fraction * p.num_experts) for p in offloaded(model))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref), fraction
        assert torch.equal(model.generate(ids, **GREEDY), ref_tokens), fraction
        assert not any("experts" in name for name, _ in model.named_parameters() if ".mlp.experts." in name)


def test_statistics_count_hits_misses_and_bytes(saved):
    path = saved[("mixtral", "engine")]
    model = _offloaded(path, resident=0.0, prefetch=False)
    layers = offloaded(model)
    ids = _ids(model, batch=1, length=1)
    with torch.no_grad():
        model(ids)
    stats = offload_stats(model)
    expert_bytes = sum(t.numel() * t.element_size() for t in layers[0].store.expert(0))
    top_k = model.config.num_experts_per_tok
    # load on every use: each layer moves exactly its K chosen experts for the one token
    assert stats["misses"] == top_k * len(layers) and stats["hits"] == 0
    assert stats["bytes_per_token"] == top_k * len(layers) * expert_bytes and stats["stall_s"] > 0
    model = _offloaded(path, resident=1.0)
    with torch.no_grad():
        model(ids)
    stats = offload_stats(model)
    assert stats["hit_rate"] == 1.0 and stats["bytes_moved"] == 0
    reset_offload_stats(model)
    assert offload_stats(model)["calls"] == 0


def test_prefetch_loads_the_next_layers_guess_without_changing_outputs(saved):
    path = saved[("olmoe", "engine")]
    ids = _ids(me.load(path), batch=1, length=1)
    out = {}
    for prefetch in (True, False):
        model = _offloaded(path, resident=0.5, prefetch=prefetch)
        with torch.no_grad():
            out[prefetch] = model.generate(ids, **GREEDY)
        stats = offload_stats(model)
        assert (stats["prefetched"] > 0) == prefetch
        assert stats["prefetch_used"] <= stats["prefetched"]
    assert torch.equal(out[True], out[False])


def test_stats_policy_warms_the_cache_with_the_most_routed_experts(saved, tmp_path):
    from moe_engine.analytics import RoutingRecorder

    path = saved[("olmoe", "engine")]
    model = me.load(path).eval()
    recorder = RoutingRecorder(model)
    with recorder, torch.no_grad():
        model(_ids(model, batch=4, length=16))
    counts = {i: recorder.layer_data(i).counts_E for i in range(len(recorder.layers))}
    names = {id(m): n for n, m in model.named_modules()}
    (tmp_path / "tokens_per_expert.json").write_text(json.dumps(
        {names[id(layer)]: counts[i].long().tolist() for i, layer in enumerate(recorder.layers)}))
    recorder.expert_table().to_csv(tmp_path / "expert_load.csv", index=False)
    for source in (recorder, tmp_path / "tokens_per_expert.json", tmp_path / "expert_load.csv"):
        model = offload_experts(me.load(path).eval(), OffloadConfig(resident=0.25, policy="stats"), device="cpu",
                                stats_source=source)
        for i, layer in enumerate(offloaded(model)):
            top = set(torch.argsort(counts[i], descending=True, stable=True)[: layer.capacity].tolist())
            assert set(layer.slot_of) == top, source
    # eviction gives up the least routed resident expert
    layer = offloaded(model)[0]
    least = min(layer.slot_of, key=layer.policy.score)
    assert layer.policy.victim(protect=set()) == least


def test_low_precision_misses_move_fewer_bytes_and_stay_close(saved):
    path = saved[("mixtral", "engine")]
    resident = me.load(path).eval()
    ids = _ids(resident, batch=1, length=1)
    with torch.no_grad():
        ref = resident(ids).logits
    moved = {}
    for bits in (0, 8, 4):
        model = _offloaded(path, resident=0.5, low_precision_bits=bits, prefetch=False)
        with torch.no_grad():
            out = model(ids).logits
        stats = offload_stats(model)
        moved[bits] = stats["bytes_moved"]
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < {0: 1e-12, 8: 2e-2, 4: 2e-1}[bits], bits
        assert (stats["low_precision_loads"] > 0) == (bits > 0)
    assert moved[4] < moved[8] < moved[0]
    # a low-precision slot is reloaded in full precision once an assignment weighs above the threshold
    model = _offloaded(path, resident=0.5, low_precision_bits=8, low_precision_below=1e-9, prefetch=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_offload_errors_name_what_to_do(saved, tmp_path):
    path = saved[("mixtral", "engine")]
    with pytest.raises(ConfigError, match="disk"):
        offload_experts(me.load(path), OffloadConfig(store="disk"), device="cpu")
    with pytest.raises(InputError, match="does not exist"):
        offload_experts(me.load(path), OffloadConfig(policy="stats", stats=str(tmp_path / "none.json")), device="cpu")
    with pytest.raises(InputError, match="do not match"):
        offload_experts(me.load(path), OffloadConfig(store="disk"), device="cpu", weights_dir=saved[("olmoe", "engine")])
    with pytest.raises(ConfigError, match="resident"):
        OffloadConfig(resident=1.5)


def test_offloading_an_offloaded_model_replans_its_caches_and_keeps_the_stores(saved):
    path = saved[("olmoe", "hf")]
    ids = _ids(me.load(path), batch=1, length=3)
    model = _offloaded(path, resident=0.25, store="disk")
    stores = [p.store for p in offloaded(model)]
    with torch.no_grad():
        ref = model(ids).logits
    for settings in (dict(resident=0.5, store="disk", policy="stats"), dict(resident=0.75, store="disk", low_precision_bits=8)):
        offload_experts(model, OffloadConfig(**settings), device="cpu", weights_dir=path)
        assert [p.store for p in offloaded(model)] == stores
        assert offloaded(model)[0].capacity == round(settings["resident"] * 8)
    offload_experts(model, OffloadConfig(resident=0.5), device="cpu")  # disk -> pinned: reads the experts once
    assert all(type(p.store).__name__ == "PinnedStore" for p in offloaded(model))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_a_prefetch_never_evicts_the_experts_the_last_forward_used(saved):
    layer = offloaded(_offloaded(saved[("olmoe", "engine")], resident=0.375))[1]  # 3 slots of 8, warm: 0, 1, 2
    layer.last_used = {0, 1}
    layer._prefetch([5, 6, 5])  # the most guessed first; only expert 2's slot may go
    assert set(layer.slot_of) == {0, 1, 5} and layer.stats.prefetched == 1
    layer._prefetch([7])  # the unused prefetched 5 may go, the last forward's 0 and 1 may not
    assert set(layer.slot_of) == {0, 1, 7} and layer.stats.prefetched == 2


def test_me_generate_with_offload_reports_decode_statistics(saved):
    path = saved[("qwen2_moe", "engine")]
    plain = me.generate(path, "the quick brown fox", max_new_tokens=8)
    result = me.generate(path, "the quick brown fox", max_new_tokens=8,
                         offload={"enabled": True, "resident": 0.25, "store": "disk", "policy": "stats"})
    assert result.token_ids == plain.token_ids
    decode = result.offload["decode"]
    assert decode["tokens"] == 7 and decode["calls"] == 7 * decode["layers"]  # 7 decode steps of one token
    assert result.offload["prefill"]["tokens"] == result.prompt_tokens
    assert 0.0 <= decode["hit_rate"] <= 1.0 and decode["bytes_per_token"] > 0


@cuda
def test_offloaded_on_cuda_equals_resident():
    model = me.build_model("mixtral", num_local_experts=8).eval().to(torch.bfloat16)
    ids = _ids(model, batch=1, length=4).cuda()
    resident = me.build_model("mixtral", num_local_experts=8).eval()
    resident.load_state_dict(model.state_dict())
    resident = resident.to("cuda", torch.bfloat16)
    ref = resident.generate(ids, **GREEDY)
    offload_experts(model, OffloadConfig(resident=0.25), device="cuda", dtype=torch.bfloat16)
    assert isinstance(me.moe_layers(model)[0].experts, OffloadedExperts)
    assert torch.equal(model.generate(ids, **GREEDY), ref)
    assert offload_stats(model)["stall_s"] >= 0
