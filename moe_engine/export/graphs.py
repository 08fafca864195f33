"""The ONNX graphs of a stock transformers MoE checkpoint, exported by transformers' own OnnxExporter.

Decoder-only models (Mixtral, OLMoE, Qwen2-MoE, DeepSeek-V3):
    model.onnx            input_ids, attention_mask [batch, length]            -> logits
    model_with_past.onnx  input_ids, position_ids [batch, new], attention_mask [batch, past + new],
                          past_key_values.{i}.key / .value [batch, heads, past, head_dim]
                          -> logits, present.{i}.key / .value (past + new)
Switch Transformers (encoder-decoder):
    model.onnx            input_ids, attention_mask, decoder_input_ids         -> logits (teacher forcing)
    encoder.onnx          input_ids, attention_mask                            -> last_hidden_state
    decoder.onnx          decoder_input_ids, encoder_hidden_states, attention_mask -> logits
Every batch, length and past axis is dynamic. Weights sit in ``<graph>.onnx.data`` beside each graph.

The experts run in an exportable formulation, never a trace of the routing: transformers'
``grouped_mm`` experts (lowered to one MatMul per expert over its sorted rows) or ``batched_mm`` (a
weight gather per routed token), and for Switch the forward of ``export.switch``.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_engine.errors import InputError


def _exporter():
    try:
        from transformers.exporters.configs import OnnxConfig
        from transformers.exporters.exporter_onnx import OnnxExporter
    except ImportError as exc:  # the GPU image's transformers 5.17 predates it
        import transformers

        raise InputError(f"ONNX export needs transformers' OnnxExporter (transformers >= 5.24; installed "
                         f"{transformers.__version__}): {exc}") from None
    return OnnxExporter, OnnxConfig


def load_stock(model_dir: Path, experts_implementation: str = "grouped_mm") -> nn.Module:
    """The checkpoint in stock transformers (no engine layers), fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from moe_engine.models.io import check_weight_files
    from moe_engine.models.loading import read_config
    from moe_engine.quantize.format import quantization_of

    model_dir = Path(model_dir)
    config = read_config(model_dir, "pass a `moe-lab pretrain --out` model folder")
    check_weight_files(model_dir)
    if quantization_of(config) is not None:
        raise InputError(f"{model_dir} is a quantized checkpoint: pass the unquantized model as --model and this one "
                         "as --quantized")
    if config.is_encoder_decoder:
        return AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                experts_implementation=experts_implementation).eval()


class CausalLogits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class Seq2SeqLogits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                          use_cache=False).logits


class Encoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class DecoderLogits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, encoder_hidden_states, attention_mask):
        from transformers.modeling_outputs import MoEModelOutput

        encoder_outputs = MoEModelOutput(last_hidden_state=encoder_hidden_states)
        return self.model(encoder_outputs=encoder_outputs, attention_mask=attention_mask,
                          decoder_input_ids=decoder_input_ids, use_cache=False).logits


@dataclass
class Graph:
    name: str
    path: Path
    inputs: list[str]
    outputs: list[str]


