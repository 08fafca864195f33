"""The quantize stage (moe-lab quantize) on the demo model: sizes, errors, the gate, reload."""

import csv
import json

import pytest

import moe_engine as me
from moe_engine.cli import main


def _run(*args) -> int:
    return main(["quantize", *map(str, args)])


@pytest.mark.parametrize("bits", [8, 4])
def test_stage_passes_its_gate_on_the_demo_model(bits, demo_model, demo_data, tmp_path, capsys):
    out = tmp_path / f"int{bits}"
    assert _run("--model", demo_model, "--data", demo_data, "--out", out, "--bits", bits,
                "--set", "gate.max_sequences=64") == 0
    m = json.loads((out / "metrics.json").read_text())
    limit = 0.005 if bits == 8 else 0.03
    assert m["gate"]["passed"] and set(m["gate"]) == {"val", "ood", "passed"}
    for split in ("val", "ood"):
        g = m["gate"][split]
        assert g["limit"] == limit and g["increase"] <= limit
        assert g["ppl_quantized"] == pytest.approx(g["ppl_original"] * (1 + g["increase"]))
    assert m["expert_tensors_quantized"] == 4  # 2 MoE layers x (gate_up_proj, down_proj)
    assert m["reload_max_abs_diff"] == 0.0
    s = m["sizes"]
    assert s["disk_quantized"] < s["disk_original"] and s["memory_quantized"] < s["memory_original"]
    assert s["disk_quantized"] == (out / "model" / "model.safetensors").stat().st_size
    rows = list(csv.DictReader((out / "errors.csv").open()))
    assert len(rows) == 2 * 4 and all(float(r["w_in_rel"]) > 0 for r in rows)
    e = m["errors"]
    assert 0 < e["weight_rel_max"] < (0.02 if bits == 8 else 0.2)
    assert "| val |" in (out / "report.md").read_text() and "| val |" in capsys.readouterr().out
    assert me.load(out / "model").config.quantization_config["bits"] == bits


def test_a_failed_gate_exits_2_with_the_numbers_and_keeps_the_previous_output(demo_model, demo_data, tmp_path, capsys):
    out = tmp_path / "q"
    assert _run("--model", demo_model, "--data", demo_data, "--out", out, "--bits", 8, "--set", "gate.max_sequences=32") == 0
    before = (out / "metrics.json").read_text()
    code = _run("--model", demo_model, "--data", demo_data, "--out", out, "--bits", 4, "--set", "attention=true",
                "--set", "dense=true", "--set", "gate.int4_max_ppl_increase=0", "--set", "gate.max_sequences=32")
    err = capsys.readouterr().err
    assert code == 2
    assert "quality gate failed for the int4 model" in err and "| val |" in err and "FAIL" in err
    assert (out / "metrics.json").read_text() == before  # nothing published


def test_the_gate_needs_data_or_an_explicit_opt_out(tiny_dirs, tmp_path, capsys):
    assert _run("--model", tiny_dirs["mixtral"], "--out", tmp_path / "a") == 2
    assert "pass --data" in capsys.readouterr().err
    assert _run("--model", tiny_dirs["mixtral"], "--out", tmp_path / "b", "--set", "gate.enabled=false") == 0
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["gate"] is None and m["calibration"].startswith("random token ids")


def test_bad_settings_and_inputs_are_user_errors(tiny_dirs, tmp_path, capsys):
    assert _run("--model", tiny_dirs["mixtral"], "--out", tmp_path / "a", "--set", "bits=3") == 2
    assert "quantize.bits = 3: must be 4 or 8" in capsys.readouterr().err
    assert _run("--model", tmp_path, "--out", tmp_path / "b", "--set", "gate.enabled=false") == 2
    assert "not a model directory" in capsys.readouterr().err
    assert _run("--model", tiny_dirs["mixtral"], "--out", tmp_path / "q", "--set", "gate.enabled=false") == 0
    assert _run("--model", tmp_path / "q" / "model", "--out", tmp_path / "qq", "--set", "gate.enabled=false") == 2
    assert "already quantized" in capsys.readouterr().err


def test_a_broken_config_a_misspelled_section_and_a_foreign_out_folder_are_user_errors(tiny_dirs, tmp_path, capsys):
    """Each is exit 2 with the file, section or folder named, and nothing of the user's is touched."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert _run("--model", broken, "--out", tmp_path / "a", "--set", "gate.enabled=false") == 2
    assert f"{broken / 'config.json'} cannot be read as a transformers config" in capsys.readouterr().err
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    assert _run("--model", broken, "--out", tmp_path / "a", "--set", "gate.enabled=false") == 2
    assert "cannot be read as a transformers config" in capsys.readouterr().err
    params = tmp_path / "params.yaml"
    params.write_text("quantize: {bits: 8}\nquantise: {bits: 4}\n")
    assert _run("--model", tiny_dirs["mixtral"], "--out", tmp_path / "a", "--params", params) == 2
    assert "unknown section(s) quantise" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert _run("--model", tiny_dirs["mixtral"], "--out", mine, "--set", "gate.enabled=false") == 2
    assert "mine exists and holds files moe-lab did not write" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"
