"""MLflow logging for the library. The only package that imports mlflow, and only inside functions
that a caller asked to log (so importing the engine never sets a tracking URI or starts a run)."""
