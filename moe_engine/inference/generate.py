"""Text generation with engine-patched models: ``me.generate(model_or_dir, prompts, ...)``.

    result = me.generate("outputs/pretrain/model", "Once upon a time", max_new_tokens=64)
    result.texts[0], result.decode_tokens_per_s

Three decode loops, one result:
- transformers' ``generate`` (default): dynamic or static KV cache; with ``compile=True`` a static
  cache and transformers' own ``torch.compile`` of the decode step (CUDA; the engine layer traces
  without graph breaks, see ``moe/decode.py``);
- ``cuda_graphs=True``: the engine's :class:`StaticDecoder`, a static cache and one decode step
  (forward, token choice, position update) captured as a CUDA graph and replayed per token;
- ``offload=...``: experts kept off the device (``offload.py``), through transformers' ``generate``.
Timing: every new token reaches the host (transformers synchronises each step anyway), so the
times are exact; ``decode_tokens_per_s`` leaves out the prompt (prefill and first token).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from moe_engine.errors import ConfigError, InputError
from moe_engine.inference.config import GenerateConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # the new tokens of each sequence (after an EOS: none)
    texts: list[str] | None  # decoded new tokens (None without a tokenizer)
    prompt_tokens: int  # prompt length (left-padded batch: the longest)
    new_tokens: int  # generated tokens, all sequences, counting each decode step's batch
    seconds: float  # the whole call: prefill and decode
    decode_seconds: float  # from the first new token to the last
    offload: dict[str, Any] | None = None  # cache statistics when experts are offloaded
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        batch = len(self.token_ids)
        steps = self.new_tokens // max(batch, 1) - 1
        return steps * batch / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class StepTimer:
    """A transformers streamer that timestamps every step (the first ``put`` is the prompt) and passes
    the tokens on to another streamer (e.g. ``TextStreamer`` for the CLI)."""

    def __init__(self, inner=None, on_first_token=None):
        self.inner, self.times, self.on_first_token = inner, [], on_first_token

    def put(self, value):
        self.times.append(time.perf_counter())
        if len(self.times) == 2 and self.on_first_token is not None:
            self.on_first_token()
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()

    @property
    def decode_seconds(self) -> float:
        return self.times[-1] - self.times[1] if len(self.times) > 2 else 0.0


# ----------------------------------------------------------------------------- the CUDA-graph loop
def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use the one this version takes."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def choose_tokens(logits_BV: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Greedy, or temperature -> top-k -> top-p sampling in transformers' order, with no host sync
    (Gumbel-max through exponential noise instead of ``multinomial``, as gpt-fast samples)."""
    if not do_sample:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1])).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, descending=False)
        remove_BV = sorted_BV.softmax(-1).cumsum(-1) <= 1 - top_p
        remove_BV[..., -1:] = False  # keep at least the most likely token
        logits_BV = logits_BV.masked_fill(remove_BV.scatter(-1, order_BV, remove_BV), float("-inf"))
    probs_BV = logits_BV.softmax(-1)
    return (probs_BV / torch.empty_like(probs_BV).exponential_(1)).argmax(-1)


