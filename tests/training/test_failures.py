"""What a user can do wrong to `moe-lab pretrain`, through the real CLI: settings and inputs are
checked before DeepSpeed starts (exit 2, one readable message), re-runs change nothing, resumes
follow one documented rule, statistics survive resumes, and nothing listens beyond loopback."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_engine.cli import main
from moe_engine.training.callbacks.history import read_history

REPO = Path(__file__).resolve().parents[2]
FAST = ["--set", "micro_batch_size=4", "--set", "log_every=2", "--set", "eval_batches=1", "--set", "warmup_steps=1"]


def _pretrain(data, out, *sets, fresh=False):
    args = ["pretrain", "--data", str(data), "--out", str(out), *FAST]
    for item in sets:
        args += ["--set", item]
    return main(args + (["--fresh"] if fresh else []))


@pytest.mark.parametrize("sets, message", [
    (["router.top_k=9"], "pretrain.router.top_k = 9: must be in [1, num_experts = 4]"),
    (["router.top_k=0"], "top_k = 0: must be in [1, num_experts = 4]"),
    (["router.capacity_factor=0"], "capacity_factor = 0.0: must be > 0"),
    (["router.aux_loss_coef=-1"], "aux_loss_coef = -1.0: must be >= 0"),
    (["router.top_kk=1"], "'pretrain.router.top_kk' is not a setting (valid in 'pretrain.router': kind, num_experts, top_k"),
    (["stepz=3"], "'pretrain.stepz' is not a setting"),
    (["lr=fast"], "pretrain.lr: expected float, got 'fast'"),
    (["preset=huge"], "pretrain.preset = 'huge': must be a preset of mixtral"),
    (["model.hidden_sizee=8"], "mixtral config has no field(s) ['hidden_sizee']"),
    (["model.num_attention_heads=3"], "model.num_attention_heads = 3 is not a multiple of model.num_key_value_heads = 2"),
    (["model.num_attention_heads=6", "model.num_key_value_heads=6"], "model.hidden_size = 64 is not divisible by model.num_attention_heads = 6"),
    (["router_monitor.imbalance_alert=0.5"], "imbalance_alert = 0.5: must be >= 1"),
])
def test_bad_settings_exit_2_before_deepspeed_starts(sets, message, demo_data, tmp_path, capsys):
    started = time.perf_counter()
    assert _pretrain(demo_data, tmp_path, *sets) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert time.perf_counter() - started < 10 and not (tmp_path / "checkpoints").exists()


def test_yaml_12_numbers_train(demo_data, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("pretrain:\n  lr: 3e-3\n  steps: 2\n  save_every: 0\n")
    assert main(["pretrain", "--data", str(demo_data), "--out", str(tmp_path / "a"), "--params", str(params), *FAST,
                 "--set", "lr=1e-3"]) == 0
    rows = read_history(tmp_path / "a" / "history.csv")
    assert len(rows) == 2 and rows[0]["lr"] == pytest.approx(1e-3)  # warmup 1: the first step runs at the peak


def test_unknown_params_section_is_refused_with_the_valid_ones(demo_data, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("pretrain: {steps: 2}\npretrian: {steps: 3}\n")
    assert main(["pretrain", "--data", str(demo_data), "--params", str(params), "--out", str(tmp_path / "o")]) == 2
    assert "unknown section(s) pretrian (valid: analyze, benchmark, data, evaluate, export, finetune, generate, pretrain" in capsys.readouterr().err


def test_a_missing_shard_is_named_before_training(demo_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    victim = sorted(data.glob("val_*.npy"))[0]
    victim.unlink()
    assert _pretrain(data, tmp_path / "o", "steps=2") == 2
    err = capsys.readouterr().err
    assert f"missing_shard" in err and victim.name in err and not (tmp_path / "o").exists()


def test_an_unreachable_tracking_server_fails_in_seconds(demo_data, tmp_path, capsys):
    started = time.perf_counter()
    assert _pretrain(demo_data, tmp_path, "steps=2", "mlflow_tracking_uri=http://127.0.0.1:9") == 2
    assert time.perf_counter() - started < 30
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in capsys.readouterr().err


def test_a_finished_run_rerun_changes_nothing_and_says_so(demo_data, tmp_path, capsys):
    assert _pretrain(demo_data, tmp_path, "steps=4", "save_every=2") == 0
    files = {name: (tmp_path / name).read_bytes() for name in ("metrics.json", "tokens_per_expert.json", "history.csv")}
    model = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert _pretrain(demo_data, tmp_path, "steps=4", "save_every=2", "log_every=3") == 0  # bookkeeping may differ
    assert "already holds this finished run" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == model


def test_resume_rules_lr_applies_other_settings_refused(demo_data, tmp_path, capsys):
    assert _pretrain(demo_data, tmp_path, "steps=4", "save_every=2", "lr=1e-3", "warmup_steps=0") == 0
    # a longer run with a new peak lr resumes at step 4 and really uses the new lr
    assert _pretrain(demo_data, tmp_path, "steps=6", "save_every=2", "lr=5e-3", "warmup_steps=0") == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "step_00000004 at step 4 (changed: lr, steps)" in err
    rows = read_history(tmp_path / "history.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    from moe_engine.training.loop import warmup_cosine

    assert rows[4]["lr"] == pytest.approx(5e-3 * warmup_cosine(5, 0, 6, 0.1))  # step 5 at the new peak and length
    # anything else changed: refused, naming what changed and what may change
    assert _pretrain(demo_data, tmp_path, "steps=8", "save_every=2", "lr=5e-3", "warmup_steps=0", "micro_batch_size=2") == 2
    err = capsys.readouterr().err
    assert "micro_batch_size: 4 -> 2" in err and "Only " in err and "--fresh" in err
    assert _pretrain(demo_data, tmp_path, "steps=8", "save_every=2", "arch=olmoe") == 2
    assert "arch: 'mixtral' -> 'olmoe'" in capsys.readouterr().err
    # --fresh starts over, without the old checkpoints once its own exist, and without the old run's
    # history rows past this run's end
    assert _pretrain(demo_data, tmp_path, "steps=2", "save_every=2", "arch=olmoe", fresh=True) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert [r["step"] for r in read_history(tmp_path / "history.csv")] == [1, 2]
    assert not (tmp_path / "history.partial.csv").exists()


def test_a_failed_fresh_run_leaves_the_last_runs_history_and_snapshots(demo_data, tmp_path, monkeypatch):
    from moe_engine.training.callbacks.history import History

    assert _pretrain(demo_data, tmp_path, "steps=4", "save_every=0", "snapshot_every=2") == 0
    kept = {p: p.read_bytes() for p in [tmp_path / "history.csv", *sorted((tmp_path / "snapshots").rglob("*"))] if p.is_file()}
    assert sorted(p.name for p in (tmp_path / "snapshots").glob("step_*")) == ["step_00000002", "step_00000004"]

    def fail_at_step_3(self, loop, post=History.post_step):
        post(self, loop)
        if loop.step == 3:
            raise RuntimeError("the node went away")

    monkeypatch.setattr(History, "post_step", fail_at_step_3)
    with pytest.raises(RuntimeError, match="the node went away"):
        _pretrain(demo_data, tmp_path, "steps=6", "save_every=0", "snapshot_every=1", fresh=True)
    assert {p: p.read_bytes() for p in kept} == kept  # the last good run's rows and snapshots, bit for bit
    assert sorted(p.name for p in (tmp_path / "snapshots").glob("step_*")) == ["step_00000002", "step_00000004"]
    assert [r["step"] for r in read_history(tmp_path / "history.partial.csv")] == [1, 2, 3]  # the failed run's own
    # step 3 failed before its snapshot (History runs before Snapshots)
    assert sorted(p.name for p in (tmp_path / "snapshots.partial").glob("step_*")) == ["step_00000001", "step_00000002"]


def _listening(pid: int) -> list[str]:
    import psutil

    try:
        conns = psutil.Process(pid).net_connections(kind="inet")
    except psutil.Error:
        return []
    return [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN]


def _pretrain_cmd(data, out, steps, save_every):
    return [sys.executable, "-m", "moe_engine.cli", "pretrain", "--data", str(data), "--out", str(out), *FAST,
            "--set", f"steps={steps}", "--set", f"save_every={save_every}"]


@pytest.mark.slow
def test_an_interrupted_run_keeps_the_outputs_binds_loopback_only_and_counts_across_resumes(demo_data, tmp_path):
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out in (straight, resumed):  # a finished 4-step run, then a longer one on top of it
        subprocess.run(_pretrain_cmd(demo_data, out, 4, 4), check=True, env=env, capture_output=True)
    subprocess.run(_pretrain_cmd(demo_data, straight, 12, 4), check=True, env=env, capture_output=True)
    before = (resumed / "metrics.json").read_bytes()
    proc = subprocess.Popen(_pretrain_cmd(demo_data, resumed, 12, 4), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest, addresses = resumed / "checkpoints" / "latest", set()
    deadline = time.time() + 300
    while time.time() < deadline and latest.read_text().strip() != "step_00000008":
        addresses.update(_listening(proc.pid))
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # after the step-8 checkpoint, before the run finished
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (143, -signal.SIGTERM) and "Traceback" not in err, err[-2000:]
    assert (resumed / "metrics.json").read_bytes() == before  # the interrupted run published nothing
    assert [r["step"] for r in read_history(resumed / "history.csv")] == [1, 2, 3, 4]
    assert addresses <= {"127.0.0.1", "::1"}, addresses
    subprocess.run(_pretrain_cmd(demo_data, resumed, 12, 4), check=True, env=env, capture_output=True)
    a = json.loads((straight / "tokens_per_expert.json").read_text())
    b = json.loads((resumed / "tokens_per_expert.json").read_text())
    assert a == b and all(sum(c) > 0 for c in a.values())  # counted from step 1, over two resumes
    assert [r["loss"] for r in read_history(straight / "history.csv")] == [r["loss"] for r in read_history(resumed / "history.csv")]


def test_resumed_runs_carry_their_snapshots_on(demo_data, tmp_path, monkeypatch):
    from moe_engine.training.callbacks.history import History

    steps = lambda folder: sorted(p.name for p in folder.glob("step_*"))  # noqa: E731
    assert _pretrain(demo_data, tmp_path, "steps=4", "save_every=2", "snapshot_every=2") == 0
    weights = tmp_path / "snapshots" / "step_00000002" / "model.safetensors"
    inode = weights.stat().st_ino
    # a longer run on top of the finished one: its snapshots are linked in, not copied, then published whole
    post = History.post_step

    def fail_at_step_7(self, loop):
        post(self, loop)
        if loop.step == 7:
            raise RuntimeError("the node went away")

    monkeypatch.setattr(History, "post_step", fail_at_step_7)
    with pytest.raises(RuntimeError):
        _pretrain(demo_data, tmp_path, "steps=8", "save_every=2", "snapshot_every=2")
    assert steps(tmp_path / "snapshots") == ["step_00000002", "step_00000004"]
    assert steps(tmp_path / "snapshots.partial") == ["step_00000002", "step_00000004", "step_00000006"]
    assert (tmp_path / "snapshots.partial" / "step_00000002" / "model.safetensors").stat().st_ino == inode
    monkeypatch.setattr(History, "post_step", post)
    assert _pretrain(demo_data, tmp_path, "steps=8", "save_every=2", "snapshot_every=2") == 0  # resumes at step 6
    assert steps(tmp_path / "snapshots") == ["step_00000002", "step_00000004", "step_00000006", "step_00000008"]
    assert [r["step"] for r in read_history(tmp_path / "history.csv")] == list(range(1, 9))
    assert not (tmp_path / "snapshots.partial").exists() and not (tmp_path / "history.partial.csv").exists()
