import os
from pathlib import Path

import pytest
import torch

# Keep third-party tools quiet and offline in every test process.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# The longest test files, started first: `make test` runs the suite on two workers (pytest-xdist,
# --dist loadfile: a file's tests stay in order on one worker), so the long orchestration file must not
# be the last one handed out. The Makefile passes --no-loadscope-reorder: xdist's default hands files out
# by test count instead, which put the 6-test orchestration file (a third of the run) among the last.
LONGEST_FIRST = ["pipeline/test_orchestration.py", "export/test_graphs.py", "export/test_fused.py",
                 "export/test_quantized.py", "training/test_distributed.py", "tracking/test_mlflow_run.py",
                 "benchmarks/test_expert_sweep.py", "test_readme.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item):
        rel = Path(str(item.fspath)).relative_to(REPO / "tests").as_posix()
        return rank.get(rel, len(rank))

    items.sort(key=key)  # stable: the order inside each file, and of the other files, is kept


@pytest.fixture
def run_in_triton_interpreter():
    """``run(test_file, select)``: the tests of ``test_file`` matching ``-k select`` in a pytest subprocess
    with Triton's CPU interpreter on (it must be on before Triton is first imported); asserts they
    passed and returns pytest's summary line."""
    import subprocess
    import sys

    def run(test_file: str, select: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-k", select,
                               test_file], env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        return proc.stdout.strip().splitlines()[-1]

    return run


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present (only needed for tests on the full shared corpus)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The committed demo corpus prepared once per session (small vocabulary for speed)."""
    from moe_engine.data import DataConfig, prepare

    config = DataConfig.from_dict({"tokenizer": {"vocab_size": 1024}, "shards": {"seq_len": 64}})
    return prepare(out_dir=tmp_path_factory.mktemp("demo") / "data", config=config)
