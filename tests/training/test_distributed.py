"""Two CPU processes (gloo) under torchrun or DeepSpeed's launcher: expert parallelism with ZeRO-2 against plain data
parallelism on the same data. Tolerance: the two runs reduce in different orders, so losses agree
to float32 rounding amplified by a few Adam steps; 1e-4 relative is far below any real bug (a
mis-routed expert or a wrongly reduced expert gradient changes the loss in the 2nd decimal)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_engine as me

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(data, out, arch, ep_size, zero_stage=2, steps=6, launcher="torchrun", nproc=2):
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    if launcher == "torchrun":
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()), "-m"]
    else:  # DeepSpeed's own launcher; it adds --local_rank=N before the subcommand
        env["DS_ACCELERATOR"] = "cpu"
        launch = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(_free_port()), "--module"]
    cmd = [
        *launch, "moe_engine.cli", "pretrain", "--data", str(data), "--out", str(out),
        "--set", f"arch={arch}", "--set", f"ep_size={ep_size}", "--set", f"zero_stage={zero_stage}",
        "--set", f"steps={steps}", "--set", "micro_batch_size=4", "--set", "warmup_steps=1",
        "--set", "save_every=0", "--set", "eval_batches=1", "--set", f"log_every={min(3, steps)}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from moe_engine.training.callbacks.history import read_history

    return [row["loss"] for row in read_history(out / "history.csv")]


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_expert_parallel_zero2_matches_data_parallel(arch, demo_data, tmp_path):
    ep1 = _torchrun(demo_data, tmp_path / "ep1", arch, ep_size=1)
    ep2 = _torchrun(demo_data, tmp_path / "ep2", arch, ep_size=2)
    assert len(ep1) == len(ep2) == 6
    rel = max(abs(a - b) / abs(a) for a, b in zip(ep1, ep2))
    assert rel < 1e-4, (ep1, ep2)
    assert ep2[-1] < ep2[0]
    # the EP=2 export holds every expert (gathered from both ranks) and loads in stock transformers
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ep2" / "model").eval()
    engine = me.load(tmp_path / "ep2" / "model").eval()
    ids = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, engine(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_the_deepspeed_launcher_runs_the_same_job_as_torchrun(demo_data, tmp_path):
    by_torchrun = _torchrun(demo_data, tmp_path / "torchrun", "mixtral", ep_size=2, steps=3)
    by_deepspeed = _torchrun(demo_data, tmp_path / "deepspeed", "mixtral", ep_size=2, steps=3, launcher="deepspeed")
    assert by_deepspeed == by_torchrun  # same ranks, same data, same reductions: bitwise
    assert (tmp_path / "deepspeed" / "model" / "config.json").exists()


def test_expert_parallel_over_four_ranks_matches_ep2_by_data_parallel_2(demo_data, tmp_path):
    """EP=4 (every rank holds 2 of OLMoE-tiny's 8 experts) and EP=2 x DP=2 on 4 gloo processes: the
    same function, so the same losses; the export gathers all 8 experts from 4 ranks."""
    ep4 = _torchrun(demo_data, tmp_path / "ep4", "olmoe", ep_size=4, steps=4, nproc=4)
    ep2 = _torchrun(demo_data, tmp_path / "ep2", "olmoe", ep_size=2, steps=4, nproc=4)
    assert len(ep4) == len(ep2) == 4
    assert max(abs(a - b) / abs(a) for a, b in zip(ep4, ep2)) < 1e-4, (ep4, ep2)
    engine = me.load(tmp_path / "ep4" / "model").eval()
    assert me.moe_layers(engine)[0].experts.gate_up_proj.shape[0] == 8
