"""MLflow logging of an analysis: the analyze stage logs through the one stage-run path (lineage tags), only
when tracking is on."""

import subprocess
import sys

import pytest
import torch

import moe_engine as me
from moe_engine.cli import main


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from MLflow's SQLAlchemy store
def test_cli_logs_report_and_metrics_to_mlflow(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow puts a database store's artifacts under ./mlruns
    me.build_model("mixtral", preset="tiny", seed=0).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ids").mkdir()
    torch.save(torch.randint(0, 512, (256,)), tmp_path / "ids" / "code.pt")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    argv = ["analyze", str(tmp_path / "ckpt"), "--data", str(tmp_path / "ids"), "--out", str(tmp_path / "out"),
            "--seq-len", "32"]
    assert main(argv) == 0, capsys.readouterr().err
    run_id = capsys.readouterr().out.split("MLflow run ")[1].split()[0]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["moe_lab.stage"] == "analyze"
    assert run.data.metrics["analyze/router/layer0/tokens"] == 256 and run.data.params["seq_len"] == "32"
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.html", "load_heatmap.png", "domain_specialisation.png"} <= files


def test_importing_the_analytics_has_no_heavy_or_forbidden_imports():
    code = (
        "import sys, moe_engine.analytics, moe_engine.analytics.online, moe_engine.analytics.recorder, "
        "moe_engine.analytics.cli\n"
        "bad = [m for m in ('matplotlib', 'mlflow', 'prefect', 'dvc', 'pandas', 'pandera') if m in sys.modules]\n"
        "import moe_engine.analytics.analyze\n"
        "bad += [m for m in ('matplotlib', 'mlflow', 'prefect', 'dvc') if m in sys.modules]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
