"""The one training loop: setup, step and evaluation, with everything else in callbacks.

Pretraining (``trainer.Trainer``) and fine-tuning (``moe_engine.finetune``) are two configurations of
this loop, not two trainers: they differ in how the model is built, which parameters train, the
objective (``objectives.py``) and the callbacks they attach (``callbacks/``: checkpoints, MLflow,
history, progress, profiler, divergence stop, snapshots, periodic validation, router statistics).

Each optimizer step: ``grad_accum`` micro-batches through ``engine.backward`` (aux/z losses ride on
the MoE layer outputs, scaled like the LM loss), one host sync for the loss (and the previous step's
gradient norm, so the divergence check costs no extra sync), ``engine.step()`` (ZeRO, clipping, the
warmup+cosine schedule), then every router's ``after_step`` hook with the step's tokens per expert,
then the callbacks. One code path from one CPU process to N GPUs (``deepspeed --num_gpus N``,
``torchrun``); ``ep_size`` shards experts over ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from moe_engine.errors import ConfigError
from moe_engine.models.adapters import moe_layers
from moe_engine.models.norms import fuse_rms_norms
from moe_engine.training.config import LoopConfig
from moe_engine.training.flops import count_params, peak_flops, train_flops_per_token, usd_per_million_tokens
from moe_engine.training.master_adamw import MasterAdamW, cast_parameters
from moe_engine.training.objectives import Objective, to_device


class Loader(Protocol):
    seq_len: int

    def __iter__(self): ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 1/warmup, then cosine from 1 to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Callback:
    """Hooks the loop calls, in list order, on every rank (write files on rank 0 only). A callback with
    state that must survive a resume returns it from ``state_dict`` (saved in every checkpoint)."""

    name = "callback"

    def setup(self, loop: "TrainLoop") -> None: ...
    def state_dict(self) -> dict | None: return None
    def load_state_dict(self, state: dict) -> None: ...
    def pre_step(self, loop: "TrainLoop") -> None: ...
    def on_loss(self, loop: "TrainLoop", step: int, loss: float) -> None: ...  # step: 1-based, before the optimizer applies it
    def on_grad_norm(self, loop: "TrainLoop", step: int, norm: float) -> None: ...  # the norm of applied step `step`
    def post_step(self, loop: "TrainLoop") -> None: ...  # after the optimizer step; loop.step is the steps done
    def add_metrics(self, loop: "TrainLoop", metrics: dict[str, float]) -> None: ...  # collective: may all-reduce
    def on_log(self, loop: "TrainLoop", metrics: dict[str, float]) -> None: ...
    def end(self, loop: "TrainLoop", result: Any) -> None: ...
    def close(self, loop: "TrainLoop", error: BaseException | None) -> None: ...  # always, last


@dataclass
class TrainLoop:
    config: LoopConfig
    build_model: Callable[[], torch.nn.Module]
    make_data: Callable[[int, int], Loader]  # (rank, world_size) -> training batches
    objective: Objective
    callbacks: list[Callback]
    out_dir: Path
    eval_data: Callable[[str, int, int], Any] | None = None  # (split, rank, world) -> batches, or None if the split is empty
    settings: dict = field(default_factory=dict)  # the run's settings, recorded in checkpoints
    prepare: Callable[[torch.nn.Module], None] | None = None  # after experts are sharded, before the optimizer sees params
    # set up by setup()
    step: int = 0
    start: int = 0
    master_weights: bool = False  # bf16 at ZeRO-0: MasterAdamW holds the float32 master weights
    master_optimizer: Any = None
    graphs: Any = None  # moe.graphs.MoEGraphs with cuda_graphs: records step 1, replays the MoE layers after it
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ setup
    def setup(self) -> "TrainLoop":
        from moe_engine.training.parallel import init_distributed, param_groups, prepare_environment, shard_experts

        prepare_environment()  # before DeepSpeed's import reads its accelerator
        import deepspeed

        cfg = self.config
        self.rank, self.world = init_distributed()
        torch.manual_seed(cfg.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        # bf16 at ZeRO-0: the engine's own float32 master weights (MasterAdamW), not DeepSpeed's ZeRO copies
        self.master_weights = self.bf16 and cfg.zero_stage == 0
        if cfg.moment_dtype != "float32" and not self.master_weights:
            raise ConfigError(f"moment_dtype: {cfg.moment_dtype} needs bf16 training at zero_stage 0, and this run trains "
                              f"in float32 on the {self.device.type} (precision: {cfg.precision}); set moment_dtype: float32 "
                              "or precision: bf16")
        if self.master_weights and cfg.ep_size > 1:
            raise ValueError("bf16 at zero_stage 0 (the fused master-weight AdamW) runs with ep_size 1 only; "
                             "use zero_stage 1 or 2 for expert parallelism")
        model = self.build_model()
        if cfg.fused_norms and self.device.type == "cuda":
            fuse_rms_norms(model)  # the same function, ~1/8 of the eager norms' memory traffic
        self.param_counts = count_params(model)
        self.is_moe = bool(moe_layers(model))
        if self.is_moe:
            shard_experts(model, cfg.ep_size)
            for layer in moe_layers(model):
                layer.aux_grad_scale = 1.0 / cfg.grad_accum
        elif cfg.ep_size > 1:
            raise ValueError("ep_size > 1 needs an MoE model (dense models have no experts)")
        if self.prepare is not None:  # e.g. which parameters train (fine-tuning methods)
            self.prepare(model)
        groups = param_groups(model, cfg.weight_decay)
        if not any(g["params"] for g in groups):
            raise ValueError("no parameter is trainable: nothing to optimise")
        # fused: one kernel over each flat fp32 partition ZeRO hands the optimizer, instead of ~a dozen
        # foreach passes; the step's cost scales with total (not active) parameters, so MoE feels it most
        fused = cfg.fused_adamw and self.device.type == "cuda"
        if self.master_weights:  # one kernel per tensor: bf16 grad in, fp32 master and moments, bf16 weight out
            cast_parameters(model, torch.bfloat16)
            optimizer = MasterAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                    max_grad_norm=cfg.grad_clip, fused=fused,
                                    moment_dtype=torch.bfloat16 if cfg.moment_dtype == "bf16" else torch.float32)
        else:
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                          fused=fused)
        self.master_optimizer = optimizer if self.master_weights else None
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)
        self.engine, self.optimizer, _, self.schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=self._ds_config())
        # One data-parallel rank without ZeRO: DeepSpeed would still flatten every gradient, cast it to
        # fp32, all-reduce it with itself and copy it back (about 7 ms per billion parameters per step on
        # an H200). The result is the same bits either way (test_trainer), so the loop skips it.
        self.engine.enable_backward_allreduce = self._reduces_gradients(cfg)
        self.module = self.engine.module
        self.layer_names = {m: n for n, m in self.module.named_modules() if m in set(moe_layers(self.module))}
        self.ep_rank = next(iter(self.layer_names)).expert_parallel.rank if self.is_moe and cfg.ep_size > 1 else 0
        self.writes_model = self.rank < cfg.ep_size  # one writer per expert-parallel rank (expert-data-parallel rank 0)
        self.data = self.make_data(self.rank, self.world)
        self.seq_len = self.data.seq_len
        self.flops_per_token = train_flops_per_token(model, self.seq_len, self.param_counts)
        self.tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * self.seq_len * self.world
        self.peak = peak_flops(self.device, cfg.peak_tflops)
        self.pending_norm: torch.Tensor | None = None  # last applied step's grad norm, checked at the next sync
        self.step_counts: dict[str, torch.Tensor] = {}
        for cb in self.callbacks:
            cb.setup(self)
        self.graphs = self._cuda_graphs(model) if cfg.cuda_graphs else None
        return self

    def _cuda_graphs(self, model):
        """The MoE layers' CUDA graphs (``moe/graphs.py``): recorded during this run's first step,
        captured after it. Dense models have nothing to capture."""
        from moe_engine.moe.graphs import MoEGraphs

        if self.device.type != "cuda":
            raise ConfigError("cuda_graphs: true needs a CUDA GPU (this run is on the CPU); set cuda_graphs: false")
        if self.config.ep_size > 1:
            raise ConfigError("cuda_graphs: true runs with ep_size 1 only (expert parallelism's all-to-all has "
                              "data-dependent sizes); set cuda_graphs: false or ep_size: 1")
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ConfigError("cuda_graphs: true supports decoder-only models (an encoder-decoder's backward "
                              "does not run its MoE layers in reverse order); set cuda_graphs: false")
        layers = moe_layers(self.module)
        return MoEGraphs(layers).record() if layers else None

    def lr_lambda(self, step: int) -> float:
        cfg = self.config  # read at call time: a resumed run with another `steps` gets the new schedule
        return warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)

    def _reduces_gradients(self, cfg: LoopConfig) -> bool:
        """Whether DeepSpeed's backward all-reduce has anything to do (ZeRO stages reduce in their optimizer)."""
        return self.engine.enable_backward_allreduce and not (cfg.zero_stage == 0 and self.world == 1)

    def _ds_config(self) -> dict:
        cfg = self.config
        return {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            # MasterAdamW clips inside its step (one norm, the factor applied in its kernel)
            "gradient_clipping": 0.0 if self.master_weights else cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            # bf16 needs no loss scale, and DeepSpeed's per-parameter overflow scan costs ~6 kernels per
            # tensor every step; the divergence callback stops on a NaN/inf global norm instead. With
            # master weights the model is bf16 already and DeepSpeed must not wrap the optimizer.
            "bf16": {"enabled": self.bf16 and not self.master_weights, "check_grad_overflow": False},
            "steps_per_print": 10**9,
            # DeepSpeed's throughput timer synchronises the device at every forward and every step(): the
            # CPU could no longer run ahead of the GPU. The loop measures tokens/s itself.
            "timers": {"throughput": {"enabled": False}},
            "wall_clock_breakdown": False,
        }

    def callback_states(self) -> dict[str, dict]:
        return {cb.name: s for cb in self.callbacks if (s := cb.state_dict()) is not None}

    def load_callback_states(self, states: dict[str, dict]) -> None:
        for cb in self.callbacks:
            if cb.name in states:
                cb.load_state_dict(states[cb.name])

    def apply_lr(self, lr: float) -> None:
        """Make ``lr`` the peak learning rate from the current step on (a resumed run that changed it)."""
        self.schedule.base_lrs = [lr for _ in self.schedule.base_lrs]
        factor = self.lr_lambda(self.schedule.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * factor
        self.schedule._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # ------------------------------------------------------------------ training
    def run(self) -> "TrainLoop":
        """Train from ``self.step`` to ``config.steps``; callbacks are told about every step."""
        cfg = self.config
        batches = iter(self.data)
        self.engine.train()
        self._t_last, self._steps_since = time.perf_counter(), 0
        while self.step < cfg.steps:
            for cb in self.callbacks:
                cb.pre_step(self)
            self.train_step(batches)
            for cb in self.callbacks:
                cb.post_step(self)
            if self.graphs is not None and self.graphs.state == "recording":
                self.capture_graphs()
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.log()
        self.flush_pending_norm()
        return self

    def capture_graphs(self) -> None:
        """After the first step of this process (eager, its MoE inputs recorded), outside ``train_step``
        so nothing holds that step's autograd graph: capture the MoE layers' CUDA graphs."""
        captured = self.graphs.capture()
        if self.rank == 0:
            print(f"cuda_graphs: captured {captured} MoE layers; training forwards of that shape replay them")

    def train_step(self, batches) -> None:
        import torch.distributed as dist

        cfg, engine = self.config, self.engine
        step_loss = torch.zeros((), device=self.device)
        counts: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = to_device(next(batches), self.device)
            loss = engine(**self.objective.inputs(self.module, batch, (cfg.seed, self.step, micro, self.rank))).loss
            engine.backward(loss)
            step_loss += loss.detach() / cfg.grad_accum
            for layer, name in self.layer_names.items():
                c = layer.last_tokens_per_expert.float()
                counts[name] = counts.get(name, 0) + c
            if micro < cfg.grad_accum - 1:
                engine.step()  # accumulates; only the boundary call below applies the optimizer
        if self.world > 1:  # every rank sees a NaN from any rank, so all of them stop together
            dist.all_reduce(step_loss)
            step_loss /= self.world
            for c in counts.values():
                dist.all_reduce(c)
        if self.pending_norm is not None:  # the step's one host sync also reads the previous step's grad norm
            loss_value, norm_value = torch.stack([step_loss.float(), self.pending_norm.float().to(self.device)]).tolist()
            self._emit_norm(self.step, norm_value)
        else:
            loss_value = step_loss.item()
        for cb in self.callbacks:
            cb.on_loss(self, self.step + 1, loss_value)
        engine.step()
        self.pending_norm = self.grad_norm()
        for layer, name in self.layer_names.items():
            layer.moe_router.after_step(counts[name])  # e.g. DeepSeek-V3's aux-loss-free bias
        self.step_counts = counts
        self.losses.append(loss_value)
        self.step += 1
        self._steps_since += 1

    def grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm of the step just applied, on the device (no sync), or None."""
        if self.master_optimizer is not None:
            norm = self.master_optimizer.last_grad_norm
            return None if norm is None else norm.detach()
        return _grad_norm(self.engine)

    def _emit_norm(self, step: int, value: float) -> None:
        for cb in self.callbacks:
            cb.on_grad_norm(self, step, value)

    def flush_pending_norm(self) -> None:
        """Check the last applied step's gradient norm now (before weights are saved or exported)."""
        if self.pending_norm is not None:
            norm, self.pending_norm = self.pending_norm, None
            self._emit_norm(self.step, float(norm))

    @property
    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]

    def log(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._t_last
        tok_s = self.tokens_per_step * self._steps_since / max(elapsed, 1e-9)
        self._t_last, self._steps_since = time.perf_counter(), 0
        metrics = {"train/loss": self.losses[-1], "train/lr": self.lr, "train/tokens_per_s": tok_s,
                   "cost/tflops_per_s": tok_s * self.flops_per_token / 1e12}
        grad_norm = self.grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if self.peak:
            metrics["cost/mfu"] = tok_s * self.flops_per_token / (self.peak * self.world)
            metrics["cost/usd_per_million_tokens"] = usd_per_million_tokens(tok_s, self.world, self.config.gpu_hour_usd)
        for cb in self.callbacks:  # collective: every rank adds (router metrics all-reduce)
            cb.add_metrics(self, metrics)
        self.metrics = metrics
        for cb in self.callbacks:
            cb.on_log(self, metrics)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str, max_batches: int | None = None) -> float | None:
        """Mean loss over up to ``max_batches`` (default ``eval_batches``) batches of ``split``,
        averaged over ranks; None when there is nothing to evaluate (the split is empty, or 0 batches)."""
        import torch.distributed as dist

        limit = self.config.eval_batches if max_batches is None else max_batches
        if limit <= 0 or self.eval_data is None:
            return None
        batches = self.eval_data(split, self.rank, self.world)
        if batches is None:
            return None
        module = self.module
        was_training = module.training
        module.eval()
        total, n = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        try:
            for i, batch in enumerate(batches):
                if i >= limit:
                    break
                batch = to_device(batch, self.device)
                total += module(**self.objective.inputs(module, batch, (-1, i, self.rank))).loss.float()  # same noise for every model
                n += 1
        finally:
            module.train(was_training)
        if self.world > 1:
            dist.all_reduce(total)
            dist.all_reduce(n)
        return (total / n.clamp_min(1)).item() if n.item() else None

    # ------------------------------------------------------------------ the end
    def finish(self, result: Any) -> Any:
        for cb in self.callbacks:
            cb.end(self, result)
        return result

    def close(self, error: BaseException | None = None) -> None:
        for cb in self.callbacks:
            try:
                cb.close(self, error)
            except Exception as exc:  # a failing cleanup must not hide the run's own error
                if error is None:
                    raise
                print(f"warning: {cb.name} cleanup failed: {exc}")


def _grad_norm(engine) -> torch.Tensor | None:
    """The global gradient norm of the step just applied, left on the device (no sync); None when
    DeepSpeed computes none (ZeRO-0 keeps it inside torch's clip_grad_norm_)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return norm.detach().reshape(()) if torch.is_tensor(norm) else torch.tensor(float(norm))
