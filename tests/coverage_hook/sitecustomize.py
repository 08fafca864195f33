"""Imported by Python at the start of every process whose PYTHONPATH holds this folder (the pipeline and
DVC tests put it there). `make test` traces every Python child process (coverage's subprocess patch);
DVC's and Prefect's own command-line processes (``dvc repro``, ``prefect worker start``, ``prefect
deployment run --watch``) run no project code and tracing roughly doubled their CPU, so they stop the
tracer here. Their children keep the hook in their environment: DVC's stage commands (``moe-lab ...``,
torchrun ranks) and the Prefect worker's flow runs (``python -m prefect.engine``) are measured as before."""

import os
import sys

_script = sys.argv[0] if sys.argv else ""
_tool = os.path.basename(_script) in ("dvc", "prefect") or _script.endswith(os.path.join("dvc", "__main__.py"))
if _tool and "coverage" in sys.modules:  # dvc/__main__.py: DVC's daemons, e.g. the `dvc queue` workers
    import coverage

    _cov = coverage.Coverage.current()
    if _cov is not None:
        _cov.stop()
