"""Pretraining on DeepSpeed's engine: one code path from one CPU process to N GPUs.

    trainer = Trainer(arch="mixtral", preset="tiny", data="outputs/data", steps=200)
    result = trainer.fit()

Launch the same code on many GPUs with ``deepspeed --num_gpus 8 --module moe_engine.cli pretrain ...``
or ``torchrun``; ``ep_size`` shards experts over ranks. Each optimizer step: ``grad_accum``
micro-batches through ``engine.backward`` (aux/z losses ride on the MoE layer outputs, scaled like
the LM loss), ``engine.step()`` (ZeRO, clipping, the warmup+cosine schedule), then metrics. A
non-finite loss stops the run before the optimizer sees it; the last good checkpoint stays
``latest``. Checkpoints (``checkpoint.py``) resume model, optimizer, schedule, RNG and data position.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_engine.models.adapters import moe_layers
from moe_engine.training import checkpoint
from moe_engine.training.config import PretrainConfig
from moe_engine.training.flops import count_params, peak_flops, train_flops_per_token, usd_per_million_tokens


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # training loss per optimizer step (this run's steps)
    val_loss: float | None
    ood_loss: float | None
    tokens_per_expert: dict[str, list[int]]  # layer name -> tokens routed to each expert, whole run
    tokens_per_s: float
    model_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 1/warmup, then cosine from 1 to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _vocab_size(data: Path) -> int:
    manifest = Path(data) / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{data} has no manifest.json; create it with `moe-lab data prepare --out {data}`")
    return int(json.loads(manifest.read_text())["vocab_size"])


def dense_baseline(moe_model: torch.nn.Module, match: str) -> torch.nn.Module:
    """A dense Llama-style model with the MoE model's attention shape and an MLP width matched on
    active parameters (F = K * F_expert [+ shared]) or total parameters (F = E * F_expert [+ shared])."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = moe_model.config
    layer = moe_layers(moe_model)[0]
    per_expert = layer.experts.down_proj.shape[-1] if hasattr(layer.experts, "down_proj") else cfg.d_ff
    shared = layer.shared.down_proj.in_features if layer.shared is not None else 0
    width = (layer.top_k if match == "active" else layer.num_experts) * per_expert + shared
    dense_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=width,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
    )
    return LlamaForCausalLM(dense_cfg)


