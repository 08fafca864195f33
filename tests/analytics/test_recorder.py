"""RoutingRecorder and its tables: every architecture, labels and token ids, tables that agree with
the routing the layers computed, and hooks that come off again."""

import pytest
import torch

import moe_engine as me
from moe_engine.analytics import tables
from moe_engine.analytics.recorder import RoutingRecorder

ARCHS = ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "switch"]


def run(model, ids):
    if model.config.is_encoder_decoder:
        return model(input_ids=ids, decoder_input_ids=ids.flip(-1))
    return model(input_ids=ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_tables_for_every_architecture(arch):
    model = me.build_model(arch, preset="tiny", seed=0).eval()
    rec = RoutingRecorder(model)
    seen = {i: [] for i in range(len(rec.layers))}
    for i, layer in enumerate(rec.layers):
        layer.register_routing_hook(lambda l, r, c, i=i: seen[i].append(c.tolist()))
    with rec, torch.no_grad():
        for domain in ("code", "verse"):
            rec.label(domain=domain)
            run(model, torch.randint(0, 512, (2, 12)))
    layers = rec.layer_table()
    assert list(layers["layer"]) == list(range(len(rec.layers)))
    assert (layers["tokens"] == 48).all()
    experts = rec.expert_table()
    for i in seen:  # the recorder's loads equal the layer's own tokens_per_expert, summed over forwards
        counts = [sum(c) for c in zip(*seen[i])]
        assert experts[experts.layer == i]["tokens"].tolist() == counts
    spec = rec.specialisation_table("domain")
    assert set(spec["group"]) == {"code", "verse"}
    sums = spec.groupby(["layer", "group"])["share"].sum()  # each group's shares sum to K (less drops)
    assert (sums <= layers.set_index("layer")["top_k"].reindex(sums.index.get_level_values(0)).to_numpy() + 1e-6).all()
    assert len(rec.coactivation_table()) == len(rec.layers) * rec.layers[0].num_experts * (rec.layers[0].num_experts - 1)
    assert set(rec.metrics()) >= {f"router/layer{i}/load_imbalance" for i in range(len(rec.layers))}


def test_assignment_table_has_token_ids_labels_and_weights():
    model = me.build_model("mixtral", preset="tiny", seed=0).eval()
    ids = torch.randint(0, 512, (2, 5))
    captured = []
    model.model.layers[0].mlp.register_routing_hook(lambda l, r, c: captured.append(r))
    with RoutingRecorder(model) as rec, torch.no_grad():
        rec.label(domain="bible", split="val")
        model(input_ids=ids)
    table = rec.assignment_table()
    first = table[table.layer == 0]
    routing = captured[0]
    assert first["expert"].tolist() == routing.expert_idx_A.tolist()
    assert first["weight"].to_numpy() == pytest.approx(routing.weight_A.numpy())
    assert first["token_id"].tolist() == ids.reshape(-1).repeat_interleave(2).tolist()  # K = 2 rows per token
    assert set(first["domain"]) == {"bible"} and set(first["split"]) == {"val"}
    tok = rec.token_table()
    per_token = tok.groupby(["layer", "token_id"])
    assert (per_token["count"].sum() == 2 * per_token["occurrences"].first()).all()  # K experts per occurrence


def test_switch_decoder_layers_get_decoder_token_ids_and_drops():
    model = me.build_model("switch", preset="tiny", seed=0, router={"expert_capacity": 2}).eval()
    ids = torch.randint(0, 512, (1, 16))
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(input_ids=ids, decoder_input_ids=ids.flip(-1))
    enc, dec = rec.layer_data(0), rec.layer_data(1)
    assert enc.token_ids_T.tolist() == ids.reshape(-1).tolist()
    assert dec.token_ids_T.tolist() == ids.flip(-1).reshape(-1).tolist()
    layers = rec.layer_table()
    assert (layers["drop_rate"] >= 0.5).all()  # at most 4 experts x 2 slots for 16 tokens
    assert layers["consistency_next"].isna().all()  # encoder and decoder see different tokens
    # Saturation uses the choices before the drop, so a checkpoint is fully saturated against itself.
    assert tables.saturation_table([rec, rec], ["a", "b"])["saturation"].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_expert_choice_layout():
    model = me.build_model("olmoe", preset="tiny", seed=0, router={"kind": "expert_choice"}).eval()
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(input_ids=torch.randint(0, 512, (2, 16)))
    layers = rec.layer_table()
    assert (layers["load_imbalance"] == 1.0).all()  # perfect balance by construction
    assert len(rec.consistency_table()) == 1


def test_detach_removes_every_hook_close_and_clear():
    model = me.build_model("olmoe", preset="tiny", seed=0).eval()
    model_hooks = dict(model._forward_pre_hooks)  # the adapter's own (padding mask)
    rec = RoutingRecorder(model)
    with rec, torch.no_grad():
        model(input_ids=torch.randint(0, 512, (1, 4)))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 512, (1, 4)))
    assert [len(r) for r in rec.records] == [1, 1]
    assert all(not layer._routing_hooks for layer in rec.layers) and dict(model._forward_pre_hooks) == model_hooks
    rec.close()  # drops the model, keeps the records
    assert rec.model is None and len(rec.layer_table()) == 2
    with pytest.raises(ValueError, match="closed"):
        rec.attach()
    rec.clear()
    with pytest.raises(ValueError, match="nothing recorded"):
        rec.layer_table()


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="no engine MoE layers"):
        RoutingRecorder(torch.nn.Linear(2, 2))
    model = me.build_model("olmoe", preset="tiny", seed=0).eval()
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(input_ids=torch.randint(0, 512, (1, 4)))
    with pytest.raises(ValueError, match=r"rec.label\(domain=...\)"):
        rec.specialisation_table("domain")


def test_without_probabilities_the_probability_metrics_are_missing():
    model = me.build_model("qwen2_moe", preset="tiny", seed=0).eval()
    with RoutingRecorder(model, keep_probs=False) as rec, torch.no_grad():
        model(input_ids=torch.randint(0, 512, (2, 8)))
    layers = rec.layer_table()
    assert layers["routing_entropy"].isna().all() and layers["top1_prob"].isna().all()
    assert layers["load_imbalance"].notna().all() and rec.expert_table()["mean_prob"].isna().all()
