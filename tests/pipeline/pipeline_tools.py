"""Helpers of the pipeline tests: the real tools, run and stopped cleanly."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's moe-lab, dvc, prefect
# On PYTHONPATH of the tools' processes: DVC's and Prefect's CLIs stop make test's tracer (they run no project
# code); their children, the stage commands and flow runs, are still measured (tests/coverage_hook/sitecustomize.py)
COVERAGE_HOOK = REPO / "tests" / "coverage_hook"

# Debug sizes: the whole pipeline in ~1.5 min on 2 CPU cores.
TINY = {
    "data": {"tokenizer": {"vocab_size": 512}, "shards": {"seq_len": 64}},
    "pretrain": {"steps": 20, "micro_batch_size": 4, "warmup_steps": 2, "save_every": 10, "snapshot_every": 10,
                 "log_every": 5, "eval_batches": 2},
    "pretrain_dense": {"steps": 20, "micro_batch_size": 4, "warmup_steps": 2, "save_every": 10, "log_every": 5,
                       "eval_batches": 2},
    "finetune": {"steps": 4, "micro_batch_size": 4, "log_every": 2, "task": {"max_length": 128, "max_records": 64},
                 "eval": {"test_records": 16, "generate_records": 2, "max_new_tokens": 4, "retention_sequences": 16}},
    "evaluate": {"batch_size": 16, "max_sequences": 32},
    "benchmark": {"limit": 8, "passage_items": 8},
    "quantize": {"calibration": {"sequences": 2}, "gate": {"max_sequences": 32}},
    "export": {"latency": {"batch_sizes": [1], "length": 16, "repeats": 1}, "gate": {"max_sequences": 32}},
    "analyze": {"max_tokens": 256},
}
# A gate the debug run passes (the committed baseline is for the demo size); tests swap in failing ones.
PASSING_GATE = {"checks": [{"name": "MoE validation loss", "source": "evaluate", "key": "moe.val_loss",
                            "baseline": 100.0, "better": "lower", "tolerance": 0.0}],
                "params": {"pretrain": {"steps": 20}, "evaluate": {"max_sequences": 32}}}  # other settings: no verdict


def merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return base


def untraced(env: dict) -> dict:
    """``env`` for a command that runs no project code (Prefect's CLI polling its server): without `make
    test`'s coverage hook, which would trace all of its Python for nothing."""
    return {k: v for k, v in env.items() if k not in ("COVERAGE_PROCESS_START", "COVERAGE_PROCESS_CONFIG")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """TERM the process group (servers spawn children), KILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")