class Trainer:
    def __init__(self, model: torch.nn.Module | None = None, data: str | Path | None = None,
                 config: PretrainConfig | dict | None = None, out_dir: str | Path = "outputs/pretrain",
                 stage: str = "pretrain", **overrides):
        if isinstance(config, PretrainConfig):
            config = {k: getattr(config, k) for k in config.__dataclass_fields__}
        self.config = PretrainConfig.from_dict({**(config or {}), **overrides})
        if data is None:
            raise ValueError("Trainer needs data=: a directory made by `moe-lab data prepare` (or moe_engine.data.prepare)")
        self.data = Path(data)
        self.model = model
        self.out_dir = Path(out_dir)
        self.logger = None
        self.stage = stage  # MLflow tag moe_lab.stage: which pipeline stage this run is
        self._corrupt = None  # SpanCorruption, for encoder-decoder models

    # ------------------------------------------------------------------ setup
    def _build_model(self) -> torch.nn.Module:
        from moe_engine.data.span_corruption import SpanCorruption
        from moe_engine.models.build import build_model, model_config

        cfg = self.config
        vocab = _vocab_size(self.data)
        model = self.model
        if (model.config if model is not None else model_config(cfg.arch, cfg.preset)).is_encoder_decoder:
            seq_len = int(json.loads((self.data / "manifest.json").read_text())["seq_len"])
            self._corrupt = SpanCorruption(seq_len, cfg.noise_density, cfg.mean_noise_span_length)
            vocab += self._corrupt.num_spans  # room for the span-corruption sentinels
        if model is None:
            model = build_model(cfg.arch, cfg.preset, seed=cfg.seed, router=cfg.router, **{"vocab_size": vocab, **cfg.model})
        if model.config.vocab_size < vocab:
            raise ValueError(f"the model's vocab_size {model.config.vocab_size} is smaller than the data's tokenizer "
                             f"({vocab}, sentinel ids for span corruption included)")
        if cfg.dense_baseline:
            torch.manual_seed(cfg.seed)
            model = dense_baseline(model, cfg.dense_baseline)
            self._corrupt = None  # the dense baseline is decoder-only: next-token prediction
        return model

    def _inputs(self, model, batch_BL: torch.Tensor, noise_key: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Model kwargs for one batch: next-token prediction for decoder-only models, span corruption
        (T5's objective) for encoder-decoder ones, whose labels would otherwise be a copy of the input.
        The corruption noise is a function of ``noise_key``, so a resumed run replays it."""
        if self._corrupt is None:
            return {"input_ids": batch_BL, "labels": batch_BL}
        generator = torch.Generator().manual_seed(hash(noise_key) & (2**63 - 1))  # ints hash the same in every process
        input_ids, labels = self._corrupt(batch_BL.cpu(), model.config.vocab_size, generator)
        return {"input_ids": input_ids.to(batch_BL.device), "labels": labels.to(batch_BL.device)}

    def _ds_config(self, bf16: bool) -> dict:
        cfg = self.config
        zero = cfg.zero_stage
        return {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": zero},
            "zero_allow_untested_optimizer": True,
            # bf16 needs no loss scale, and DeepSpeed's per-parameter overflow scan costs ~6 kernels per
            # tensor every step; _check_grad_norm stops on a NaN/inf global norm instead
            "bf16": {"enabled": bf16, "check_grad_overflow": False},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    # ------------------------------------------------------------------ training
    def fit(self) -> TrainResult:
        import deepspeed
        import torch.distributed as dist

        from moe_engine.data.loader import ShardDataset
        from moe_engine.training.parallel import init_distributed, param_groups, shard_experts

        cfg = self.config
        rank, world = init_distributed()
        torch.manual_seed(cfg.seed)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        model = self._build_model()
        counts = count_params(model)
        is_moe = bool(moe_layers(model))
        if is_moe:
            shard_experts(model, cfg.ep_size)
            for layer in moe_layers(model):
                layer.aux_grad_scale = 1.0 / cfg.grad_accum
        elif cfg.ep_size > 1:
            raise ValueError("ep_size > 1 needs an MoE model (dense baselines have no experts)")
        groups = param_groups(model, cfg.weight_decay)
        # fused: one kernel over each flat fp32 partition ZeRO hands the optimizer, instead of ~a dozen
        # foreach passes; the step's cost scales with total (not active) parameters, so MoE feels it most
        fused = cfg.fused_adamw and device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        )
        if bf16 and cfg.zero_stage == 0:
            raise ValueError("bf16 training needs zero_stage >= 1 (DeepSpeed keeps fp32 master weights in ZeRO)")
        engine, optimizer, _, schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=self._ds_config(bf16)
        )
        monitor = None
        if is_moe:  # router metrics accumulate on the device every forward, reduced across ranks at log steps
            from moe_engine.analytics.online import MonitorConfig, RouterMonitor

            # after deepspeed.initialize: its accumulators live where the engine put the model
            monitor = RouterMonitor(engine.module, MonitorConfig(**cfg.router_monitor)).attach()
        ep_rank = moe_layers(model)[0].expert_parallel.rank if is_moe and cfg.ep_size > 1 else 0
        writes_model = rank < cfg.ep_size  # one writer per expert-parallel rank (expert-data-parallel rank 0)

        data = ShardDataset(self.data, split="train", rank=rank, world_size=world, seed=cfg.seed, batch_size=cfg.micro_batch_size)
        seq_len = data.seq_len
        ckpt_root = self.out_dir / "checkpoints"
        start = 0
        resumed = checkpoint.latest(ckpt_root) if ckpt_root.exists() else None
        if resumed is not None:
            state = checkpoint.load(resumed, rank=rank, world_size=world, ep_rank=ep_rank, ep_size=cfg.ep_size, module=engine.module)
            _load_optimizer(optimizer, state["optimizer"], rank)
            schedule.load_state_dict(state["scheduler"])
            data.load_state_dict(state["data"])
            checkpoint.set_rng_state(state["rng"])
            start = state["step"]
            engine.global_steps = start
        flops_per_token = train_flops_per_token(model, seq_len, counts)
        tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * seq_len * world
        self._size = {"params_total": counts.total, "params_active": counts.active, "flops_per_token": flops_per_token,
                      "tokens_trained": tokens_per_step * cfg.steps, "train_flops": flops_per_token * tokens_per_step * cfg.steps}
        peak = peak_flops(device, cfg.peak_tflops)
        if rank == 0:
            self._start_tracking(cfg, counts, flops_per_token, world)

        history = _History(self.out_dir / "history.jsonl", start) if rank == 0 else None
        batches = iter(data)
        losses: list[float] = []
        run_counts: dict[str, torch.Tensor] = {}
        layer_names = {m: n for n, m in engine.module.named_modules() if m in set(moe_layers(engine.module))}
        progress = _progress(rank == 0, cfg.steps, start)
        t_last, steps_since = time.perf_counter(), 0
        engine.train()
        pending_norm = None  # the last applied step's gradient norm, a device tensor checked at the next sync
        profiler = _Profiler(cfg.profile_steps, self.out_dir / "profile", rank, device)
        for step in range(start, cfg.steps):
            profiler.before(step + 1)
            step_loss = torch.zeros((), device=device)
            step_counts: dict[str, torch.Tensor] = {}
            for micro in range(cfg.grad_accum):
                batch = next(batches).to(device)
                loss = engine(**self._inputs(engine.module, batch, (cfg.seed, step, micro, rank))).loss
                engine.backward(loss)
                step_loss += loss.detach() / cfg.grad_accum
                for layer, name in layer_names.items():
                    c = layer.last_tokens_per_expert.float()
                    step_counts[name] = step_counts.get(name, 0) + c
                if micro < cfg.grad_accum - 1:
                    engine.step()  # accumulates; only the boundary call below applies the optimizer
            if world > 1:  # every rank sees a NaN from any rank, so all of them stop together
                dist.all_reduce(step_loss)
                step_loss /= world
                for c in step_counts.values():
                    dist.all_reduce(c)
            if pending_norm is not None:  # the step's one host sync also reads the previous step's grad norm
                loss_value, norm_value = torch.stack([step_loss.float(), pending_norm.float().to(device)]).tolist()
                self._check_grad_norm(step, norm_value, ckpt_root)
            else:
                loss_value = step_loss.item()
            if not math.isfinite(loss_value):
                self._diverged(step, loss_value, ckpt_root)
            engine.step()
            pending_norm = _grad_norm(engine)
            profiler.after(step + 1)
            for layer, name in layer_names.items():
                router = layer.moe_router
                if hasattr(router, "update_bias"):  # DeepSeek-V3 aux-loss-free balancing, once per step
                    router.update_bias(step_counts[name])
                run_counts[name] = run_counts.get(name, 0) + step_counts[name]
            losses.append(loss_value)
            if history is not None:
                history.write({"step": step + 1, "loss": losses[-1], "lr": schedule.get_last_lr()[0]})
            steps_since += 1
            progress.update(1, loss=losses[-1])
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t_last
                tok_s = tokens_per_step * steps_since / elapsed
                t_last, steps_since = time.perf_counter(), 0
                metrics = self._step_metrics(engine, losses[-1], monitor, layer_names, schedule, tok_s, flops_per_token, peak, world)
                if rank == 0 and self.logger is not None:
                    self.logger.log_metrics(metrics, step=done)
                last_metrics = metrics
            if cfg.snapshot_every and done % cfg.snapshot_every == 0 and done < cfg.steps:
                self._export(engine.module, rank, self.out_dir / "snapshots" / f"step_{done:08d}")
            if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
                self._check_grad_norm(done, pending_norm, ckpt_root)  # never save weights a bad step wrote
                pending_norm = None
                rank_state = {
                    "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(), "data": data.state_dict(),
                    "rng": checkpoint.rng_state(), "step": done,
                }
                checkpoint.save(ckpt_root, done, rank=rank, world_size=world, ep_rank=ep_rank, ep_size=cfg.ep_size,
                                writes_model=writes_model, module=engine.module, rank_state=rank_state, keep=cfg.keep_checkpoints)
        progress.close()
        self._check_grad_norm(cfg.steps, pending_norm, ckpt_root)
        profiler.close()
        val_loss = self.evaluate(engine.module, "val", device, world, rank)
        ood_loss = self.evaluate(engine.module, "ood", device, world, rank)
        model_dir = self._export(engine.module, rank, self.out_dir / "model")
        result = TrainResult(
            steps=cfg.steps, losses=losses, val_loss=val_loss, ood_loss=ood_loss,
            tokens_per_expert={n: c.long().tolist() for n, c in run_counts.items()},
            tokens_per_s=last_metrics.get("tokens_per_s", 0.0) if losses else 0.0, model_dir=model_dir,
            metrics=last_metrics if losses else {},
        )
        if rank == 0:
            self._finish(result)
        return result

    def _step_metrics(self, engine, loss, monitor, layer_names, schedule, tok_s, flops_per_token, peak, world) -> dict:
        metrics = {"loss": loss, "lr": schedule.get_last_lr()[0], "tokens_per_s": tok_s}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics["tflops_per_s"] = tok_s * flops_per_token / 1e12
        if peak:
            metrics["mfu"] = tok_s * flops_per_token / (peak * world)
            metrics["usd_per_million_tokens"] = usd_per_million_tokens(tok_s, world, self.config.gpu_hour_usd)
        if monitor is not None:  # collective: every rank calls it; alerts are printed and logged on rank 0
            metrics.update(monitor.compute())
            metrics["aux_loss"] = sum(float(layer.last_aux_loss or 0.0) for layer in layer_names)
        return metrics

    @torch.no_grad()
    def evaluate(self, module, split, device, world, rank) -> float | None:
        from moe_engine.data.loader import ShardDataset

        if self.config.eval_batches <= 0:
            return None
        try:
            data = ShardDataset(self.data, split=split, rank=rank, world_size=world, seed=0,
                                batch_size=self.config.micro_batch_size, shuffle=False, epochs=1)
        except Exception:  # the split is absent (e.g. no out-of-domain set)
            return None
        was_training = module.training
        module.eval()
        total, n = torch.zeros((), device=device), torch.zeros((), device=device)
        for i, batch in enumerate(data):
            if i >= self.config.eval_batches:
                break
            batch = batch.to(device)
            total += module(**self._inputs(module, batch, (-1, i, rank))).loss.float()  # the same noise for every model
            n += 1
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
            dist.all_reduce(n)
        module.train(was_training)
        return (total / n.clamp_min(1)).item() if n.item() else None

    # ------------------------------------------------------------------ outputs
    def _export(self, module, rank, out: Path) -> Path | None:
        """Hugging Face checkpoint of the full model (experts gathered) at ``out``, written atomically."""
        import shutil

        from moe_engine.training.parallel import gather_experts

        full_experts = gather_experts(module) if moe_layers(module) else {}
        if rank != 0:
            return None
        tmp = out.parent / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        state.update({k: v.cpu() for k, v in full_experts.items()})
        module.config.save_pretrained(tmp)
        from safetensors.torch import save_file

        save_file(_without_tied_copies(state), tmp / "model.safetensors", metadata={"format": "pt"})
        tok = self.data / "tokenizer"
        if tok.is_dir():
            shutil.copytree(tok, tmp, dirs_exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
        return out

    def _start_tracking(self, cfg, counts, flops_per_token, world) -> None:
        """An MLflow run when a tracking URI is configured (or MLFLOW_TRACKING_URI is set), as a child of
        the pipeline run named by MOE_LAB_PARENT_RUN_ID when a pipeline flow started this stage."""
        uri = cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            return
        from moe_engine.tracking.lineage import git_commit
        from moe_engine.tracking.mlflow_run import MLflowRun

        tags = {"moe_lab.stage": self.stage, "moe_lab.arch": cfg.arch, "moe_lab.preset": cfg.preset}
        if os.environ.get("MOE_LAB_PREFECT_FLOW_RUN_ID"):
            tags["prefect.flow_run_id"] = os.environ["MOE_LAB_PREFECT_FLOW_RUN_ID"]
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        self.logger = MLflowRun(uri, cfg.experiment, run_name=f"{self.stage}-{cfg.arch}-{cfg.preset}", tags=tags,
                                parent_run_id=os.environ.get("MOE_LAB_PARENT_RUN_ID") or None, fallback_dir=self.out_dir)
        params = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
        params.update(params_total=counts.total, params_active=counts.active, flops_per_token=flops_per_token, world_size=world)
        self.logger.log_params(params)
        if (self.data / "manifest.json").exists():
            self.logger.log_manifest(self.data / "manifest.json")

    def _finish(self, result: TrainResult) -> None:
        summary = {"final_loss": result.losses[-1] if result.losses else None, "val_loss": result.val_loss,
                   "ood_loss": result.ood_loss, "tokens_per_s": result.tokens_per_s, "steps": result.steps,
                   **self._size}
        summary.update({k: v for k, v in result.metrics.items() if k in ("mfu", "usd_per_million_tokens", "tflops_per_s")})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        (self.out_dir / "tokens_per_expert.json").write_text(json.dumps(result.tokens_per_expert, indent=2))
        if self.logger is not None:
            self.logger.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))}, step=result.steps)
            self.logger.log_artifact(self.out_dir / "metrics.json")
            if result.model_dir is not None:
                self.logger.log_artifact(result.model_dir, "model")
            self.logger.close()

    def _check_grad_norm(self, step: int, norm, ckpt_root) -> None:
        """Stop if optimizer step ``step`` (1-based) had a NaN/inf gradient norm (DeepSpeed reports one as
        -1). bf16 runs skip DeepSpeed's per-parameter overflow scan; its global norm, computed for clipping
        anyway, is checked here instead, one step late but before any checkpoint or export sees the weights."""
        if norm is None:
            return
        value = float(norm)
        if math.isfinite(value) and value >= 0:
            return
        self._stop(f"the gradient norm became {'nan/inf' if value == -1 else value} at step {step} while the loss "
                   "was finite; its weights were not saved", ckpt_root)

    def _diverged(self, step, loss, ckpt_root) -> None:
        self._stop(f"loss became {loss} at step {step + 1}; stopped before the optimizer applied it", ckpt_root)

    def _stop(self, what: str, ckpt_root) -> None:
        last = checkpoint.latest(ckpt_root) if ckpt_root.exists() else None
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        if self.logger is not None:
            self.logger.close(status="FAILED")
        raise TrainingDiverged(f"{what} ({where}). Try a lower lr, more warmup, grad_clip, or router z_loss_coef.")


def _grad_norm(engine) -> torch.Tensor | None:
    """The global gradient norm of the step just applied, left on the device (no sync); None when
    DeepSpeed computes none (ZeRO-0 keeps it inside torch's clip_grad_norm_)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return norm.detach().reshape(()) if torch.is_tensor(norm) else torch.tensor(float(norm))


def _without_tied_copies(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One entry per storage: tied weights (embeddings shared with the LM head or between encoder and
    decoder) are saved once under their first name; transformers re-ties them on load."""
    kept, seen = {}, set()
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident not in seen:
            seen.add(ident)
            kept[key] = tensor.contiguous()
    return kept


def _load_optimizer(optimizer, state, rank: int) -> None:
    if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "dp_process_group"):
        optimizer.load_state_dict(state)
        return
    import torch.distributed as dist

    dp_rank = dist.get_rank(group=optimizer.dp_process_group)
    states = [None] * dist.get_world_size(group=optimizer.dp_process_group)
    states[dp_rank] = state
    optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)


class _History:
    """Per-step loss and lr as JSON lines (DVC plots read it). On resume, lines past the
    checkpoint's step (written by the interrupted run) are dropped first."""

    def __init__(self, path: Path, start: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()


class _Profiler:
    """torch.profiler over optimizer steps [first, last] (1-based): writes ``ops_rank{r}.txt`` (operators
    by device time, then by CPU time) and a Chrome/Perfetto trace ``trace_rank{r}.json.gz``."""

    def __init__(self, steps: list[int], out: Path, rank: int, device: torch.device):
        self.first, self.last = steps if steps else (0, -1)
        self.out, self.rank, self.device = out, rank, device
        self.prof = None

    def before(self, step: int) -> None:
        if step == self.first:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities)
            self.prof.__enter__()

    def after(self, step: int) -> None:
        if self.prof is not None and step == self.last:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        import gzip
        import shutil

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        table = prof.key_averages()
        by_device = "device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        text = (f"optimizer steps {self.first}..{self.last}, rank {self.rank}\n\n"
                + table.table(sort_by=by_device, row_limit=60) + "\n\n" + table.table(sort_by="cpu_time_total", row_limit=40))
        (self.out / f"ops_rank{self.rank}.txt").write_text(text)
        raw = self.out / f".trace_rank{self.rank}.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(self.out / f"trace_rank{self.rank}.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()


class _progress:
    """A tqdm bar on rank 0 (nothing elsewhere)."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)

    def update(self, n: int, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
