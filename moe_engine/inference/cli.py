"""``moe-lab generate``: stream text from a saved model and print tokens/s.

    moe-lab generate --model outputs/pretrain/model --prompt "Once upon a time" --max-new-tokens 64 \
        [--sample --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--static-cache | --compile | --cuda-graphs] \
        [--offload 0.25 --offload-store disk --offload-policy stats --offload-stats expert_load.csv --prefetch] \
        [--params params.yaml --set max_new_tokens=32] [--json result.json]

Settings resolve in order: the defaults, the ``generate:`` section of ``--params``, ``--set`` items,
then the flags given. The text goes to stdout as it is generated (one prompt) or after (several);
the timing and cache statistics go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_FLAGS = {  # argparse dest -> GenerateConfig key
    "max_new_tokens": "max_new_tokens", "sample": "do_sample", "temperature": "temperature", "top_k": "top_k",
    "top_p": "top_p", "seed": "seed", "device": "device", "dtype": "dtype", "compile": "compile",
    "cuda_graphs": "cuda_graphs", "experts_mode": "experts_mode", "ignore_eos": "stop_at_eos", "fused_norms": "fused_norms",
}
_OFFLOAD_FLAGS = {
    "offload_store": "store", "offload_policy": "policy", "offload_stats": "stats", "prefetch": "prefetch",
    "low_precision_bits": "low_precision_bits", "low_precision_below": "low_precision_below",
}


def _config(args):
    from moe_engine.config import load_section
    from moe_engine.errors import ConfigError
    from moe_engine.inference.config import GenerateConfig
    from moe_engine.stages import sections

    cfg = (load_section(GenerateConfig, args.params, "generate", args.set, known_sections=sections()) if args.params
           else GenerateConfig().override(args.set or []))
    changes = {key: getattr(args, dest) for dest, key in _FLAGS.items() if getattr(args, dest) is not None}
    if "stop_at_eos" in changes:
        changes["stop_at_eos"] = not changes["stop_at_eos"]
    if args.static_cache:
        changes["cache"] = "static"
    given = [dest for dest in _OFFLOAD_FLAGS if getattr(args, dest) is not None]
    if given and args.offload is None and not cfg.offload.enabled:
        raise ConfigError(f"--{given[0].replace('_', '-')} needs --offload FRACTION (the share of experts kept on the device)")
    offload = {_OFFLOAD_FLAGS[dest]: getattr(args, dest) for dest in given}
    if args.offload is not None:
        offload.update(enabled=True, resident=args.offload)
    for key, value in offload.items():
        changes[f"offload.{key}"] = value
    return cfg.override(changes) if changes else cfg


def _prompts(args) -> list[str]:
    from moe_engine.errors import InputError

    prompts = list(args.prompt or [])
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise InputError(f"--prompt-file {args.prompt_file} does not exist")
        try:
            prompts.append(args.prompt_file.read_text(encoding="utf-8").rstrip("\n"))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--prompt-file {args.prompt_file} cannot be read as UTF-8 text: {exc}") from None
    if not prompts:
        raise InputError("give a prompt: --prompt TEXT (repeat it for a batch) or --prompt-file PATH")
    return prompts


def run_generate(args: argparse.Namespace) -> int:
    from moe_engine.errors import InputError
    from moe_engine.inference.generate import generate, load_tokenizer

    cfg = _config(args)
    prompts = _prompts(args)
    if not (args.model / "config.json").is_file():
        raise InputError(f"--model {args.model} is not a model directory (no config.json); pass the folder a stage saved")
    tokenizer = load_tokenizer(args.model)
    streamer = None
    if len(prompts) == 1:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)  # echoes the prompt first
    result = generate(args.model, prompts if len(prompts) > 1 else prompts[0], cfg, tokenizer=tokenizer, streamer=streamer)
    if streamer is None:
        for prompt, text in zip(prompts, result.texts):
            print(f"{prompt}{text}\n")
    print(f"{result.new_tokens} new tokens in {result.seconds:.2f} s: {result.tokens_per_s:.1f} tokens/s "
          f"(decode {result.decode_tokens_per_s:.1f} tokens/s, batch {len(prompts)})", file=sys.stderr)
    if result.offload:
        d = result.offload["decode"]
        print(f"offload (decode steps): hit rate {d['hit_rate']:.2f}, prefetch accuracy {d['prefetch_accuracy']:.2f}, "
              f"{d['bytes_per_token'] / 1e6:.2f} MB moved per token, stall {d['stall_s_per_token'] * 1e3:.2f} ms per token",
              file=sys.stderr)
    if args.json is not None:
        from dataclasses import asdict

        from moe_engine.io import write_json

        write_json(args.json, dict(asdict(result), tokens_per_s=result.tokens_per_s,
                                   decode_tokens_per_s=result.decode_tokens_per_s))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="generate text from a saved MoE model (streams it, prints tokens/s)",
        description="Generate text with a model directory (engine MoE layers installed on load; tokenizer from the "
        "same folder). Greedy unless --sample. The decode path reads only the selected experts; --offload keeps "
        "experts off the device with a per-layer cache.",
    )
    p.add_argument("--model", type=Path, required=True, help="model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (left-padded)")
    p.add_argument("--prompt-file", type=Path, help="read one prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate per prompt (default 64)")
    p.add_argument("--sample", action="store_const", const=True, help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: off, the default)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: smallest set with this probability (1: off)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--ignore-eos", action="store_const", const=True, help="keep generating after an end-of-sequence token")
    p.add_argument("--device", help="auto (default: cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--static-cache", action="store_true", help="transformers' static KV cache (no compile)")
    p.add_argument("--compile", action="store_const", const=True, help="static cache + torch.compile of the decode step (GPU)")
    p.add_argument("--cuda-graphs", action="store_const", const=True,
                   help="static cache + the engine's decode loop with each step replayed as a CUDA graph (GPU)")
    p.add_argument("--fused-norms", action="store_const", const=True,
                   help="the model's RMSNorms on torch's fused kernel (GPU; fewer kernels per step; not with --compile)")
    p.add_argument("--experts-mode", choices=["auto", "grouped", "gathered"],
                   help="MoE experts path: auto (decode path for small batches), grouped, gathered")
    p.add_argument("--offload", type=float, metavar="FRACTION",
                   help="keep experts off the device; FRACTION of each layer's experts stay cached on it (0: load every use)")
    p.add_argument("--offload-store", choices=["pinned", "disk"], help="pinned RAM (default) or the safetensors files (mmap)")
    p.add_argument("--offload-policy", choices=["lru", "stats"], help="cache eviction: lru (default) or stats (routing frequency)")
    p.add_argument("--offload-stats", help="routing statistics for --offload-policy stats: tokens_per_expert.json or expert_load.csv")
    p.add_argument("--prefetch", action="store_const", const=True,
                   help="prefetch the next layer's likely experts (its router on this layer's input) while this one computes")
    p.add_argument("--low-precision-bits", type=int, choices=[0, 4, 8], help="copy 8- or 4-bit experts on a miss (HOBBIT); 0: off")
    p.add_argument("--low-precision-below", type=float, help="...only for assignments whose routing weight is below this (default 1)")
    p.add_argument("--params", type=Path, help="params.yaml with a generate: section")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a generate setting, e.g. --set top_p=0.9")
    p.add_argument("--json", type=Path, help="also write the result (tokens, timings, cache statistics) to this JSON file")
    p.set_defaults(func=run_generate)
    return p
