"""Training on DeepSpeed: Trainer (trainer.py), its config, checkpoints, parallel setup, FLOPs and cost."""
