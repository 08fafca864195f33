"""benchmarks/quality_per_flop.py: the FLOP matching against a hand count, the margin statistics, and
the smoke mode end to end (real trainer, real evaluation) producing well-formed JSON, CSV and PNG."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import quality_per_flop as qpf  # noqa: E402


def tiny_config(**overrides):
    from moe_engine.training.config import PretrainConfig

    return PretrainConfig.from_dict({"arch": "mixtral", "preset": "tiny",
                                     "model": {"num_local_experts": 4, "intermediate_size": 32}, **overrides})


def hand_flops_per_token(width_active: int, router: int, vocab: int, seq: int) -> int:
    """PaLM's 6N + 12LDS for the tiny Mixtral (D 64, 2 layers, 4 heads of 16, 2 KV heads), by hand:
    per layer q and o 64x64, k and v 64x32, two RMSNorms, the router (64 x E), a gated MLP (3 x 64 x
    width) on the active path; a final norm; the untied LM head 64 x vocab."""
    D, L = 64, 2
    attention = 2 * D * D + 2 * D * 32
    per_layer = attention + 2 * D + router + 3 * D * width_active
    n_active = L * per_layer + D + D * vocab
    return 6 * n_active + 12 * L * D * seq


def test_flops_per_token_matches_a_hand_count():
    moe = tiny_config()  # E4, k2 (the preset), F32: active width 64, router 64 x 4
    assert qpf.flops_per_token(moe, 512, 32) == hand_flops_per_token(64, 64 * 4, 512, 32)
    active = moe.override({"dense_baseline": "active"})
    assert qpf.flops_per_token(active, 512, 32) == hand_flops_per_token(64, 0, 512, 32)
    total = moe.override({"dense_baseline": "total"})
    assert qpf.flops_per_token(total, 512, 32) == hand_flops_per_token(128, 0, 512, 32)


def test_flop_matched_steps_by_hand():
    # 300 MoE steps of 2048 tokens at 1.0 MFLOP/token = 6.144e11 FLOPs; a 1.5 MFLOP/token model spends
    # that in exactly 200 steps, a 1.7 MFLOP/token one in 176.47 (nearest: 176)
    assert qpf.flop_matched_steps(300 * 2048 * 1.0e6, 1.5e6, 2048) == 200
    assert qpf.flop_matched_steps(300 * 2048 * 1.0e6, 1.7e6, 2048) == 176
    assert qpf.flop_matched_steps(10.0, 1e9, 2048) == 1  # never zero steps
    # the tiny models: 6 steps x 128 tokens of the MoE (545,664 FLOPs/token) against the dense-total
    # (690,048 FLOPs/token): 6 x 545664 / 690048 = 4.74 -> 5 steps, within half a step of equal FLOPs
    moe_fpt, total_fpt = hand_flops_per_token(64, 256, 512, 32), hand_flops_per_token(128, 0, 512, 32)
    assert (moe_fpt, total_fpt) == (545664, 690048)
    steps = qpf.flop_matched_steps(6 * 128 * moe_fpt, total_fpt, 128)
    assert steps == 5
    assert abs(steps * total_fpt - 6 * moe_fpt) <= total_fpt / 2


def test_dense_runs_are_shared_across_moe_shapes_with_the_same_active_width():
    a = tiny_config(dense_baseline="active").to_dict()  # E4 k2 F32: width 64
    b = tiny_config(dense_baseline="active", model={"num_local_experts": 8, "intermediate_size": 32},
                    router={"aux_loss_coef": 0.1}).to_dict()
    c = tiny_config(dense_baseline="active", model={"num_local_experts": 4, "intermediate_size": 64}).to_dict()
    assert qpf.run_identity(a, 512) == qpf.run_identity(b, 512)
    assert qpf.run_identity(a, 512) != qpf.run_identity(c, 512)  # width 128
    moe = tiny_config().to_dict()
    assert qpf.run_identity(moe, 512) == moe  # an MoE run is its own settings


def _runs(values: dict[str, list[float]]) -> dict:
    return {kind: {seed: {"val_loss": v, "ood_loss": v + 1.0} for seed, v in enumerate(vals)} for kind, vals in values.items()}


def test_margins_are_paired_by_seed_and_judged_against_the_spread():
    runs = _runs({"moe": [4.00, 4.02, 3.98], "dense_active": [4.05, 4.06, 4.04]})
    m = qpf.margins(runs, [0, 1, 2])["moe_minus_dense_active"]["val_loss"]
    assert m["per_seed"] == pytest.approx({"0": -0.05, "1": -0.04, "2": -0.06})
    assert m["mean"] == pytest.approx(-0.05) and m["std"] == pytest.approx(0.01)
    assert m["paired_t"] == pytest.approx(-0.05 / (0.01 / 3**0.5))
    assert (m["min"], m["max"]) == pytest.approx((-0.06, -0.04))
    assert m["moe_better_every_seed"] and m["beyond_seed_spread"]  # 0.05 > the MoE's own spread 0.02
    # ahead on every seed, but by less than the seeds scatter the MoE's loss: not beyond the spread
    noisy = qpf.margins(_runs({"moe": [4.00, 4.10, 3.90], "dense_active": [4.02, 4.11, 3.93]}), [0, 1, 2])
    row = noisy["moe_minus_dense_active"]["val_loss"]
    assert row["moe_better_every_seed"] and not row["beyond_seed_spread"]
    behind = qpf.margins(_runs({"moe": [4.1, 4.0], "dense_active": [4.0, 4.05]}), [0, 1])
    assert not behind["moe_minus_dense_active"]["ood_loss"]["moe_better_every_seed"]


def test_smoke_run_writes_wellformed_json_csv_and_png(tmp_path):
    out = tmp_path / "qpf.json"
    plots = tmp_path / "plots"
    assert qpf.main(["--smoke", "--seeds", "0", "1", "--threads", "1", "--work", str(tmp_path / "work"),
                     "--out", str(out), "--plots-dir", str(plots)]) == 0
    result = json.loads(out.read_text())
    env = result["environment"]
    assert env["device"] and env["torch"] and env["transformers"] and env["date"]
    assert set(result["models"]) == set(qpf.MODELS)
    matched = result["flop_matching"]["dense_total_flops_steps"]
    assert result["models"]["dense_total_flops"]["steps"] == matched
    moe, total = result["models"]["moe"], result["models"]["dense_total_flops"]
    assert abs(total["train_flops"] - moe["train_flops"]) <= total["flops_per_token"] * result["tokens_per_step"] / 2
    assert moe["params_active"] < moe["params_total"]
    assert result["models"]["dense_total"]["params_total"] == pytest.approx(moe["params_total"], rel=0.01)
    for kind in qpf.MODELS:
        m = result["models"][kind]
        assert m["tokens_per_s"]["mean"] > 0 and m["usd_per_million_tokens"] > 0
        assert m["train_flops"] == pytest.approx(m["flops_per_token"] * m["tokens_trained"])
    for base in qpf.BASELINES:  # the margins are the per-seed differences of the final scores
        for metric in ("val_loss", "ood_loss"):
            per_seed = result["margins"][f"moe_minus_{base}"][metric]["per_seed"]
            for seed in ("0", "1"):
                diff = result["runs"]["moe"][seed][metric] - result["runs"][base][seed][metric]
                assert per_seed[seed] == pytest.approx(diff)

    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["model"], r["seed"]) for r in rows} == {(k, s) for k in qpf.MODELS for s in ("0", "1")}
    for kind in qpf.MODELS:
        pts = [r for r in rows if r["model"] == kind and r["seed"] == "0"]
        steps = [int(r["step"]) for r in pts]
        assert steps == sorted(steps) and steps[-1] == result["models"][kind]["steps"]
        fpt = result["models"][kind]["flops_per_token"]
        assert all(float(r["flops"]) == pytest.approx(int(r["tokens"]) * fpt) for r in pts)
        assert all(math.isfinite(float(r["val_loss"])) and math.isfinite(float(r["ood_loss"])) for r in pts)
    assert sorted(p.name for p in plots.iterdir()) == sorted(f"{k}.csv" for k in qpf.MODELS)

    from PIL import Image

    with Image.open(out.with_suffix(".png")) as img:
        assert img.format == "PNG" and img.size[0] > 800
