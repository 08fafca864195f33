"""Running the exported graphs on onnxruntime: sessions from the provider settings, and a model-like
wrapper so the evaluation code (``sequence_losses``) scores an ONNX model exactly as a torch one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from moe_engine.errors import InputError

PROVIDER_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def provider_options(providers) -> list[tuple[str, dict]]:
    """``(name, options)`` in the preferred order, as ``ort.InferenceSession(providers=...)`` takes them.
    Option names are onnxruntime's (``trt_fp16_enable``, ``arena_extend_strategy``, ...)."""
    out = []
    for kind in providers.order:
        if kind == "tensorrt":
            t = providers.tensorrt
            opts = {"device_id": t.device_id, "trt_fp16_enable": t.fp16, "trt_int8_enable": t.int8,
                    "trt_max_workspace_size": int(t.max_workspace_gb * (1 << 30)),
                    "trt_engine_cache_enable": t.engine_cache, "trt_engine_cache_path": t.cache_dir}
            if t.profile_min_shapes:
                opts.update(trt_profile_min_shapes=t.profile_min_shapes, trt_profile_opt_shapes=t.profile_opt_shapes,
                            trt_profile_max_shapes=t.profile_max_shapes)
            opts.update(t.extra)
        elif kind == "cuda":
            c = providers.cuda
            opts = {"device_id": c.device_id, "arena_extend_strategy": c.arena_extend_strategy,
                    "cudnn_conv_algo_search": c.cudnn_conv_algo_search, **c.extra}
        else:
            opts = {}
        out.append((PROVIDER_NAMES[kind], opts))
    return out


def session(path: str | Path, providers=None, *, threads: int | None = None, exact: bool = False):
    """An ``InferenceSession`` of ``path``; ``providers`` is an ``export.providers`` config (default: CPU).
    A provider missing from this onnxruntime build is refused with what to install. ``exact``: fused
    quantized matmuls compute in float32 whatever the config says (the parity checks)."""
    import onnxruntime as ort

    from moe_engine.export.config import ProvidersConfig

    providers = providers or ProvidersConfig()
    wanted = provider_options(providers)
    available = ort.get_available_providers()
    missing = [name for name, _ in wanted if name not in available]
    if missing:
        raise InputError(f"onnxruntime {ort.__version__} here has no {', '.join(missing)} (available: {', '.join(available)}); "
                         "install the onnxruntime-gpu extra (pip install 'open-moe-trainer-lab[gpu]') with CUDA "
                         "and, for TensorRT, its libraries on LD_LIBRARY_PATH, or set export.providers.order")
    options = ort.SessionOptions()
    cpu = providers.cpu
    if threads is not None or cpu.intra_op_threads:
        options.intra_op_num_threads = threads if threads is not None else cpu.intra_op_threads
    if cpu.inter_op_threads:
        options.inter_op_num_threads = cpu.inter_op_threads
    level = 0 if exact else cpu.matmulnbits_accuracy_level
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    return ort.InferenceSession(str(path), options, providers=wanted)


def run(sess, feed: dict[str, torch.Tensor | np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
    arrays = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in feed.items()}
    return sess.run(names, arrays)


def shift_right(labels: torch.Tensor, config) -> torch.Tensor:
    """T5/Switch teacher forcing: the decoder start token, then the labels shifted right (-100 -> pad)."""
    shifted = labels.new_full(labels.shape, config.pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = config.decoder_start_token_id
    return shifted.masked_fill(shifted == -100, config.pad_token_id)


class OrtLM(nn.Module):
    """``model.onnx`` behind the calls ``evaluation.evaluate.sequence_losses`` makes on a torch model."""

    def __init__(self, path: str | Path, config, providers=None):
        super().__init__()
        self.config = config
        self.session = session(path, providers)
        self._device = nn.Parameter(torch.zeros(0), requires_grad=False)  # next(model.parameters()).device

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_right(labels, self.config)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.config.is_encoder_decoder:
            feed["decoder_input_ids"] = decoder_input_ids
        (logits,) = run(self.session, feed, ["logits"])
        return SimpleNamespace(logits=torch.from_numpy(logits))
