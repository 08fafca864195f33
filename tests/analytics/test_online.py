"""The online monitor: same numbers as the offline definitions, alerts, no host sync in the hook,
and reduction across two gloo ranks equal to one process seeing all the data."""

import dataclasses
import json
import logging

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moe_engine as me
from moe_engine.analytics import metrics as M
from moe_engine.analytics.online import MonitorConfig, RouterMonitor
from moe_engine.analytics.recorder import RoutingRecorder
from moe_engine.moe.layer import MoEConfig
from moe_engine.moe.router import RouterConfig


def collapsed_layer():
    """E=4, K=2 layer whose router sends every positive input to experts 0 and 1."""
    layer = MoEConfig(hidden_size=8, ffn_size=16, router=RouterConfig(num_experts=4, top_k=2)).build()
    with torch.no_grad():
        layer.moe_router.weight.copy_(torch.tensor([1.0, 0.5, -1.0, -1.0])[:, None].expand(4, 8))
    return layer


def test_monitor_matches_offline_definitions():
    model = me.build_model("olmoe", preset="tiny", seed=0).train()
    monitor, rec = RouterMonitor(model), RoutingRecorder(model)
    aux_per_step = [[] for _ in monitor.layers]
    with monitor, rec:
        for _ in range(3):
            model(input_ids=torch.randint(0, 512, (2, 16)))
            for i, layer in enumerate(monitor.layers):
                aux_per_step[i].append(layer.last_aux_loss.item())
    got = monitor.compute()
    offline = rec.layer_table().set_index("layer")
    for i in range(len(monitor.layers)):
        row = offline.loc[i]
        for key in ("load_imbalance", "load_cv", "dead_expert_fraction", "load_diversity", "drop_rate",
                    "routing_entropy", "top1_prob", "top1_margin", "z_loss"):
            assert got[f"router/layer{i}/{key}"] == pytest.approx(row[key], rel=1e-5, abs=1e-7), key
        assert got[f"router/layer{i}/tokens"] == 3 * 32
        assert got[f"router/layer{i}/aux_loss"] == pytest.approx(sum(aux_per_step[i]) / 3, rel=1e-5)
        per_step = [M.balance_loss(r.probs_TE, M.tokens_per_expert(r.expert_idx_A, r.num_experts)).item() for r in rec.records[i]]
        assert got[f"router/layer{i}/balance_loss"] == pytest.approx(sum(per_step) / 3, rel=1e-5)
    assert got["router/max/load_imbalance"] == max(got[f"router/layer{i}/load_imbalance"] for i in range(2))


def test_alerts_are_logged_and_printed(caplog, capsys):
    layer = collapsed_layer()
    monitor = RouterMonitor(layer, MonitorConfig(imbalance_alert=1.5, dead_fraction_alert=0.25))
    with monitor, caplog.at_level(logging.WARNING):
        layer(torch.rand(2, 5, 8))
        got = monitor.compute()
    assert got["router/layer0/load_imbalance"] == 2.0  # E / K
    assert got["router/layer0/dead_expert_fraction"] == 0.5
    assert {a.metric for a in monitor.last_alerts} == {"load_imbalance", "dead_expert_fraction"}
    assert "load_imbalance = 2.000 exceeds 1.5" in caplog.text
    assert "dead_expert_fraction = 0.500 exceeds 0.25" in capsys.readouterr().out


def test_window_resets_and_eval_forwards_are_skipped():
    layer = collapsed_layer()
    monitor = RouterMonitor(layer, MonitorConfig(per_expert=True)).attach()
    layer(torch.rand(1, 4, 8))
    first = monitor.compute()
    assert first["router/layer0/expert0/load_share"] == 0.5 and first["router/layer0/expert3/load_share"] == 0.0
    assert monitor.compute() == {}  # nothing since the reset
    layer.eval()
    layer(torch.rand(1, 4, 8))
    assert monitor.compute() == {}  # validation forwards do not count by default
    monitor.detach()
    layer.train()
    layer(torch.rand(1, 4, 8))
    assert monitor.compute() == {}  # detached


@pytest.mark.parametrize("kind", ["topk", "switch", "expert_choice", "sigmoid_grouped"])
def test_hook_never_reads_values_on_the_host(kind):
    """On the meta device any .item(), .tolist(), bool() or data-dependent shape raises: the hook
    running there proves it queues device work only (no host sync in the training step)."""
    rc = RouterConfig(kind=kind, num_experts=4, top_k=2 if kind != "switch" else 1, capacity_factor=0.5, n_group=2, topk_group=1)
    layer = MoEConfig(hidden_size=8, ffn_size=16, router=rc).build().train()
    routing = layer.moe_router(torch.randn(12, 8), group_size=6)
    counts_E = routing.tokens_per_expert()
    tensors = {f.name: getattr(routing, f.name) for f in dataclasses.fields(routing)}
    meta = {name: t.to("meta") for name, t in tensors.items() if torch.is_tensor(t)}
    routing_meta = dataclasses.replace(routing, **meta, aux_losses={k: v.to("meta") for k, v in routing.aux_losses.items()})
    layer = layer.to("meta")
    monitor = RouterMonitor(layer)
    monitor._hook(layer, routing_meta, counts_E.to("meta"))
    assert monitor._sums[0].is_meta


def _ranked_run(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        layer = MoEConfig(hidden_size=8, ffn_size=16, router=RouterConfig(num_experts=4, top_k=2)).build()
        with RouterMonitor(layer) as monitor:
            layer(torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(100 + rank)) * (1 + 3 * rank))
            metrics = monitor.compute()
        if rank == 0:
            with open(out, "w") as f:
                json.dump(metrics, f)
    finally:
        dist.destroy_process_group()


def test_reduction_across_ranks_equals_one_process_seeing_all_data(tmp_path):
    out = tmp_path / "rank0.json"
    mp.spawn(_ranked_run, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    reduced = json.loads(out.read_text())
    torch.manual_seed(0)
    layer = MoEConfig(hidden_size=8, ffn_size=16, router=RouterConfig(num_experts=4, top_k=2)).build()
    with RouterMonitor(layer) as monitor:
        for rank in range(2):
            layer(torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(100 + rank)) * (1 + 3 * rank))
        single = monitor.compute()
    assert reduced.keys() == single.keys()
    for key, value in single.items():
        assert reduced[key] == pytest.approx(value, rel=1e-5), key