def _example(model: nn.Module, batch: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def prefill_cache(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True).past_key_values


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` computes them: counting attended tokens, so left padding works."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _rename(program, renames: dict[str, str], outputs_names: list[str] | None = None) -> None:
    """Give graph inputs/outputs stable names (regex -> replacement); ``outputs_names`` renames by position."""
    for value in list(program.graph.inputs) + list(program.graph.outputs):
        for pattern, repl in renames.items():
            if re.fullmatch(pattern, value.name):
                value.name = re.sub(pattern, repl, value.name)
                break
    if outputs_names:
        for value, name in zip(program.graph.outputs, outputs_names):
            value.name = name


def _export(module, inputs, config, path: Path, renames=None, outputs_names=None, ort_fusions=None) -> Graph:
    OnnxExporter, OnnxConfig = _exporter()
    exporter = OnnxExporter()
    cpu_moe = ort_fusions == "cpu_moe"  # ours: transformers' MoE matcher, then the CPU kernel's layout (fused.py)
    onnx_config = OnnxConfig(dynamic=True, opset_version=config.opset, ort_fusions=None if cpu_moe else ort_fusions)
    program = exporter.export(module, dict(inputs), onnx_config).program
    if cpu_moe:
        from moe_engine.export.fused import fuse_moe_for_cpu

        fuse_moe_for_cpu(program)
    _rename(program, renames or {}, outputs_names)
    path.parent.mkdir(parents=True, exist_ok=True)
    OnnxExporter.save_program(program, path)
    return Graph(path.stem, path, [v.name for v in program.graph.inputs], [v.name for v in program.graph.outputs])


_PAST_NAMES = {r"past_key_values\.layers\.(\d+)\.keys": r"past_key_values.\1.key",
               r"past_key_values\.layers\.(\d+)\.values": r"past_key_values.\1.value",
               r"cache\.layers\.(\d+)\.keys": r"present.\1.key",
               r"cache\.layers\.(\d+)\.values": r"present.\1.value"}


def export_graphs(model: nn.Module, out_dir: Path, config, *, prefix: str = "", ort_fusions: str | None = None,
                  with_past: bool | None = None) -> list[Graph]:
    """Export ``model`` (stock transformers) as the graphs listed in the module docstring, into ``out_dir``."""
    from moe_engine.export.switch import exportable_switch

    with_past = config.with_past if with_past is None else with_past
    example = _example(model, config.example_batch, config.example_length)
    graphs = []
    if model.config.is_encoder_decoder:
        dec_ids = _example(model, config.example_batch, config.example_length + 3)["input_ids"]
        with exportable_switch(model):
            graphs.append(_export(Seq2SeqLogits(model), {**example, "decoder_input_ids": dec_ids}, config,
                                  out_dir / f"{prefix}model.onnx", outputs_names=["logits"]))
            if with_past:
                graphs.append(_export(Encoder(model), example, config, out_dir / f"{prefix}encoder.onnx",
                                      outputs_names=["last_hidden_state"]))
                with torch.no_grad():
                    hidden = Encoder(model)(**example)
                graphs.append(_export(DecoderLogits(model), {"decoder_input_ids": dec_ids, "encoder_hidden_states": hidden,
                                                             "attention_mask": example["attention_mask"]},
                                      config, out_dir / f"{prefix}decoder.onnx", outputs_names=["logits"]))
        return graphs
    if ort_fusions in ("cuda", "cpu_moe"):  # the MoE fusion matches batched_mm experts (transformers sets it only on a
        # model it exports itself, not on the wrapper exported here)
        with experts_implementation(model, "batched_mm"):
            return _causal(model, out_dir, config, prefix, with_past, example, ort_fusions)
    return _causal(model, out_dir, config, prefix, with_past, example, ort_fusions)


@contextlib.contextmanager
def experts_implementation(model: nn.Module, name: str):
    original = model.get_experts_implementation()
    model.set_experts_implementation(name)
    try:
        yield
    finally:
        model.set_experts_implementation(original)


def _causal(model, out_dir: Path, config, prefix: str, with_past: bool, example, ort_fusions) -> list[Graph]:
    graphs = [_export(CausalLogits(model), example, config, out_dir / f"{prefix}model.onnx",
                      outputs_names=["logits"], ort_fusions=ort_fusions)]
    if with_past:
        past = config.example_length
        ids = _example(model, config.example_batch, past + 3)["input_ids"]
        mask = torch.ones_like(ids)
        cache = prefill_cache(model, ids[:, :past], mask[:, :past])
        inputs = {"input_ids": ids[:, past:], "attention_mask": mask, "position_ids": positions(mask)[:, past:],
                  "past_key_values": cache, "use_cache": True}
        graphs.append(_export(model, inputs, config, out_dir / f"{prefix}model_with_past.onnx", renames=_PAST_NAMES,
                              ort_fusions=ort_fusions))
    return graphs
