"""Model presets: a debug size per architecture (CPU, seconds) and the published shapes.

Published shapes are the released models' configs (from their papers / model cards), so users can
instantiate the architecture from config — on the ``meta`` device to inspect sizes, or sharded.
Everything not listed takes transformers' config defaults.
"""

from __future__ import annotations

ARCH_ALIASES = {
    "mixtral": "mixtral",
    "olmoe": "olmoe",
    "qwen2_moe": "qwen2_moe",
    "qwen2-moe": "qwen2_moe",
    "deepseek_v3": "deepseek_v3",
    "deepseek-v3": "deepseek_v3",
    "switch": "switch_transformers",
    "switch_transformers": "switch_transformers",
}

_TINY_DECODER = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)

PRESETS: dict[str, dict[str, dict]] = {
    "mixtral": {
        "tiny": dict(_TINY_DECODER, intermediate_size=128, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        # benchmark scale: Mixtral's shape (8 experts, top-2, GQA 2:1) at ~0.8B total / 0.26B active
        # parameters, so the model and its AdamW state fit one H100 with room for 16k-token batches
        "mixtral-0.8b": dict(
            vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=10, num_attention_heads=16,
            num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
        ),
        # Mixtral of Experts (Jiang et al. 2024), mistralai/Mixtral-8x7B-v0.1 config.json
        "mixtral-8x7b": dict(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6}, router_aux_loss_coef=0.02,
        ),
    },
    "olmoe": {
        "tiny": dict(
            _TINY_DECODER, intermediate_size=32, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
            eos_token_id=2, pad_token_id=1,
        ),
        # benchmark scale: OLMoE-1B-7B's layer (64 experts, top-8, D=2048, F=1024) with 4 of its 16 layers
        "olmoe-4l": dict(
            vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=16,
            num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
            norm_topk_prob=False, router_aux_loss_coef=0.01, eos_token_id=0, pad_token_id=1,
        ),
        # benchmark scale, fine-grained: Qwen3-30B-A3B's MoE layer (128 experts, top-8, D=2048, F=768,
        # renormalised top-k) on OLMoE's architecture, 4 layers; fits one H200 with its optimizer state
        "olmoe-e128-4l": dict(
            vocab_size=50304, hidden_size=2048, intermediate_size=768, num_hidden_layers=4, num_attention_heads=16,
            num_key_value_heads=16, num_experts=128, num_experts_per_tok=8, max_position_embeddings=4096,
            norm_topk_prob=True, router_aux_loss_coef=0.001, eos_token_id=0, pad_token_id=1,
        ),
        # OLMoE (Muennighoff et al. 2024), allenai/OLMoE-1B-7B-0924 config.json
        "olmoe-1b-7b": dict(
            vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
            norm_topk_prob=False, router_aux_loss_coef=0.01,
        ),
    },
    "qwen2_moe": {
        "tiny": dict(
            _TINY_DECODER, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        ),
        # Qwen/Qwen1.5-MoE-A2.7B config.json
        "qwen1.5-moe-a2.7b": dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
            num_experts=60, num_experts_per_tok=4, norm_topk_prob=False, max_position_embeddings=8192,
        ),
    },
    "deepseek_v3": {
        # DeepSeek-V3 tiny configs need num_key_value_heads == num_attention_heads (STACK.md).
        "tiny": dict(
            _TINY_DECODER, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
            q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        ),
        # DeepSeek-V3 technical report (DeepSeek-AI 2024), deepseek-ai/DeepSeek-V3 config.json (without MTP)
        "deepseek-v3-style": dict(
            vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
            n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
            routed_scaling_factor=2.5, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
            v_head_dim=128, max_position_embeddings=4096,
        ),
    },
    "switch_transformers": {
        "tiny": dict(
            vocab_size=512, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
            num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=8,
            dropout_rate=0.0, router_jitter_noise=0.0, decoder_start_token_id=0,
        ),
        # Switch Transformers (Fedus et al. 2021), google/switch-base-8 config.json
        "switch-base-8": dict(
            vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
            num_sparse_encoder_layers=6, num_sparse_decoder_layers=6, num_experts=8, expert_capacity=64,
            decoder_start_token_id=0,
        ),
    },
}


def canonical_arch(arch: str) -> str:
    from moe_engine.errors import ConfigError

    try:
        return ARCH_ALIASES[arch.lower()]
    except KeyError:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {sorted(set(ARCH_ALIASES))}") from None


def preset_kwargs(arch: str, preset: str) -> dict:
    from moe_engine.errors import ConfigError

    arch = canonical_arch(arch)
    try:
        return dict(PRESETS[arch][preset])
    except KeyError:
        raise ConfigError(f"no preset {preset!r} for {arch}; available: {sorted(PRESETS[arch])}") from None
