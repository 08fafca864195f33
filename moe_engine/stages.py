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
    command: str  # the moe-lab subcommand that runs it
    section: str | None  # its params.yaml section (None: no settings)
    config: str | None  # "module:Class" of its typed config
    artifacts: tuple[str, ...] = ()  # small files that document the stage in its MLflow run / Prefect artifact
    model_dir: str | None = None  # the Hugging Face model it produces (registered in MLflow), if any
    description: str = ""

    def config_class(self):
        if self.config is None:
            return None
        module, _, name = self.config.partition(":")
        return getattr(import_module(module), name)


# moe-lab subcommands, in pipeline order; each module defines add_parser(subparsers)
COMMANDS = (
    "moe_engine.data.cli",
    "moe_engine.training.cli",
    "moe_engine.evaluation.cli",
    "moe_engine.analytics.cli",
    "moe_engine.gate.cli",
    "moe_engine.quantize.cli",
    "moe_engine.export.cli",
    "moe_engine.tracking.cli",
)

# the DVC pipeline, in dvc.yaml order (the gate last)
PIPELINE: tuple[Stage, ...] = (
    Stage("data", "data prepare", "data", "moe_engine.data.config:DataConfig",
          artifacts=("outputs/data/manifest.json",), description="raw text -> tokenizer -> validated token shards"),
    Stage("pretrain", "pretrain", "pretrain", "moe_engine.training.config:PretrainConfig",
          artifacts=("outputs/pretrain/tokens_per_expert.json",), model_dir="outputs/pretrain/model",
          description="pretrain the MoE"),
    Stage("pretrain_dense", "pretrain", "pretrain_dense", "moe_engine.training.config:PretrainConfig",
          model_dir="outputs/pretrain_dense/model", description="pretrain the dense baseline matched on active parameters"),
    Stage("evaluate", "evaluate", "evaluate", "moe_engine.evaluation.config:EvaluateConfig",
          artifacts=("outputs/evaluate/compare.md",), description="held-out and out-of-domain loss, MoE vs dense"),
    Stage("analyze", "analyze", "analyze", "moe_engine.analytics.analyze:AnalyzeSettings",
          artifacts=("outputs/analyze/report.html",), description="router analytics of the snapshots and the final model"),
    Stage("gate", "gate", None, None, artifacts=("outputs/gate/report.md", "outputs/gate/report.json"),
          description="benchmark gate against benchmarks/gate_baseline.json"),
)


def stage(name: str) -> Stage:
    for s in PIPELINE:
        if s.name == name:
            return s
    raise KeyError(f"no pipeline stage {name!r}; stages: {', '.join(s.name for s in PIPELINE)}")


def sections() -> list[str]:
    """The params.yaml sections a params file may hold."""
    return sorted({s.section for s in PIPELINE if s.section})
