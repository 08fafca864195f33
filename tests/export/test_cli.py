import json

from moe_engine.cli import main


def test_export_command_writes_graphs_manifest_metrics_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(tiny_dir("olmoe")), "--out", str(out), "--no-past",
                 "--set", "latency.repeats=1", "--set", "latency.batch_sizes=[1, 8]", "--set", "latency.length=8"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["parity"]) == {"model"} and metrics["parity_max"] <= 1e-4
    assert set(metrics["latency"]) == {"batch_1", "batch_8"} and metrics["latency"]["batch_8"]["onnx_ms"] > 0
    assert metrics["bytes"]["model"] == sum(p.stat().st_size for p in out.glob("model.onnx*"))
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["graphs"]["model"]["inputs"] == ["input_ids", "attention_mask"]
    assert manifest["versions"]["onnxruntime"] and "| model |" in (out / "report.md").read_text()
    assert "| model |" in capsys.readouterr().out


def test_export_refuses_bad_settings_and_quantized_models_with_exit_2(tiny_dir, tmp_path, capsys):
    assert main(["export", "--model", str(tiny_dir("mixtral")), "--out", str(tmp_path / "a"), "--set", "opset=18"]) == 2
    assert "export.opset = 18" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tiny_dir("mixtral")), "--out", str(tmp_path / "q"),
                 "--set", "gate.enabled=false"]) == 0
    assert main(["export", "--model", str(tmp_path / "q" / "model"), "--out", str(tmp_path / "b")]) == 2
    assert "pass the unquantized model as --model" in capsys.readouterr().err
    assert main(["export", "--model", str(tiny_dir("mixtral")), "--quantized", str(tmp_path / "q" / "model"),
                 "--out", str(tmp_path / "c")]) == 2
    assert "pass --data" in capsys.readouterr().err
