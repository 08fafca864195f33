"""The one registry of pipeline stages and ``moe-lab`` commands.

It feeds ``moe-lab`` (its subcommands), the Prefect tasks (``tasks/stages.py``) and the orchestration
tests, so a new stage is added here, in params.yaml, dvc.yaml and its tests, and nowhere else.
Imports are lazy: listing stages imports no heavy library.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module


@dataclass(frozen=True)
class Stage:
    name: str  # the DVC stage in dvc.yaml
    cli: str  # the module whose add_parser registers the command the stage runs
    section: str | None  # its params.yaml section (None: no settings)
    config: str | None  # "module:Class" of its typed config
    artifacts: tuple[str, ...] = ()  # small files that document the stage in its MLflow run / Prefect artifact
    model_dir: str | None = None  # the Hugging Face model it produces (registered in MLflow), if any
    description: str = ""
    result: bool = False  # True: exit code 1 with a report is a result (a gate that failed), not a crash

    def config_class(self):
        if self.config is None:
            return None
        module, _, name = self.config.partition(":")
        return getattr(import_module(module), name)


# moe-lab subcommands, in pipeline order; each module defines add_parser(subparsers)
COMMANDS = (
    "moe_engine.data.cli",
    "moe_engine.training.cli",
    "moe_engine.finetune.cli",
    "moe_engine.evaluation.cli",
    "moe_engine.benchmark.cli",
    "moe_engine.analytics.cli",
    "moe_engine.gate.cli",
    "moe_engine.quantize.cli",
    "moe_engine.export.cli",
    "moe_engine.tracking.cli",
    "moe_engine.inference.cli",
    "moe_engine.models.cli",
)

# the DVC pipeline, in dvc.yaml order (the gate last)
PIPELINE: tuple[Stage, ...] = (
    Stage("data", "moe_engine.data.cli", "data", "moe_engine.data.config:DataConfig",
          artifacts=("outputs/data/manifest.json",), description="raw text -> tokenizer -> validated token shards"),
    Stage("pretrain", "moe_engine.training.cli", "pretrain", "moe_engine.training.config:PretrainConfig",
          artifacts=("outputs/pretrain/tokens_per_expert.json",), model_dir="outputs/pretrain/model",
          description="pretrain the MoE"),
    Stage("pretrain_dense", "moe_engine.training.cli", "pretrain_dense", "moe_engine.training.config:PretrainConfig",
          model_dir="outputs/pretrain_dense/model", description="pretrain the dense baseline matched on active parameters"),
    Stage("finetune", "moe_engine.finetune.cli", "finetune", "moe_engine.finetune.config:FinetuneConfig",
          artifacts=("outputs/finetune/compare.md",), model_dir="outputs/finetune/model",
          description="LoRA fine-tune of the MoE on a task, before/after"),
    Stage("evaluate", "moe_engine.evaluation.cli", "evaluate", "moe_engine.evaluation.config:EvaluateConfig",
          artifacts=("outputs/evaluate/compare.md",), description="held-out and out-of-domain loss, MoE vs dense"),
    Stage("benchmark", "moe_engine.benchmark.cli", "benchmark", "moe_engine.benchmark.config:BenchmarkConfig",
          artifacts=("outputs/benchmark/compare.md",), description="lm-eval multiple-choice tasks, MoE vs dense"),
    Stage("quantize", "moe_engine.quantize.cli", "quantize", "moe_engine.quantize.config:QuantizeConfig",
          artifacts=("outputs/quantize/report.md", "outputs/quantize/errors.csv"),
          description="int8/int4 quantized experts, per-expert errors, perplexity gate"),
    Stage("export", "moe_engine.export.cli", "export", "moe_engine.export.config:ExportConfig",
          artifacts=("outputs/export/report.md", "outputs/export/export.json"),
          description="ONNX graphs checked on onnxruntime against stock transformers; quantized ONNX under the gate"),
    Stage("analyze", "moe_engine.analytics.cli", "analyze", "moe_engine.analytics.analyze:AnalyzeConfig",
          artifacts=("outputs/analyze/report.html",), description="router analytics of the snapshots and the final model"),
    Stage("gate", "moe_engine.gate.cli", None, None, artifacts=("outputs/gate/report.md", "outputs/gate/report.json"),
          description="benchmark gate against benchmarks/gate_baseline.json", result=True),
)


def stage(name: str) -> Stage:
    for s in PIPELINE:
        if s.name == name:
            return s
    raise KeyError(f"no pipeline stage {name!r}; stages: {', '.join(s.name for s in PIPELINE)}")


# params.yaml sections of commands that are not pipeline stages: section -> "module:Class" of its typed config
COMMAND_SECTIONS = {"generate": "moe_engine.inference.config:GenerateConfig"}


def sections() -> list[str]:
    """The params.yaml sections a params file may hold: the stages' and ``COMMAND_SECTIONS``."""
    return sorted({s.section for s in PIPELINE if s.section} | set(COMMAND_SECTIONS))
