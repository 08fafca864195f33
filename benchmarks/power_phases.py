"""The olmoe-like engine layer's fwd+bwd, eager and replayed from CUDA graphs, alternated in phases of
``--seconds`` each (2 s apart), for reading against a power and clock log taken beside it:

    nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -lms 100 > pw.csv & NP=$!
    python benchmarks/power_phases.py > phases.txt; kill $NP

Each phase prints ``PHASE name start end ms/step X`` (unix times), so the log's samples can be averaged per
phase. Short benchmark runs (``moe_layer.py``'s 200 ms) sit in whatever power state the previous variant
left; sustained phases show what the card's power cap allows each.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.moe_layer import SHAPES, engine_train_step, graphed_engine  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="olmoe-like", choices=list(SHAPES))
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args(argv)
    D = SHAPES[args.shape][0]
    eng, step = engine_train_step(args.shape, args.tokens)

    def phase(name):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0, n = time.time(), 0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        while time.time() - t0 < args.seconds:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
            n += 10
        end.record()
        end.synchronize()
        print(f"PHASE {name} {t0:.3f} {time.time():.3f} ms/step {start.elapsed_time(end) / n:.3f}", flush=True)
        time.sleep(2)

    for i in (1, 2):
        phase(f"eager{i}")
        graphed_engine(eng, args.tokens, D, "cuda", torch.bfloat16)
        phase(f"graph{i}")
        eng.graphs.release()


if __name__ == "__main__":
    main()
