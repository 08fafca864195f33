"""Prefect tasks: one per DVC stage (``stages.py``), each running its stage through DVC's Python API
so that unchanged stages are skipped, plus the model-registry and parameter tasks the flows chain.
Thin by design: the work lives in ``moe_engine`` (the stage commands) and in DVC and MLflow."""
