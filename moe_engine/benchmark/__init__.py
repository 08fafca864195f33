"""Benchmark stage: multiple-choice tasks on EleutherAI's lm-evaluation-harness, MoE vs dense baselines."""