class StaticDecoder:
    """Decoding with transformers' ``StaticCache`` and one decode step captured as a CUDA graph.

    The step reads its inputs from static buffers (last token, positions, cache position) and
    advances them itself, so each token is one ``graph.replay()``. The first two steps run eagerly on
    a side stream (warm-up, as CUDA graph capture requires); with ``capture=False`` (CPU, tests) every
    step runs eagerly, the same function. Reuse a decoder for calls of the same batch size.
    """

    def __init__(self, model, batch_size: int, max_len: int, *, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
                 capture: bool | None = None):
        from transformers import StaticCache

        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        self.sampling = (do_sample, temperature, top_k, top_p)
        device = next(model.parameters()).device
        self.capture = device.type == "cuda" if capture is None else capture
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.cache_name = _cache_kwarg(model)
        self.token_B1 = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position_B1 = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.cache_position_1 = torch.zeros(1, dtype=torch.long, device=device)
        self.mask_BL = torch.ones(batch_size, max_len, dtype=torch.long, device=device)
        self.graph = None
        self.next_B = None
        self.warm_steps = 0

    def _forward(self, input_ids, position_ids, cache_position):
        return self.model(input_ids=input_ids, attention_mask=self.mask_BL, position_ids=position_ids,
                          cache_position=cache_position, use_cache=True, logits_to_keep=1,
                          **{self.cache_name: self.cache}).logits[:, -1]

    def _step(self) -> torch.Tensor:
        logits_BV = self._forward(self.token_B1, self.position_B1, self.cache_position_1)
        next_B = choose_tokens(logits_BV, *self.sampling)
        self.token_B1.copy_(next_B[:, None])
        self.position_B1.add_(1)
        self.cache_position_1.add_(1)
        return next_B

    @torch.no_grad()
    def generate(self, input_ids_BP: torch.Tensor, attention_mask_BP: torch.Tensor | None, max_new_tokens: int,
                 eos_ids: Sequence[int] = (), pad_id: int = 0, streamer=None) -> torch.Tensor:
        """New tokens [B, max_new_tokens]; after a sequence's EOS, ``pad_id`` (as transformers pads)."""
        batch, prompt = input_ids_BP.shape
        if batch != self.batch_size or prompt + max_new_tokens > self.max_len:
            raise ValueError(f"this decoder holds batch {self.batch_size} x {self.max_len} positions; "
                             f"got batch {batch} x ({prompt} + {max_new_tokens})")
        device = self.token_B1.device
        self.cache.reset()
        mask_BP = attention_mask_BP if attention_mask_BP is not None else torch.ones_like(input_ids_BP)
        self.mask_BL.fill_(1)
        self.mask_BL[:, :prompt] = mask_BP
        position_BP = (mask_BP.long().cumsum(-1) - 1).masked_fill(mask_BP == 0, 1)
        if streamer is not None:
            streamer.put(input_ids_BP.cpu())
        logits_BV = self._forward(input_ids_BP, position_BP, torch.arange(prompt, device=device))
        out_BN = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
        out_BN[:, 0] = choose_tokens(logits_BV, *self.sampling)
        self.token_B1.copy_(out_BN[:, :1])
        self.position_B1.copy_(position_BP[:, -1:] + 1)
        self.cache_position_1.fill_(prompt)
        eos = torch.tensor(list(eos_ids), device=device) if eos_ids else None
        done_B = torch.zeros(batch, dtype=torch.bool, device=device)
        for i in range(1, max_new_tokens + 1):
            token_B = out_BN[:, i - 1]
            if eos is not None:
                token_B.masked_fill_(done_B, pad_id)
                done_B |= torch.isin(token_B, eos)
            if streamer is not None:
                streamer.put(token_B.cpu())
            if i == max_new_tokens or (eos is not None and (i % 8 == 0 or streamer is not None) and bool(done_B.all())):
                break
            out_BN[:, i] = self._next()
        if streamer is not None:
            streamer.end()
        return out_BN

    def _next(self) -> torch.Tensor:
        if not self.capture:
            return self._step()
        if self.graph is not None:
            self.graph.replay()
            return self.next_B
        if self.warm_steps < 2:  # eager warm-up steps on a side stream (real steps: their tokens are kept)
            self.warm_steps += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                next_B = self._step()
            torch.cuda.current_stream().wait_stream(side)
            return next_B
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the step (nothing runs), then replay runs it
            self.next_B = self._step()
        self.graph.replay()
        return self.next_B


# ----------------------------------------------------------------------------- me.generate
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"generate.device = {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"generate.device = {name!r}: no CUDA device is available here (use cpu or auto)")
    return device


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved beside a model (any transformers tokenizer directory)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # OSError, ValueError, ... depending on what is missing
        raise InputError(f"{model_dir} holds no tokenizer transformers can load ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}); save one beside the model or pass tokenizer=") from None


