"""The benchmark-gate flow: run the DVC ``gate`` stage and, when every check passes, promote the
registered ``candidate`` model to ``champion``. A regression fails the flow and leaves ``champion``
where it was. Runs alone (deployment ``gate``) or as the last step of the pipeline flow.

    python flows/gate.py [--model-name NAME] [--no-promote]     # or: prefect deployment run 'moe-lab-gate/gate'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python flows/gate.py` puts flows/ first on sys.path, not the project
    sys.path.insert(0, str(ROOT))

from moe_engine.tracking import lineage  # noqa: E402
from tasks import stages  # noqa: E402
from tasks.dvc_stage import Tracking  # noqa: E402
from tasks.registry import promote_champion  # noqa: E402


class GateFailed(RuntimeError):
    """A benchmark check regressed."""


@flow(name="moe-lab-gate", log_prints=True)
def benchmark_gate(model_name: str = "moe-lab", promote: bool = True, tracking_uri: str | None = None,
                   parent_run_id: str | None = None, root: str | None = None) -> dict:
    """Gate the current pipeline outputs; promote ``model_name@candidate`` to ``@champion`` if they pass.

    ``parent_run_id``: log the gate under this MLflow pipeline run (the pipeline flow passes its own);
    otherwise the flow opens a pipeline run of its own.
    """
    root = str(Path(root or ROOT).resolve())
    uri = lineage.tracking_uri(tracking_uri, root)
    parent = parent_run_id or lineage.start_pipeline(uri, run_name=f"gate {flow_run.name}", flow_run_id=flow_run.id,
                                                     root=root, params={"model_name": model_name})
    tracking = Tracking(uri, parent, flow_run.id)
    status = "FAILED"
    try:
        result = stages.gate(root, tracking)
        if result.passed is None:  # other settings than the baseline's: reported, nothing promoted
            print(f"gate: no verdict (the run's settings differ from the baseline's); {model_name}@champion unchanged; "
                  f"see {Path(root) / stages.GATE_REPORT[0]}")
            status = "FINISHED"
            return {"passed": None, "champion": None, "gate_run_id": result.run_id}
        if not result.passed:
            raise GateFailed(f"benchmark gate failed: see {Path(root) / stages.GATE_REPORT[0]}; "
                             f"{model_name}@champion unchanged")
        champion = promote_champion(root, tracking, model_name, result.run_id) if promote else None
        print(f"gate passed; {model_name}@champion = version {champion}" if champion else "gate passed")
        status = "FINISHED"
        return {"passed": True, "champion": champion, "gate_run_id": result.run_id}
    finally:
        if parent_run_id is None:
            lineage.end_pipeline(parent, uri, status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python flows/gate.py")
    p.add_argument("--model-name", default="moe-lab", help="registered model name (default: moe-lab)")
    p.add_argument("--no-promote", action="store_true", help="only run the gate")
    p.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else mlflow/mlflow.db)")
    args = p.parse_args(argv)
    benchmark_gate(model_name=args.model_name, promote=not args.no_promote, tracking_uri=args.tracking_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
