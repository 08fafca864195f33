"""Weight-only int8 / int4 quantization of an MoE checkpoint, with its error report and quality gate.

    import moe_engine as me
    model = me.quantize(me.load("outputs/pretrain/model"), bits=4)   # in place; experts always included
    me.models.io.save_model(model, "model-int4")                    # me.load("model-int4") reads it back

The stage (``moe-lab quantize``) is :func:`run`: quantize, measure each expert's weight and output
error on calibration tokens, save, load back (same logits required), then gate on perplexity.

Why the engine's own quantized experts rather than a library (measured 2026-12-01, CPU, torch 2.13):
torchao 0.18 quantizes a fused 3-D expert parameter only through ``FqnToConfig`` and then runs it
only under transformers' ``eager`` experts (``grouped_mm``/``batched_mm`` and the engine's grouped
path fail on ``aten.transpose``/``aten.bmm``/``aten.t`` of its ``Int8Tensor``); its int4 needs the
``mslk`` GPU kernels and ``IntxWeightOnlyConfig`` takes 2-D/4-D tensors only; HQQ's ``HQQLinear``
wraps ``nn.Linear`` only. So the integers live behind the engine's ``expert_weights`` seam here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_engine.errors import ConfigError, InputError
from moe_engine.quantize.config import QuantizeConfig


def quantize(model: nn.Module, bits: int = 8, group_size: int = 32, attention: bool = False, dense: bool = False,
             config: QuantizeConfig | None = None, on_experts=None) -> nn.Module:
    """Quantize ``model``'s expert weights (and its attention / other linears when asked) in place.

    ``model`` is an engine-patched MoE model (``me.load``, ``me.build_model``) or a stock transformers
    one (patched first). Raises :class:`~moe_engine.quantize.modules.IncompleteQuantization` if any
    expert tensor would stay in floating point. Sets ``model.config.quantization_config``."""
    from moe_engine.models.adapters import ADAPTERS, moe_layers, patch
    from moe_engine.quantize.format import quantization_config
    from moe_engine.quantize.modules import check_complete, install, plan

    cfg = config or QuantizeConfig(bits=bits, group_size=group_size, attention=attention, dense=dense)
    if not moe_layers(model) and getattr(model.config, "model_type", None) in ADAPTERS:
        patch(model)
    spec = plan(model, cfg.attention, cfg.dense)
    install(model, spec, cfg.bits, cfg.group_size, on_experts=on_experts)
    check_complete(model)
    model.config.quantization_config = quantization_config(cfg.bits, cfg.group_size, spec, cfg.attention, cfg.dense)
    return model


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, or of Switch teacher-forced on its own input (shifted right)."""
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=input_ids)
            return model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits.float()
        return model(input_ids=input_ids).logits.float()


def calibration_ids(config: QuantizeConfig, data_dir: Path | None, vocab_size: int) -> tuple[torch.Tensor, str]:
    """The first ``calibration.sequences`` sequences of a split, or seeded random ids without data."""
    cal = config.calibration
    if data_dir is None:
        g = torch.Generator().manual_seed(cal.seed)
        return torch.randint(0, vocab_size, (cal.sequences, 64), generator=g), "random token ids (no --data)"
    from moe_engine.data.loader import ShardDataset

    data = ShardDataset(data_dir, split=cal.split, batch_size=cal.sequences, shuffle=False, epochs=1, drop_last=False)
    batch = next(iter(data), None)
    if batch is None:
        raise InputError(f"{data_dir} has no sequences in split {cal.split!r} for calibration; set calibration.split")
    return batch, f"{len(batch)} sequences of the {cal.split} split"


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers, each storage counted once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def disk_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


@dataclass
class QuantizeResult:
    metrics: dict
    report: str
    model_dir: Path


