"""benchmarks/power_phases.py: its phase lines and power log are read back into the committed ratios."""

import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import power_phases  # noqa: E402

LINES = [
    "some warning the device printed",
    "PHASE olmoe-like eager1 100.0 105.0 ms/step 10.000  45 samples, power 680 W, SM clock 1550 MHz",
    "PHASE olmoe-like dense1 107.0 112.0 ms/step 8.000  45 samples, power 675 W, SM clock 1470 MHz",
    "PHASE olmoe-like graph1 114.0 119.0 ms/step 9.800",
    "PHASE olmoe-like dense-graph1 121.0 126.0 ms/step 8.200",
    "PHASE olmoe-like eager2 128.0 133.0 ms/step 10.400",
    "PHASE olmoe-like dense2 135.0 140.0 ms/step 8.400",
    "PHASE olmoe-like graph2 142.0 147.0 ms/step 9.600",
    "PHASE olmoe-like cutlass-graph1 149.0 154.0 ms/step 9.000",
    "PHASE olmoe-like indexsel-graph1 156.0 161.0 ms/step 9.900",
    "PHASE olmoe-like deepgemm1 163.0 168.0 ms/step 9.300",
    "T=32768 PHASE switch-like eager1 1.0 2.0 ms/step 6.000",
]


def test_phase_lines_become_records_and_ratios_to_the_best_dense_median():
    recs = power_phases.records(LINES, tokens=16384)
    assert len(recs) == 11
    assert recs[0] == {"shape": "olmoe-like", "tokens": 16384, "variant": "eager", "round": 1, "ms_per_step": 10.0,
                       "power_w": 680.0, "sm_mhz": 1550.0}
    assert recs[3]["variant"] == "dense-graph" and recs[3]["power_w"] is None
    assert recs[-1]["tokens"] == 32768 and recs[-1]["shape"] == "switch-like"
    r = power_phases.ratios(recs)
    olmoe = r["olmoe-like T=16384"]
    assert olmoe["ms"]["eager"] == pytest.approx(10.2) and olmoe["ms"]["dense"] == pytest.approx(8.2)
    # the engine's best median (graph 9.7) over the dense baseline's best median (dense 8.2, dense-graph 8.2)
    assert olmoe["engine vs dense"] == pytest.approx(9.7 / 8.2)
    assert olmoe["engine on tuned CUTLASS vs dense"] == pytest.approx(9.0 / 8.2)
    assert olmoe["engine with the index_select permute vs dense"] == pytest.approx(9.9 / 8.2)
    assert olmoe["engine on DeepGEMM vs dense"] == pytest.approx(9.3 / 8.2)
    assert r["switch-like T=32768"] == {"ms": {"eager": 6.0}}  # no dense phase, no ratio


def test_power_log_is_averaged_inside_a_phase_after_its_first_half_second(tmp_path):
    t0 = time.time()
    stamp = lambda dt: datetime.fromtimestamp(t0 + dt).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]  # noqa: E731
    log = tmp_path / "pw.csv"
    log.write_text("\n".join([f"{stamp(0.2)}, 100.00 W, 900 MHz",  # inside the first 0.5 s: left out
                              f"{stamp(1.0)}, 600.00 W, 1500 MHz", f"{stamp(2.0)}, 700.00 W, 1600 MHz",
                              "garbage line", f"{stamp(9.0)}, 50.00 W, 300 MHz"]) + "\n")  # after the phase
    assert power_phases.power_in(log, t0, t0 + 3.0) == "2 samples, power 650 W, SM clock 1550 MHz"
    assert power_phases.power_in(log, t0 + 20, t0 + 30) == "no power samples"
