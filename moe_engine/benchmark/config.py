"""Settings of the benchmark stage (the ``benchmark`` section of params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from moe_engine.config import Config

# tasks defined by the project: YAMLs in moe_engine/benchmark/tasks over data/tasks/benchmark, and the
# next-passage tasks built at run time from a prepared shards directory (passage.py)
FILE_TASKS = ("wordnet_gloss", "chatterbot_category", "chatterbot_answer", "stdlib_function")
PASSAGE_TASKS = ("passage_val", "passage_ood")


@dataclass
class BenchmarkConfig(Config):
    section: ClassVar[str] = "benchmark"
    # lm-eval task (or tag/group) names: the project's own (above) or any defined by a YAML in include_path
    tasks: list[str] = field(default_factory=lambda: [*FILE_TASKS, *PASSAGE_TASKS])
    # more folders of lm-eval task YAMLs (lm-eval's --include_path); their relative data_files resolve
    # against the working directory, as in lm-eval itself
    include_path: list[str] = field(default_factory=list)
    limit: int = 0  # items per task (the first N: the project's files are stored in random order); 0 = all
    num_fewshot: int = 0  # examples drawn from the task's own items, never the item being scored
    batch_size: int = 32
    passage_items: int = 400  # next-passage items built per split (val, ood)
    seed: int = 0  # passage sampling and lm-eval's random, numpy, torch and few-shot seeds
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda", "cuda:1"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_length: int = 0  # context window lm-eval truncates to; 0 = the model's max_position_embeddings
    log_samples: bool = False  # also write each item's log-likelihoods to results/<model>.samples.jsonl
    bootstrap_iters: int = 1000  # for metrics without a closed-form standard error (acc uses sqrt(p(1-p)/(n-1)))

    def check(self) -> None:
        self.require(len(self.tasks) > 0 and all(self.tasks), "tasks", "a non-empty list of task names")
        self.require(len(set(self.tasks)) == len(self.tasks), "tasks", "a list without repeated names")
        self.require(self.limit >= 0, "limit", ">= 0 (0 = every item)")
        self.require(self.num_fewshot >= 0, "num_fewshot", ">= 0")
        self.require(self.batch_size >= 1, "batch_size", ">= 1")
        self.require(self.passage_items >= 1, "passage_items", ">= 1")
        self.require(self.max_length >= 0, "max_length", ">= 0 (0 = the model's own)")
        self.require(self.bootstrap_iters >= 0, "bootstrap_iters", ">= 0")
        self.require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps", "xpu"),
                     "device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
