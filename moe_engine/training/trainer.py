"""Pretraining: an MoE (or its FLOP-matched dense baseline) from scratch on token shards, as one
configuration of the shared training loop (``loop.py``).

    trainer = Trainer(arch="mixtral", preset="tiny", data="outputs/data", steps=200)
    result = trainer.fit()

Launch the same code on many GPUs with ``deepspeed --num_gpus 8 $(which moe-lab) pretrain ...`` or
``torchrun``; ``ep_size`` shards experts over ranks. Settings are checked before anything heavy
starts. Outputs in ``out_dir``: ``model/`` (a Hugging Face checkpoint with the tokenizer),
``metrics.json``, ``tokens_per_expert.json``, ``history.csv``, ``checkpoints/`` and ``snapshots/``;
each file is replaced only when complete. Re-running a finished run changes nothing and says so;
an interrupted one resumes (``callbacks/checkpointing.py`` has the rules).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_engine.config import RuleBroken
from moe_engine.errors import ConfigError, InputError
from moe_engine.models.adapters import moe_layers
from moe_engine.training import callbacks as cb
from moe_engine.training.callbacks import TrainingDiverged  # noqa: F401 - public name
from moe_engine.training.config import PretrainConfig
from moe_engine.training.loop import TrainLoop, warmup_cosine  # noqa: F401 - warmup_cosine is public
from moe_engine.training.objectives import NextToken, SpanCorruptionObjective


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # training loss per optimizer step (this run's steps; all of them for a finished run)
    val_loss: float | None
    ood_loss: float | None
    tokens_per_expert: dict[str, list[int]]  # layer name -> tokens routed to each expert, whole run (resumes included)
    tokens_per_s: float
    model_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged training metrics
    final_metrics: dict[str, float] = field(default_factory=dict)  # logged to MLflow at the end
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    skipped: bool = False  # True: the run was already finished; nothing was trained or written
    mlflow_run_id: str | None = None


def dense_width(layer, match: str, config) -> int:
    """The MLP width of a dense layer matched to MoE ``layer`` on active (K * F_expert [+ shared]) or total
    (E * F_expert [+ shared]) parameters."""
    per_expert = layer.experts.down_proj.shape[-1] if hasattr(layer.experts, "down_proj") else config.d_ff
    shared = layer.shared.down_proj.in_features if layer.shared is not None else 0
    return (layer.top_k if match == "active" else layer.num_experts) * per_expert + shared


def dense_baseline(moe_model: torch.nn.Module, match: str) -> torch.nn.Module:
    """A dense Llama-style model with the MoE model's attention shape and an MLP width matched on
    active parameters (F = K * F_expert [+ shared]) or total parameters (F = E * F_expert [+ shared])."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = moe_model.config
    if cfg.is_encoder_decoder:
        raise ConfigError("dense_baseline: no dense baseline for encoder-decoder models (switch); train it as an MoE")
    width = dense_width(moe_layers(moe_model)[0], match, cfg)
    dense_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=width,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
    )
    return LlamaForCausalLM(dense_cfg)


def read_data_manifest(data: Path) -> dict:
    """The shards manifest, with every shard of every split checked to be there and whole (headers
    only): a deleted or truncated shard is named now, not after DeepSpeed started."""
    from moe_engine.data.errors import RuleFailure, ShardIntegrityError
    from moe_engine.data.shards import read_manifest, shard_problem

    if not (Path(data) / "manifest.json").is_file():
        raise InputError(f"{data} has no manifest.json; create it with `moe-lab data prepare --out {data}`")
    manifest = read_manifest(data)
    failures = []
    for split, info in manifest["splits"].items():
        for shard in info.get("shards", []):
            problem = shard_problem(Path(data), shard, manifest)
            if problem:
                rule, description, example = problem
                failures.append(RuleFailure(rule, description, 1, (str(Path(data) / shard["file"]),), (example,)))
    if failures:
        raise ShardIntegrityError(failures)
    return manifest


