"""Weight-only int8/int4 quantization of MoE checkpoints (experts always; attention and dense linears on request)."""
