"""benchmarks/expert_sweep.py: the sweep's points keep the active width; the smoke mode runs real DVC
experiments (queue, worker, exp show) in a temporary copy of the repository."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import expert_sweep  # noqa: E402


def test_points_keep_the_active_width_on_every_axis():
    pts = expert_sweep.points((8, 2, 64), experts=[4, 8, 16], top_k=[1, 2, 4], granularity=[1, 2, 4])
    by_name = {p["name"]: p for p in pts}
    assert sorted(by_name) == sorted(["E4-k2-F64", "E8-k2-F64", "E16-k2-F64", "E8-k1-F128", "E8-k4-F32",
                                      "E16-k4-F32", "E32-k8-F16"])
    assert all(p["top_k"] * p["width"] == 128 for p in pts)
    assert by_name["E8-k2-F64"]["axes"] == ["experts", "granularity", "top_k"]  # the base lies on all three
    assert by_name["E8-k2-F64"]["granularity"] == 1
    assert by_name["E32-k8-F16"]["granularity"] == 4 and by_name["E32-k8-F16"]["axes"] == ["granularity"]
    # granularity keeps total expert parameters too: E x F is the base's
    assert all(p["experts"] * p["width"] == 8 * 64 for p in pts if "granularity" in p["axes"])
    with pytest.raises(SystemExit, match="top-k 3"):
        expert_sweep.points((8, 2, 64), [8], [3], [1])
    with pytest.raises(SystemExit, match="granularity 3"):
        expert_sweep.points((8, 2, 64), [8], [2], [3])


def test_collect_reads_dvc_exp_show():
    show = [{"rev": "workspace", "experiments": None},
            {"rev": "abc", "name": "master", "experiments": [{
                "name": "E4-k1-F32", "executor": {"state": "success"},
                "revs": [{"rev": "def", "name": "E4-k1-F32", "error": None, "data": {
                    "params": {"params.yaml": {"data": {"pretrain": {"steps": 4, "model": {"num_local_experts": 4}}}}},
                    "metrics": {"outputs/evaluate/metrics.json": {"data": {"moe": {"val_loss": 5.0}, "dense": {"val_loss": 5.1},
                                                                            "moe_minus_dense": {"val": -0.1}}}}}}]}]}]
    rows = expert_sweep.collect(show)
    assert rows == [{"name": "E4-k1-F32", "rev": "def", "state": "success", "error": None,
                     "pretrain_model": {"num_local_experts": 4}, "pretrain_dense_model": {}, "steps": 4,
                     "moe": {"val_loss": 5.0}, "dense": {"val_loss": 5.1}, "moe_minus_dense": {"val": -0.1},
                     "pretrain": {}, "pretrain_dense": {}}]


@pytest.mark.slow
def test_smoke_sweep_runs_dvc_experiments(tmp_path, monkeypatch):
    # DVC's own processes (CLI, queue workers) run no project code: not traced by make test's coverage
    # (tests/coverage_hook); the experiments' stage commands still are
    hook = Path(__file__).resolve().parents[1] / "coverage_hook"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(hook)])))
    out = tmp_path / "sweep.json"
    assert expert_sweep.main(["--smoke", "--out", str(out), "--timeout", "600"]) == 0
    result = json.loads(out.read_text())
    names = {p["name"] for p in result["points"]}
    assert names == {"E2-k1-F32", "E4-k1-F32"}
    done = {r["name"]: r for r in result["experiments"]}
    assert set(done) == names and not result["failed"]
    for name, r in done.items():
        experts = int(name.split("-")[0][1:])
        assert r["pretrain_model"]["num_local_experts"] == experts  # the -S override reached params.yaml
        assert r["pretrain"]["size"]["params_total"] > 0 and r["moe"]["val_loss"] > 0
        assert r["moe_minus_dense"]["val"] == pytest.approx(r["moe"]["val_loss"] - r["dense"]["val_loss"])
    # one dense baseline, FLOP-matched to every point (same active width), restored from DVC's run cache
    assert len({json.dumps(r["dense"], sort_keys=True) for r in done.values()}) == 1
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