def export_model(loop: TrainLoop, out: Path, tokenizer=None, module=None) -> Path | None:
    """Hugging Face checkpoint of the trained model (experts gathered from every rank) at ``out``;
    collective, rank 0 writes. ``module``: another view of the model to save (e.g. a merged LoRA)."""
    from moe_engine.models.io import save_model
    from moe_engine.training.parallel import gather_experts

    module = module if module is not None else loop.module
    full_experts = gather_experts(module) if loop.is_moe else {}  # collective
    if loop.rank != 0:
        return None
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    state.update({k: v.cpu() for k, v in full_experts.items()})
    return save_model(module, out, state_dict=state, tokenizer=tokenizer)


class Trainer:
    def __init__(self, model: torch.nn.Module | None = None, data: str | Path | None = None,
                 config: PretrainConfig | dict | None = None, out_dir: str | Path = "outputs/pretrain",
                 stage: str = "pretrain", fresh: bool = False, **overrides):
        if isinstance(config, PretrainConfig):
            config = config.to_dict()
        self.config = PretrainConfig.from_dict({**(config or {}), **overrides}, stage)
        if data is None:
            raise InputError("Trainer needs data=: a directory made by `moe-lab data prepare` (or moe_engine.data.prepare)")
        self.data = Path(data)
        self.manifest = read_data_manifest(self.data)
        self.model = model
        self.out_dir = Path(out_dir)
        self.stage = stage  # MLflow tag moe_lab.stage: which pipeline stage this run is
        self.fresh = fresh
        self._corruption = None
        self._check_model_settings()

    # ------------------------------------------------------------------ settings
    def _vocab(self) -> int:
        return int(self.manifest["vocab_size"])

    def _check_model_settings(self) -> None:
        """Build the effective transformers and router configs now (cheap, no weights), so a bad
        override or router setting fails before any model, data or DeepSpeed work."""
        from moe_engine.data.span_corruption import SpanCorruption
        from moe_engine.models.adapters import router_config
        from moe_engine.models.build import model_config

        cfg = self.config
        if self.model is not None:
            hf_config = self.model.config
        else:
            hf_config = model_config(cfg.arch, cfg.preset, **{"vocab_size": self._vocab(), **cfg.model})
            try:  # RouterConfig.check: top_k, capacity, coefficients, against this architecture's expert count
                router_config(hf_config, **cfg.router.set_values())
            except RuleBroken as exc:
                raise ConfigError(f"{self.stage}.router.{exc.key} = {exc.value!r}: must be {exc.rule}") from None
        if hf_config.is_encoder_decoder and not cfg.dense_baseline:
            try:
                self._corruption = SpanCorruption(int(self.manifest["seq_len"]), cfg.noise_density, cfg.mean_noise_span_length)
            except ValueError as exc:
                raise ConfigError(f"{self.stage}: {exc}") from None

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed: the settings and the data."""
        data_id = hashlib.sha256((self.data / "manifest.json").read_bytes()).hexdigest()[:16]
        return {**self.config.to_dict(), "data_manifest": data_id, "model": self.config.model,
                "custom_model": type(self.model).__name__ if self.model is not None else None}

    # ------------------------------------------------------------------ model and data
    def _build_model(self) -> torch.nn.Module:
        from moe_engine.models.build import build_model

        cfg = self.config
        vocab = self._vocab() + (self._corruption.num_spans if self._corruption is not None else 0)
        model = self.model
        if model is None:
            model = build_model(cfg.arch, cfg.preset, seed=cfg.seed, router=cfg.router.set_values(),
                                **{"vocab_size": vocab, **cfg.model})
        if model.config.vocab_size < vocab:
            raise ConfigError(f"the model's vocab_size {model.config.vocab_size} is smaller than the data's tokenizer "
                              f"({vocab}, sentinel ids for span corruption included)")
        if cfg.dense_baseline:
            torch.manual_seed(cfg.seed)
            model = dense_baseline(model, cfg.dense_baseline)
        return model

    def _objective(self):
        return SpanCorruptionObjective(self._corruption) if self._corruption is not None else NextToken()

    def _train_data(self, rank: int, world: int):
        from moe_engine.data.loader import ShardDataset

        return ShardDataset(self.data, split="train", rank=rank, world_size=world, seed=self.config.seed,
                            batch_size=self.config.micro_batch_size)

    def _eval_data(self, split: str, rank: int, world: int):
        from moe_engine.data.loader import ShardDataset

        sequences = self.manifest["splits"].get(split, {}).get("sequences", 0)
        per_rank = sequences // world
        if per_rank == 0:  # the split is empty (e.g. no out-of-domain set): nothing to evaluate
            return None
        return ShardDataset(self.data, split=split, rank=rank, world_size=world, seed=0, shuffle=False, epochs=1,
                            batch_size=min(self.config.micro_batch_size, per_rank), drop_last=False)

    def export(self, loop: TrainLoop, out: Path) -> Path | None:
        return export_model(loop, out, self.data / "tokenizer")

    # ------------------------------------------------------------------ callbacks
    def _callbacks(self) -> list:
        cfg = self.config
        out = self.out_dir
        calls = [cb.StopOnDivergence(), cb.RouterStats(cfg.router_monitor), cb.History(out / "history.csv"),
                 cb.Progress(self.stage)]
        uri = cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri:
            calls.append(self._mlflow(uri))
        elif os.environ.get("RANK", "0") == "0":
            print("tracking: off (set MLFLOW_TRACKING_URI or mlflow_tracking_uri to log this run to MLflow)", flush=True)
        calls += [cb.PeriodicEval(cfg.eval_every),
                  cb.Snapshots(cfg.snapshot_every, out / "snapshots", lambda loop, path: self.export(loop, path)),
                  cb.Checkpointer(cfg.save_every, cfg.keep_checkpoints, fresh=self.fresh),
                  cb.Profiler(cfg.profile_steps, out / "profile")]
        return calls

    def _mlflow(self, uri: str) -> cb.MLflowLogger:
        cfg = self.config
        kind = f"dense baseline ({cfg.dense_baseline} params)" if cfg.dense_baseline else "MoE"
        tags = {"moe_lab.stage": self.stage, "moe_lab.arch": cfg.arch, "moe_lab.preset": cfg.preset,
                "moe_lab.model_kind": "dense" if cfg.dense_baseline else "moe"}
        description = (f"Stage `{self.stage}`: pretrain a {cfg.arch} `{cfg.preset}` {kind} for {cfg.steps} steps on "
                       f"`{self.data}` (micro-batch {cfg.micro_batch_size} x grad_accum {cfg.grad_accum}, lr {cfg.lr:g}).")
        return cb.MLflowLogger(uri, cfg.experiment, run_name=f"{self.stage} · {cfg.arch}-{cfg.preset} · {kind}", tags=tags,
                               params=cfg.to_dict(), description=description, manifest=self.data / "manifest.json",
                               fallback_dir=self.out_dir)

    # ------------------------------------------------------------------ run
    def fit(self) -> TrainResult:
        done = self._finished_run()
        if done is not None:
            return done
        loop = TrainLoop(self.config, self._build_model, self._train_data, self._objective(), self._callbacks(),
                         self.out_dir, eval_data=self._eval_data, settings=self.settings())
        try:
            loop.setup()
            loop.run()
            result = loop.finish(self._end(loop))
        except BaseException as exc:
            loop.close(exc)
            raise
        loop.close(None)
        return result

    def _end(self, loop: TrainLoop) -> TrainResult:
        from moe_engine.io import write_json

        cfg = self.config
        val_loss, ood_loss = loop.evaluate("val"), loop.evaluate("ood")
        model_dir = self.export(loop, self.out_dir / "model")
        stats = next(c for c in loop.callbacks if isinstance(c, cb.RouterStats))
        mlflow_cb = next((c for c in loop.callbacks if isinstance(c, cb.MLflowLogger)), None)
        m = loop.metrics
        result = TrainResult(
            steps=cfg.steps, losses=loop.losses, val_loss=val_loss, ood_loss=ood_loss,
            tokens_per_expert=stats.tokens_per_expert(), tokens_per_s=m.get("train/tokens_per_s", 0.0),
            model_dir=model_dir, metrics=m, mlflow_run_id=mlflow_cb.run_id if mlflow_cb else None)
        if loop.rank != 0:
            return result
        # nested, so `dvc metrics show` / `dvc metrics diff` group them: loss, throughput, size, cost
        summary = {
            "steps": cfg.steps,
            "loss": {"train_final": loop.losses[-1] if loop.losses else None, "val": val_loss, "ood": ood_loss},
            "throughput": {"tokens_per_s": result.tokens_per_s, "tflops_per_s": m.get("cost/tflops_per_s"),
                           "mfu": m.get("cost/mfu")},
            "size": {"params_total": loop.param_counts.total, "params_active": loop.param_counts.active,
                     "flops_per_token": loop.flops_per_token},
            "cost": {"tokens_trained": loop.tokens_per_step * cfg.steps,
                     "train_flops": loop.flops_per_token * loop.tokens_per_step * cfg.steps,
                     "usd_per_million_tokens": m.get("cost/usd_per_million_tokens")},
        }
        if not loop.losses and (self.out_dir / "metrics.json").exists():  # resumed at the last step: keep the record
            previous = json.loads((self.out_dir / "metrics.json").read_text())
            summary["loss"]["train_final"] = previous.get("loss", {}).get("train_final")
            summary["throughput"] = previous.get("throughput", summary["throughput"])
        write_json(self.out_dir / "metrics.json", summary)
        write_json(self.out_dir / "tokens_per_expert.json", result.tokens_per_expert)
        # who made model/: later stages (finetune) tag their MLflow runs with it for lineage
        write_json(self.out_dir / "run.json", {"stage": self.stage, "mlflow_run_id": result.mlflow_run_id,
                                               "data": str(self.data), "steps": cfg.steps})
        result.final_metrics = {"val/loss": val_loss, "ood/loss": ood_loss, "train/final_loss": summary["loss"]["train_final"]}
        result.artifacts = [(self.out_dir / "metrics.json", None), (self.out_dir / "tokens_per_expert.json", None),
                            (self.out_dir / "history.csv", None)]
        if model_dir is not None:
            result.artifacts.append((model_dir, "model"))
        return result

    def _finished_run(self) -> TrainResult | None:
        """The result of this very run if ``out_dir`` already holds it complete (nothing is rewritten)."""
        from moe_engine.training import checkpoint
        from moe_engine.training.callbacks.history import read_history

        if self.fresh:
            return None
        try:
            found = checkpoint.find_resumable(self.out_dir / "checkpoints", quiet=True)
        except checkpoint.CheckpointError:
            return None  # the loop's setup reports it
        out = self.out_dir
        if found is None or not ((out / "model" / "config.json").exists() and (out / "metrics.json").exists()):
            return None
        path, meta = found
        if meta["step"] != self.config.steps:
            return None
        saved, now = meta.get("settings") or {}, self.settings()
        if any(saved.get(k) != now.get(k) for k in set(saved) | set(now) if k not in PretrainConfig.RESUMABLE):
            return None  # other settings: the loop's resume check explains what differs
        metrics = json.loads((out / "metrics.json").read_text())
        per_expert = json.loads((out / "tokens_per_expert.json").read_text()) if (out / "tokens_per_expert.json").exists() else {}
        history = [row["loss"] for row in read_history(out / "history.csv")] if (out / "history.csv").exists() else []
        print(f"{out} already holds this finished run ({self.config.steps} steps, {path.name}); nothing to do "
              "(pass --fresh to train it again)", file=sys.stderr)
        return TrainResult(steps=self.config.steps, losses=history, val_loss=metrics.get("loss", {}).get("val"),
                           ood_loss=metrics.get("loss", {}).get("ood"), tokens_per_expert=per_expert,
                           tokens_per_s=metrics.get("throughput", {}).get("tokens_per_s") or 0.0, model_dir=out / "model",
                           skipped=True)


__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "dense_baseline", "dense_width", "warmup_cosine"]
