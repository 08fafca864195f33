"""tables.py beyond the recorder's tests: the lift of token specialisation against a pandas reference,
the health verdicts at their thresholds, the steps read from checkpoint names."""

import math

import pandas as pd
import pytest
import torch

import moe_engine as me
from moe_engine.analytics import tables
from moe_engine.analytics.recorder import RoutingRecorder


def test_token_lift_matches_a_reference_from_the_assignments():
    model = me.build_model("mixtral", preset="tiny", seed=0).eval()
    ids = torch.randint(0, 24, (4, 32))  # a small vocabulary, so token ids recur
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(input_ids=ids)
    got = rec.token_table(min_count=4).set_index(["layer", "token_id", "expert"]).sort_index()
    a = rec.assignment_table()
    a = a[~a["dropped"]]
    tokens = a.groupby("layer")["token"].nunique()  # T per layer
    occurrences = a.drop_duplicates(["layer", "token"]).groupby(["layer", "token_id"]).size()
    count = a.groupby(["layer", "token_id", "expert"]).size()
    per_expert = a.groupby(["layer", "expert"]).size()
    expert_share = per_expert / per_expert.index.get_level_values("layer").map(tokens).to_numpy()
    ref = pd.DataFrame({"count": count})
    ref["occurrences"] = occurrences.reindex(ref.index.droplevel("expert")).to_numpy()
    ref = ref[ref["occurrences"] >= 4]
    ref["share"] = ref["count"] / ref["occurrences"]
    ref["lift"] = ref["share"] / expert_share.reindex(ref.index.droplevel("token_id")).to_numpy()
    ref = ref.sort_index()
    assert got.index.equals(ref.index)
    assert got["lift"].to_numpy() == pytest.approx(ref["lift"].to_numpy(), rel=1e-5)
    assert got["share"].to_numpy() == pytest.approx(ref["share"].to_numpy(), rel=1e-6)


def layer(**change) -> dict:
    row = {"layer": 0, "num_experts": 8, "top_k": 2, "load_imbalance": 1.2, "dead_expert_fraction": 0.0,
           "routing_entropy": 0.5}
    return {**row, **change}


@pytest.mark.parametrize("change, verdict", [
    ({}, "balanced"),
    ({"load_imbalance": 1.49}, "balanced"),
    ({"load_imbalance": 1.5}, "imbalanced"),
    ({"dead_expert_fraction": 0.125}, "imbalanced"),  # one dead expert of eight
    ({"dead_expert_fraction": 0.25}, "collapsed"),
    ({"load_imbalance": 1 + 0.75 * 3}, "collapsed"),  # 3/4 of the way to the ceiling E / K = 4
    ({"load_imbalance": 1 + 0.74 * 3}, "imbalanced"),
    ({"routing_entropy": 0.99}, "balanced"),  # near-uniform probabilities: noted, not a verdict of their own
])
def test_health_verdict_at_the_thresholds(change, verdict):
    health = tables.health_table(pd.DataFrame([layer(**change)]))
    assert health["verdict"].tolist() == [verdict]
    assert health["imbalance_of_ceiling"].iloc[0] == pytest.approx(min((layer(**change)["load_imbalance"] - 1) / 3, 1.0))


def test_health_reasons_name_what_fired():
    health = tables.health_table(pd.DataFrame([layer(), layer(layer=1, load_imbalance=4.0, dead_expert_fraction=0.5,
                                                               routing_entropy=0.97)]))
    assert health["reasons"][0] == "load within the thresholds"
    assert "50% of experts get no token" in health["reasons"][1] and "4.00x its fair share" in health["reasons"][1]
    assert "near uniform (entropy 0.970" in health["reasons"][1]


def test_health_with_no_router_probabilities():
    health = tables.health_table(pd.DataFrame([layer(routing_entropy=math.nan)]))
    assert health["verdict"].tolist() == ["balanced"] and math.isnan(health["routing_entropy"].iloc[0])


@pytest.mark.parametrize("names, steps", [
    (["step_00000100", "step_00000200", "step_00001000"], [100, 200, 1000]),
    (["out/step10/", "out/step30"], [10, 30]),
    (["ckpt-300", "final"], [0, 1]),  # a name without a number: positions
    (["run2", "run1"], [0, 1]),  # numbers that do not increase are not steps
])
def test_checkpoint_steps(names, steps):
    assert tables.checkpoint_steps(names) == steps
