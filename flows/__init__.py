"""Prefect flows: ``pipeline.py`` (every DVC stage, then the candidate model and the gate) and
``gate.py`` (the benchmark gate, promoting ``champion`` when it passes). Deployments: prefect.yaml."""
