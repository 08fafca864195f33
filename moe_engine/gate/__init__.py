"""Benchmark gate: compare a run's metrics with a committed baseline and fail on regression."""
