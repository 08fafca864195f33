"""Evaluation stage: perplexity in and out of domain, loss per domain, MoE vs dense at equal FLOPs."""