def _encode(prompts, tokenizer, device):
    """(input_ids_BP, attention_mask_BP) from text (left-padded) or token ids."""
    if isinstance(prompts, torch.Tensor):
        ids = prompts if prompts.dim() == 2 else prompts[None]
        return ids.long().to(device), None
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str)):
        if tokenizer is None:
            raise InputError("text prompts need a tokenizer: pass a model directory that holds one, or tokenizer=")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "left"
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=True)
        if enc["input_ids"].shape[1] == 0:
            raise InputError("the prompt encodes to no tokens; give a non-empty prompt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)
    rows = [list(prompts)] if prompts and isinstance(prompts[0], int) else [list(r) for r in prompts]
    if not rows or not rows[0] or len({len(r) for r in rows}) != 1:
        raise InputError("token-id prompts must be one non-empty list, or lists of equal length")
    return torch.tensor(rows, dtype=torch.long, device=device), None


def _prepare_model(model_or_dir, cfg: GenerateConfig, device, dtype):
    from moe_engine.models.adapters import moe_layers

    model_dir = None
    if isinstance(model_or_dir, (str, Path)):
        from moe_engine.models.loading import load

        model_dir = Path(model_or_dir)
        model = load(model_dir, dtype=dtype)
    else:
        model = model_or_dir
    if model.config.is_encoder_decoder:
        raise InputError("me.generate decodes decoder-only models (mixtral, olmoe, qwen2_moe, deepseek_v3); "
                         "use transformers' generate for encoder-decoder models")
    model.eval()
    for layer in moe_layers(model):
        layer.experts_mode = cfg.experts_mode
    if model_dir is None and cfg.dtype == "auto":  # a model object keeps its dtype unless one is asked for
        dtype = next(model.parameters()).dtype
    if cfg.offload.enabled:
        from moe_engine.inference.offload import offload_experts, offloaded

        if not offloaded(model):
            offload_experts(model, cfg.offload, device=device, dtype=dtype, weights_dir=model_dir)
    else:
        param = next(model.parameters())
        if param.device != device or param.dtype != dtype:
            model.to(device=device, dtype=dtype)
    if cfg.fused_norms and device.type == "cuda" and not cfg.compile:  # compile fuses the eager norms itself
        from moe_engine.models.norms import fuse_rms_norms

        fuse_rms_norms(model)  # stays on a model object passed in, like experts_mode
    return model, model_dir


def generate(model_or_dir, prompts, config: GenerateConfig | None = None, *, tokenizer=None, streamer=None,
             **settings) -> GenerationResult:
    """Generate from ``prompts`` (text, a list of texts, or token ids) with a patched model or a model
    directory (loaded with ``me.load``, tokenizer from the same folder). ``settings`` override fields of
    :class:`GenerateConfig` (``max_new_tokens=32, do_sample=True, offload={"enabled": True, "resident": 0.25}``).
    ``streamer``: a transformers streamer (``TextStreamer``) that receives tokens as they come."""
    cfg = (config or GenerateConfig()).replace(**settings) if settings else (config or GenerateConfig())
    device = _resolve_device(cfg.device)
    if (cfg.compile or cfg.cuda_graphs) and device.type != "cuda":
        raise ConfigError("generate.compile / generate.cuda_graphs need a CUDA device (device is "
                          f"{device.type}); leave them off on a CPU")
    dtype = _resolve_dtype(cfg.dtype, device)
    model, model_dir = _prepare_model(model_or_dir, cfg, device, dtype)
    if tokenizer is None and model_dir is not None and not isinstance(prompts, torch.Tensor):
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], str)):
            tokenizer = load_tokenizer(model_dir)
    device = next(p.device for p in model.parameters())
    input_ids, mask = _encode(prompts, tokenizer, device)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    gen = model.generation_config
    eos = gen.eos_token_id if cfg.stop_at_eos else None
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    from moe_engine.inference.offload import offload_stats, offloaded, reset_offload_stats

    phases = {}
    if offloaded(model):  # split the cache statistics into the prompt's and the decode steps'
        reset_offload_stats(model)

        def first_token():
            phases["prefill"] = offload_stats(model)
            reset_offload_stats(model)
    timer = StepTimer(streamer, on_first_token=first_token if offloaded(model) else None)
    start = time.perf_counter()
    if cfg.cuda_graphs:
        decoder = _decoder(model, input_ids.shape[0], input_ids.shape[1] + cfg.max_new_tokens, cfg)
        new = decoder.generate(input_ids, mask, cfg.max_new_tokens, eos_ids, pad, streamer=timer)
    else:
        new = _hf_generate(model, input_ids, mask, cfg, eos_ids, pad, timer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    token_ids = [_until_eos(row, eos_ids) for row in new.tolist()]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids] if tokenizer is not None else None
    if phases:
        phases["decode"] = offload_stats(model)
    return GenerationResult(
        token_ids=token_ids, texts=texts, prompt_tokens=input_ids.shape[1], new_tokens=(len(timer.times) - 1) * len(token_ids),
        seconds=seconds, decode_seconds=timer.decode_seconds, offload=phases or None, settings=cfg.to_dict(),
    )


def _decoder(model, batch: int, max_len: int, cfg: GenerateConfig) -> StaticDecoder:
    """A captured decoder per (batch, length, sampling), kept on the model so that repeated calls of the
    same shape replay the graph at once (at most four: each holds a static cache)."""
    decoders = model.__dict__.setdefault("_moe_lab_decoders", {})
    key = (batch, max_len, cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p)
    if key not in decoders:
        if len(decoders) >= 4:
            decoders.pop(next(iter(decoders)))
        decoders[key] = StaticDecoder(model, batch, max_len, do_sample=cfg.do_sample, temperature=cfg.temperature,
                                      top_k=cfg.top_k, top_p=cfg.top_p)
    return decoders[key]


def _until_eos(row: list[int], eos_ids: list[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[: i + 1]
    return row


def _hf_generate(model, input_ids, mask, cfg: GenerateConfig, eos_ids, pad, timer) -> torch.Tensor:
    import copy

    gen = copy.deepcopy(model.generation_config)  # every setting through one config (transformers warns on a mix)
    # an empty list, not None: transformers 5 fills a None from the model's own generation config, which
    # would stop at EOS after all when stop_at_eos is off
    gen.eos_token_id = list(eos_ids)
    gen.pad_token_id = pad
    gen.max_new_tokens, gen.do_sample = cfg.max_new_tokens, cfg.do_sample
    gen.temperature, gen.top_k, gen.top_p = (cfg.temperature, cfg.top_k, cfg.top_p) if cfg.do_sample else (None, None, None)
    if cfg.cache == "static" or cfg.compile:
        gen.cache_implementation = "static"
        gen.disable_compile = not cfg.compile  # transformers compiles every static-cache generate on GPU otherwise
    kwargs = dict(streamer=timer, generation_config=gen)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=mask, **kwargs)
    return out[:, input_ids.shape[1]:]