def run(config: QuantizeConfig, model_dir: str | Path, out_dir: str | Path, data_dir: str | Path | None = None) -> QuantizeResult:
    """Quantize ``model_dir`` into ``out_dir/model``; write ``metrics.json``, ``errors.csv`` and
    ``report.md`` beside it. Nothing is published unless the reload check and the gate pass."""
    from moe_engine.io import atomic_output, write_json
    from moe_engine.models.loading import load, read_config
    from moe_engine.models.io import save_model
    from moe_engine.quantize import gate as qgate
    from moe_engine.quantize.format import _tokenizer, quantization_of
    from moe_engine.quantize.modules import check_complete
    from moe_engine.quantize.report import ErrorSummary, capture_moe_layers, expert_rows, layer_output_errors, markdown, rel

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else None
    gate_on = config.gate.enabled
    if gate_on and data_dir is None:
        raise ConfigError("quantize.gate.enabled = true needs prepared shards: pass --data DIR (from `moe-lab data prepare`) "
                          "or --set gate.enabled=false")
    if quantization_of(read_config(model_dir, "pass a `moe-lab pretrain --out` model folder")) is not None:
        raise InputError(f"{model_dir} is already quantized; pass the unquantized model")
    model = load(model_dir).eval()
    memory_original = state_bytes(model)
    ids, calibration = calibration_ids(config, data_dir, model.config.vocab_size)
    captured = capture_moe_layers(model, ids, forward_logits)
    logits_ref = forward_logits(model, ids)
    splits = qgate.available_splits(data_dir, config.gate.splits) if gate_on else []
    g = config.gate
    ppl_original = qgate.perplexities(model, data_dir, splits, g.batch_size, g.max_sequences) if gate_on else {}

    summary = ErrorSummary()

    def on_experts(name, w_in, w_out, new):
        layer_name = name.rpartition(".")[0]
        summary.rows += expert_rows(layer_name, model.get_submodule(layer_name), captured[layer_name], w_in, w_out, new)

    quantize(model, config=config, on_experts=on_experts)
    expert_tensors = check_complete(model)
    summary.layer_output_rel = layer_output_errors(model, captured)
    logits_q = forward_logits(model, ids)
    summary.logits_rel = rel(logits_ref, logits_q)

    with atomic_output(out_dir) as tmp:
        save_model(model, tmp / "model", tokenizer=_tokenizer(model_dir))
        reloaded = load(tmp / "model").eval()
        reload_diff = (forward_logits(reloaded, ids) - logits_q).abs().max().item()
        if reload_diff > 1e-6 * max(logits_q.abs().max().item(), 1.0):
            raise RuntimeError(f"the saved quantized model computes other logits after loading (max diff {reload_diff})")
        rows = []
        if gate_on:
            ppl_q = qgate.perplexities(reloaded, data_dir, splits, g.batch_size, g.max_sequences)
            rows = qgate.judge(ppl_original, ppl_q, g.limit(config.bits))
        sizes = {"disk_original": disk_bytes(model_dir), "disk_quantized": disk_bytes(tmp / "model"),
                 "memory_original": memory_original, "memory_quantized": state_bytes(reloaded)}
        sizes.update(disk_ratio=sizes["disk_quantized"] / sizes["disk_original"],
                     memory_ratio=sizes["memory_quantized"] / sizes["memory_original"])
        metrics = {
            "bits": config.bits, "group_size": config.group_size if config.bits == 4 else None,
            "expert_tensors_quantized": expert_tensors,
            "tensors_quantized": sum(1 for _ in _quantized(reloaded)),
            "calibration": calibration, "sizes": sizes, "errors": summary.metrics(),
            "reload_max_abs_diff": reload_diff,
            "gate": {**{r.split: r.to_dict() for r in rows}, "passed": all(r.passed for r in rows)} if gate_on else None,
        }
        gate_md = qgate.table(rows) if rows else None
        report = markdown(summary, sizes, gate_md, f"int{config.bits} quantization of {model_dir}")
        write_json(tmp / "metrics.json", metrics)
        (tmp / "errors.csv").write_text(summary.csv())
        (tmp / "report.md").write_text(report)
        if gate_on:
            qgate.enforce(rows, f"int{config.bits}", f"raise quantize.gate.int{config.bits}_max_ppl_increase, use bits=8, "
                          "or a smaller group_size; the previous outputs are intact")
    return QuantizeResult(metrics, report, out_dir / "model")


def _quantized(model: nn.Module):
    from moe_engine.quantize.tensor import QuantizedWeight

    return (m for m in model.modules() if isinstance(m, QuantizedWeight))
