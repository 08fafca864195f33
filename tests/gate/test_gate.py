import json
import subprocess
import sys

import pytest

from moe_engine.gate.gate import GateError, comparable, evaluate, markdown

BASE = {"checks": [
    {"name": "loss", "source": "ev", "key": "moe.val_loss", "baseline": 5.0, "better": "lower", "tolerance": 0.02},
    {"name": "speed", "source": "tr", "key": "tokens_per_s", "baseline": 100.0, "better": "higher", "tolerance": 0.1},
    {"name": "gap", "source": "ev", "key": "gap", "baseline": 0.0, "better": "lower", "tolerance_abs": 0.05},
]}


def test_within_tolerance_passes_and_beyond_fails():
    ok, passed = evaluate(BASE, {"ev": {"moe": {"val_loss": 5.09}, "gap": 0.05}, "tr": {"tokens_per_s": 90.0}})
    assert passed and [r.passed for r in ok] == [True, True, True]
    bad, passed = evaluate(BASE, {"ev": {"moe": {"val_loss": 5.11}, "gap": 0.051}, "tr": {"tokens_per_s": 89.9}})
    assert not passed and [r.passed for r in bad] == [False, False, False]
    assert "REGRESSION" in markdown(bad)


def test_missing_metric_is_a_failure_and_bad_baselines_are_errors():
    rows, passed = evaluate(BASE, {"ev": {"moe": {}}, "tr": {"tokens_per_s": 100.0}})
    assert not passed and rows[0].current is None
    with pytest.raises(GateError, match="was not given"):
        evaluate(BASE, {"ev": {}})
    with pytest.raises(GateError, match="better must be"):
        evaluate({"checks": [dict(BASE["checks"][0], better="up")]}, {"ev": {}})


def test_cli_exit_codes(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps(BASE))
    (tmp_path / "ev.json").write_text(json.dumps({"moe": {"val_loss": 6.0}, "gap": 0.0}))
    (tmp_path / "tr.json").write_text(json.dumps({"tokens_per_s": 100.0}))
    cmd = [sys.executable, "-m", "moe_engine.cli", "gate", "--baseline", str(tmp_path / "b.json"),
           "--metrics", f"ev={tmp_path / 'ev.json'}", "--metrics", f"tr={tmp_path / 'tr.json'}", "--out", str(tmp_path / "r.md")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1 and "gate: FAILED" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False
    proc = subprocess.run(cmd[:-2] + ["--metrics", f"tr={tmp_path / 'missing.json'}"], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("baseline, message", [
    ({"checks": []}, "the baseline has no checks"),
    ({"about": "forgot the checks"}, "the baseline has no checks"),
    ({"checks": ["loss"]}, "check #0 must be a mapping"),
    ({"checks": [dict(BASE["checks"][0], baseline="5.0")]}, "baseline must be a number, got '5.0'"),
    ("[1, 2", "cannot be read as a JSON file"),
    (b"\xff\xfe{}", "cannot be read as a JSON file"),  # not UTF-8
    (None, "cannot be read as a JSON file"),  # a folder
])
def test_an_empty_or_malformed_baseline_exits_2(baseline, message, tmp_path):
    path = tmp_path / "b.json"
    if baseline is None:
        path.mkdir()
    elif isinstance(baseline, bytes):
        path.write_bytes(baseline)
    else:
        path.write_text(baseline if isinstance(baseline, str) else json.dumps(baseline))
    (tmp_path / "ev.json").write_text(json.dumps({"moe": {"val_loss": 5.0}}))
    proc = subprocess.run([sys.executable, "-m", "moe_engine.cli", "gate", "--baseline", str(path),
                           "--metrics", f"ev={tmp_path / 'ev.json'}"], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_comparable_checks_only_the_settings_the_baseline_records():
    params = {"pretrain": {"steps": 300, "lr": 3e-3, "model": {"num_local_experts": 8}}, "data": {"seed": 0}}
    baseline = {"params": {"pretrain": {"steps": 300, "model": {"num_local_experts": 8}}}}
    assert comparable(baseline, params) == []  # lr and data are not recorded: not compared
    assert comparable({}, params) == []
    assert comparable(baseline, {**params, "pretrain": {**params["pretrain"], "steps": 20}}) == ["pretrain.steps"]
    assert comparable(baseline, {"pretrain": {"steps": 300}}) == ["pretrain.model.num_local_experts"]  # missing differs
    assert comparable(baseline, {}) == ["pretrain.model.num_local_experts", "pretrain.steps"]
    with pytest.raises(GateError, match="must map params.yaml sections"):
        comparable({"params": ["steps"]}, params)


def test_gate_cli_gives_no_verdict_for_other_settings(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({**BASE, "params": {"pretrain": {"steps": 300}}}))
    (tmp_path / "ev.json").write_text(json.dumps({"moe": {"val_loss": 6.0}, "gap": 0.0}))
    (tmp_path / "tr.json").write_text(json.dumps({"tokens_per_s": 100.0}))
    cmd = [sys.executable, "-m", "moe_engine.cli", "gate", "--baseline", str(tmp_path / "b.json"), "--out", str(tmp_path / "r.md"),
           "--metrics", f"ev={tmp_path / 'ev.json'}", "--metrics", f"tr={tmp_path / 'tr.json'}"]
    for steps, verdict in ((300, False), (50, None)):
        (tmp_path / "params.yaml").write_text(f"pretrain: {{steps: {steps}, lr: 1.0e-3}}\n")
        proc = subprocess.run(cmd + ["--params", str(tmp_path / "params.yaml")], capture_output=True, text=True)
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["passed"] is verdict, proc.stdout
        assert report["not_comparable"] == ([] if verdict is not None else ["pretrain.steps"])
        assert proc.returncode == (1 if verdict is False else 0)


def test_a_ratio_check_divides_by_another_metric():
    ratio = {"checks": [{"name": "moe/dense tokens/s", "source": "moe", "key": "throughput.tokens_per_s",
                         "per": {"source": "dense", "key": "throughput.tokens_per_s"},
                         "baseline": 0.75, "better": "higher", "tolerance": 0.2}]}
    (row,), ok = evaluate(ratio, {"moe": {"throughput": {"tokens_per_s": 150.0}}, "dense": {"throughput": {"tokens_per_s": 200.0}}})
    assert ok and row.current == pytest.approx(0.75)
    (row,), ok = evaluate(ratio, {"moe": {"throughput": {"tokens_per_s": 100.0}}, "dense": {"throughput": {"tokens_per_s": 200.0}}})
    assert not ok and row.current == pytest.approx(0.5)  # below 0.75 - 0.15
    (row,), ok = evaluate(ratio, {"moe": {"throughput": {"tokens_per_s": 100.0}}, "dense": {"throughput": {"tokens_per_s": 0}}})
    assert not ok and row.current is None  # no ratio of a zero: a failure, not a crash
    with pytest.raises(GateError, match="'per' must be"):
        evaluate({"checks": [dict(ratio["checks"][0], per="dense")]}, {"moe": {}, "dense": {}})
    with pytest.raises(GateError, match="divides by source 'dense'"):
        evaluate(ratio, {"moe": {}})
