"""Training: the short single-process Trainer (simple.py); DeepSpeed training builds on the same pieces."""
