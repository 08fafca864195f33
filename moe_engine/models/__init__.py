"""transformers MoE models with engine layers: presets, per-architecture adapters, build/load."""
