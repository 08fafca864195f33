"""Selective expert loading: experts live off the device and each MoE layer keeps a device cache of N.

    model = me.load(model_dir)                                 # on the CPU
    offload_experts(model, OffloadConfig(resident=0.25), device="cuda", weights_dir=model_dir)
    me.generate(model, "...")
    offload_stats(model)   # hit rate, bytes moved per token, stall time

The experts module of every MoE layer is replaced by :class:`OffloadedExperts`, which implements the
layer's ``fetch_experts`` protocol (``moe/experts.py``): the layer passes its routing, gets back the
cache's slots and each assignment's slot, and runs its usual grouped or decode math on them. Routers
and dispatch do not change, so outputs equal those of the resident model (exact with
``low_precision_bits=0``; tested).

Per forward of layer L (a decode step is one token per sequence):
1. one device->host copy of L's chosen experts, together with a guess for layer L+1: L+1's router
   applied to L's input (mixtral-offloading, Eliseev & Mazur 2023: consecutive layers' inputs are
   close through the residual stream); this is the only host synchronisation;
2. a chosen expert found in L's cache is a hit; a miss overwrites the slot the policy gives up
   (``lru``, or ``stats``: the lowest routing frequency, from analytics' counts and the ones seen
   online) with a copy from the store, on a side CUDA stream;
3. with ``prefetch``, L+1's guessed experts are copied into L+1's cache on the same side stream, so
   they load while L computes (into free slots or slots L+1's last forward did not use);
4. the compute stream waits only for L's own copies. Stall time is that wait, measured with CUDA
   events (on a CPU: the copy time itself).
A forward that needs more distinct experts than the cache holds (a long prompt) gets them in a
temporary buffer, loaded in full precision on the compute stream, leaving the cache alone. With ``resident=0`` every
forward does that: the naive load-on-miss baseline of ``benchmarks/decode.py``.
With ``low_precision_bits`` (8 or 4) a miss whose assignments all weigh below ``low_precision_below``
copies a quantized version instead, and the slot is reloaded in full precision when an assignment
needs it (HOBBIT, Tang et al. 2024); outputs then differ from the resident model's.
Slots may be overwritten safely: step 1 waits for all earlier compute, so no earlier kernel still
reads a slot; copies of one layer run in order on one stream.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from moe_engine.errors import ConfigError, InputError
from moe_engine.inference.config import OffloadConfig
from moe_engine.inference.stores import PinnedStore, SafetensorsStore, Store, dequantize
from moe_engine.moe.experts import ExpertSlots, expert_weights


@dataclass
class OffloadStats:
    calls: int = 0
    tokens: int = 0
    hits: int = 0
    misses: int = 0
    low_precision_loads: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    overflow_loads: int = 0  # experts loaded into a temporary buffer (more distinct experts than slots)
    bytes_moved: int = 0
    stall_s: float = 0.0

    def add(self, other: "OffloadStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class _Policy:
    """Which resident expert to give up: least recently used, or (``stats``) the lowest routing
    frequency (prior shares from analytics plus the shares seen online), recency breaking ties."""

    def __init__(self, kind: str, prior_E: list[float] | None, num_experts: int):
        self.kind = kind
        self.prior = prior_E or [0.0] * num_experts
        self.seen = [0] * num_experts
        self.total = 0
        self.order: OrderedDict[int, None] = OrderedDict()  # resident experts, least recent first

    def touch(self, e: int) -> None:
        self.order[e] = None
        self.order.move_to_end(e)

    def count(self, experts: list[int]) -> None:
        for e in experts:
            self.seen[e] += 1
        self.total += len(experts)

    def score(self, e: int) -> float:
        return self.prior[e] + self.seen[e] / max(self.total, 1)

    def victim(self, protect: set[int]) -> int | None:
        candidates = [e for e in self.order if e not in protect]
        if not candidates:
            return None
        if self.kind == "lru":
            return candidates[0]
        return min(candidates, key=self.score)  # min keeps the least recent among equal scores

    def forget(self, e: int) -> None:
        self.order.pop(e, None)


class OffloadedExperts(nn.Module):
    """An MoE layer's experts: a store off the device and a cache of ``capacity`` slots on it."""

    def __init__(self, store: Store, capacity: int, config: OffloadConfig, device: torch.device, dtype: torch.dtype,
                 prior_E: list[float] | None = None):
        super().__init__()
        self.store, self.config, self.device, self.dtype = store, config, device, dtype
        self.num_experts, self.gated, self.capacity = store.num_experts, store.gated, capacity
        w_in, w_out = store.full(0)
        self.in_shape, self.out_shape = tuple(w_in.shape), tuple(w_out.shape)
        self.slots_in = torch.empty(capacity, *self.in_shape, device=device, dtype=dtype)
        self.slots_out = torch.empty(capacity, *self.out_shape, device=device, dtype=dtype)
        self.slot_of: dict[int, int] = {}  # resident expert -> slot
        self.low_slot = [False] * capacity  # slot holds a low-precision copy
        self.prefetched_slot = [False] * capacity  # filled by a prefetch, not yet used
        self.ready: list[torch.cuda.Event | None] = [None] * capacity  # copy finished (CUDA)
        self.policy = _Policy(config.policy, prior_E, self.num_experts)
        self.stats = OffloadStats()
        self.link: tuple = ()  # (the next MoE layer's experts, its router) for prefetch; a tuple, not submodules
        self.last_used: set[int] = set()  # experts of this layer's previous forward: a prefetch never evicts them
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._stall_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    # -- the protocol of moe/experts.py --------------------------------------------------------
    def expert_weights(self):
        """Every expert on the device (loads them all; expert parallelism and export use it)."""
        w_in = torch.stack([self.store.full(e)[0] for e in range(self.num_experts)]).to(self.device, self.dtype)
        w_out = torch.stack([self.store.full(e)[1] for e in range(self.num_experts)]).to(self.device, self.dtype)
        return w_in, w_out, self.gated

    @torch.no_grad()
    def fetch_experts(self, routing, x_TD: torch.Tensor) -> ExpertSlots:
        num_assign = routing.expert_idx_A.numel()
        wanted = [routing.expert_idx_A]
        nxt, next_router = self.link or (None, None)
        guess = self.config.prefetch and nxt is not None and nxt.capacity > 0
        if guess:
            wanted.append(next_router(x_TD).expert_idx_A)
        host = torch.cat(wanted).tolist()  # the one host synchronisation of this layer
        chosen_A, guessed = host[:num_assign], host[num_assign:]
        full = set(chosen_A)
        if self.config.low_precision_bits:
            weights = routing.weight_A.float().tolist()
            full = {e for e, w in zip(chosen_A, weights) if w >= self.config.low_precision_below}
        needed = list(dict.fromkeys(e for e in chosen_A if e < self.num_experts))
        self.stats.calls += 1
        self.stats.tokens += x_TD.shape[0]
        self.policy.count([e for e in chosen_A if e < self.num_experts])
        if len(needed) > self.capacity:
            self.last_used = set(needed)
            return self._overflow(needed, chosen_A)
        waits = []
        for e in needed:
            slot = self.slot_of.get(e)
            if slot is not None and not (self.low_slot[slot] and e in full):
                self.stats.hits += 1
                if self.prefetched_slot[slot]:
                    self.stats.prefetch_used += 1
                    self.prefetched_slot[slot] = False
            else:
                self.stats.misses += 1
                slot = self._load(e, protect=set(needed), low=bool(self.config.low_precision_bits) and e not in full)
            self.policy.touch(e)
            waits.append(slot)
        self.last_used = set(needed)
        if guess:
            nxt._prefetch(guessed)
        self._wait(waits)
        slot_A = [self.slot_of[e] if e < self.num_experts else self.capacity for e in chosen_A]
        slot_A = torch.tensor(slot_A, dtype=torch.long).to(routing.expert_idx_A.device, non_blocking=True)
        return ExpertSlots(self.slots_in, self.slots_out, self.gated, slot_A)

    # -- copies --------------------------------------------------------------------------------
    def _copy_into(self, slot_in: torch.Tensor, slot_out: torch.Tensor, e: int, low: bool) -> int:
        """Copy expert ``e`` from the store into two device tensors; returns the bytes moved."""
        if low:
            bits = self.config.low_precision_bits
            q_in, s_in, q_out, s_out = [t.to(self.device, non_blocking=True) for t in self.store.low(e)]
            dequantize(q_in, s_in, bits, slot_in)
            dequantize(q_out, s_out, bits, slot_out)
            return sum(t.numel() * t.element_size() for t in (q_in, s_in, q_out, s_out))
        *parts_in, w_out = self.store.expert(e)
        row = 0
        for part in parts_in:  # fused [H, D], or gate and up rows of a per-expert checkpoint
            slot_in[row: row + part.shape[0]].copy_(part, non_blocking=True)
            row += part.shape[0]
        slot_out.copy_(w_out, non_blocking=True)
        return sum(t.numel() * t.element_size() for t in (*parts_in, w_out))

    def _slot_for(self, e: int, protect: set[int]) -> int | None:
        """The slot ``e`` goes to: its own (a low-precision copy reloaded), a free one, or the policy's
        victim outside ``protect`` (None: every resident expert is protected)."""
        if e in self.slot_of:
            return self.slot_of[e]
        if len(self.slot_of) < self.capacity:
            return len(self.slot_of)
        old = self.policy.victim(protect)
        if old is None:
            return None
        self.policy.forget(old)
        return self.slot_of.pop(old)

    def _load(self, e: int, protect: set[int], low: bool, prefetch: bool = False, slot: int | None = None) -> int:
        slot = self._slot_for(e, protect) if slot is None else slot
        self.slot_of[e] = slot
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                moved = self._copy_into(self.slots_in[slot], self.slots_out[slot], e, low)
                self.ready[slot] = torch.cuda.Event()
                self.ready[slot].record(self.copy_stream)
        else:
            start = time.perf_counter()
            moved = self._copy_into(self.slots_in[slot], self.slots_out[slot], e, low)
            if not prefetch:
                self.stats.stall_s += time.perf_counter() - start
        self.stats.bytes_moved += moved
        self.stats.low_precision_loads += int(low)
        self.low_slot[slot] = low
        self.prefetched_slot[slot] = prefetch
        return slot

    def _prefetch(self, guessed: list[int]) -> None:
        """Load this layer's likely experts ahead of its forward (the previous layer calls this), most
        often guessed first, into free slots or slots of experts the layer's last forward did not use:
        consecutive tokens often reuse experts, and a wrong guess must not evict them."""
        wanted = sorted({e for e in guessed if e < self.num_experts}, key=lambda e: -guessed.count(e))
        protect = set(wanted) | self.last_used
        for e in wanted:
            if e in self.slot_of:
                continue
            slot = self._slot_for(e, protect)
            if slot is None:
                break
            self._load(e, protect, low=bool(self.config.low_precision_bits), prefetch=True, slot=slot)
            self.policy.touch(e)
            self.stats.prefetched += 1

    def _wait(self, slots: list[int]) -> None:
        """The compute stream waits for the copies into ``slots`` (GPU: without blocking the host)."""
        if not self.cuda:
            return
        events = [self.ready[s] for s in slots if self.ready[s] is not None]
        if not events:
            return
        stream = torch.cuda.current_stream(self.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(stream)
        for event in events:
            stream.wait_event(event)
        after.record(stream)
        self._stall_events.append((before, after))
        for s in slots:
            self.ready[s] = None
        if len(self._stall_events) > 256:
            self._drain(block=False)

    def _drain(self, block: bool) -> None:
        while self._stall_events and (block or self._stall_events[0][1].query()):
            before, after = self._stall_events.pop(0)
            after.synchronize()
            self.stats.stall_s += before.elapsed_time(after) / 1e3

    def _overflow(self, needed: list[int], chosen_A: list[int]) -> ExpertSlots:
        """More distinct experts than slots: a temporary buffer, filled on the compute stream."""
        w_in = torch.empty(len(needed), *self.in_shape, device=self.device, dtype=self.dtype)
        w_out = torch.empty(len(needed), *self.out_shape, device=self.device, dtype=self.dtype)
        if self.cuda:
            self._wait(list(self.slot_of.values()))  # a slot copied from must be complete
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record()
        start = time.perf_counter()
        for i, e in enumerate(needed):
            slot = self.slot_of.get(e)
            if slot is not None and not self.low_slot[slot]:
                w_in[i].copy_(self.slots_in[slot])
                w_out[i].copy_(self.slots_out[slot])
                self.stats.hits += 1
            else:
                self.stats.bytes_moved += self._copy_into(w_in[i], w_out[i], e, low=False)
                self.stats.overflow_loads += 1
                self.stats.misses += 1
        if self.cuda:
            after.record()
            self._stall_events.append((before, after))
        else:
            self.stats.stall_s += time.perf_counter() - start
        index = {e: i for i, e in enumerate(needed)}
        slot_A = torch.tensor([index.get(e, len(needed)) for e in chosen_A], dtype=torch.long).to(self.device, non_blocking=True)
        return ExpertSlots(w_in, w_out, self.gated, slot_A)

    def warm(self, experts: list[int]) -> None:
        """Fill the cache before the first forward (not counted as decode traffic)."""
        for e in experts[: self.capacity]:
            if e not in self.slot_of:
                self._load(e, protect=set(experts), low=False)
                self.policy.touch(e)
        self.prefetched_slot = [False] * self.capacity
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self.ready = [None] * self.capacity
        self.stats = OffloadStats()

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, resident={self.capacity}, store={type(self.store).__name__}, "
                f"policy={self.config.policy}, prefetch={self.config.prefetch}, low_precision_bits={self.config.low_precision_bits}")


# ----------------------------------------------------------------------------- model-level API
def offloaded(model: nn.Module) -> list[OffloadedExperts]:
    return [m for m in model.modules() if isinstance(m, OffloadedExperts)]


def offload_experts(model: nn.Module, config: OffloadConfig | None = None, *, device=None, dtype=None,
                    weights_dir: str | Path | None = None, stats_source=None, **settings) -> nn.Module:
    """Move every engine MoE layer's experts off the device, in place; the rest of the model goes to
    ``device``/``dtype``. On a model already offloaded it re-plans the caches (another size, policy or
    precision) and keeps the stores, so nothing is read or pinned again. ``weights_dir``: the model's directory (needed for ``store="disk"``).
    ``stats_source`` (policy ``stats``): a RoutingRecorder, ``{layer: counts}``, or a path to
    pretraining's ``tokens_per_expert.json`` / the analyze stage's ``expert_load.csv`` (default:
    ``config.stats``)."""
    from moe_engine.models.adapters import moe_layers

    config = (config or OffloadConfig()).replace(**settings) if settings else (config or OffloadConfig())
    layers = moe_layers(model)
    if not layers:
        raise InputError("the model has no engine MoE layers to offload; build it with me.build_model or me.load")
    if model.config.is_encoder_decoder:
        raise InputError("expert offloading supports decoder-only models (mixtral, olmoe, qwen2_moe, deepseek_v3)")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or next(model.parameters()).dtype
    if config.store == "disk" and weights_dir is None:
        raise ConfigError("generate.offload.store = 'disk' reads the model's safetensors files: pass the model "
                          "directory (weights_dir=, or load the model from a directory)")
    names = {id(m): n for n, m in model.named_modules()}
    priors = expert_shares(stats_source if stats_source is not None else config.stats, layers, names) if config.policy == "stats" else {}
    providers = []
    for i, layer in enumerate(layers):
        old = layer.experts if isinstance(layer.experts, OffloadedExperts) else None
        wanted = SafetensorsStore if config.store == "disk" else PinnedStore
        if old is not None and isinstance(old.store, wanted):  # re-plan an offloaded model: keep its store
            store, quantize_on = old.store, device
        else:
            w_in, w_out, gated = old.expert_weights() if old is not None else expert_weights(layer.experts)
            quantize_on = w_in.device  # where the weights are (a GPU quantizes all experts in milliseconds)
            if config.store == "disk":
                store = SafetensorsStore(Path(weights_dir), f"{names[id(layer)]}.experts", w_in.shape[0], gated, dtype=dtype)
                store.check_shapes(tuple(w_in.shape[1:]), tuple(w_out.shape[1:]))
            else:
                store = PinnedStore(w_in, w_out, gated, dtype=dtype, pin=device.type == "cuda")
            del w_in, w_out
        store.set_low_bits(config.low_precision_bits, quantize_on, precompute=isinstance(store, PinnedStore))
        layer.experts = nn.Module()  # drop the resident weights (or the old cache) before the model moves
        providers.append((layer, store, store.num_experts))
    model.to(device=device, dtype=dtype)
    previous = None
    for i, (layer, store, num_experts) in enumerate(providers):
        capacity = round(config.resident * num_experts)
        provider = OffloadedExperts(store, capacity, config, device, dtype, priors.get(i))
        layer.experts = provider
        prior = priors.get(i)
        provider.warm(sorted(range(num_experts), key=lambda e: -prior[e]) if prior else list(range(num_experts)))
        if previous is not None:
            previous.link = (provider, layer.moe_router)
        previous = provider
    return model


def expert_shares(source, layers, names: dict[int, str]) -> dict[int, list[float]]:
    """Per-layer routing shares (layer index -> [E] fractions) from the statistics analytics computes."""
    from moe_engine.analytics.metrics import load_share

    if source is None:
        return {}
    counts: dict[int, torch.Tensor] = {}
    if hasattr(source, "layer_data"):  # a RoutingRecorder run on calibration text
        counts = {i: source.layer_data(i).counts_E for i in range(len(source.layers))}
    elif isinstance(source, dict):
        by_name = {names[id(layer)]: i for i, layer in enumerate(layers)}
        counts = {by_name.get(k, k): torch.as_tensor(v, dtype=torch.float) for k, v in source.items()}
    else:
        counts = _read_counts(Path(source), layers, names)
    shares = {}
    for i, c in counts.items():
        if not isinstance(i, int) or not 0 <= i < len(layers) or c.numel() != layers[i].num_experts:
            raise InputError(f"routing statistics for layer {i!r} do not match the model ({len(layers)} MoE layers, "
                             f"{layers[0].num_experts} experts); record them on this model")
        shares[i] = load_share(c.float()).tolist()
    return shares


def _read_counts(path: Path, layers, names) -> dict[int, torch.Tensor]:
    import json

    if not path.is_file():
        raise InputError(f"routing statistics file {path} does not exist (tokens_per_expert.json from pretrain, or "
                         "expert_load.csv from analyze)")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise InputError(f"{path} is not JSON ({exc})") from None
        by_name = {names[id(layer)]: i for i, layer in enumerate(layers)}
        return {by_name.get(k, k): torch.tensor(v, dtype=torch.float) for k, v in data.items()}
    if path.suffix == ".csv":
        import pandas as pd

        table = pd.read_csv(path)
        if not {"layer", "expert", "tokens"} <= set(table.columns):
            raise InputError(f"{path} has no layer/expert/tokens columns (write it with moe-lab analyze)")
        if "checkpoint" in table.columns:  # analyze lists every checkpoint; the last one is the final model
            table = table[table["checkpoint"] == table["checkpoint"].iloc[-1]]
        return {int(i): torch.tensor(g.sort_values("expert")["tokens"].to_numpy(), dtype=torch.float)
                for i, g in table.groupby("layer")}
    raise InputError(f"{path}: expected tokens_per_expert.json or expert_load.csv")


def offload_stats(model: nn.Module) -> dict | None:
    """Totals over the offloaded layers: hit rate, bytes moved per token, stall time (None if none)."""
    providers = offloaded(model)
    if not providers:
        return None
    total = OffloadStats()
    for p in providers:
        p._drain(block=True)
        total.add(p.stats)
    out = {f.name: getattr(total, f.name) for f in fields(total)}
    tokens = out["tokens"] = providers[0].stats.tokens  # tokens through the model (each layer sees them all)
    lookups = total.hits + total.misses
    out.update(
        layers=len(providers), resident_per_layer=providers[0].capacity, experts_per_layer=providers[0].num_experts,
        hit_rate=total.hits / lookups if lookups else float("nan"),
        prefetch_accuracy=total.prefetch_used / total.prefetched if total.prefetched else float("nan"),
        bytes_per_token=total.bytes_moved / tokens if tokens else float("nan"),
        stall_s_per_token=total.stall_s / tokens if tokens else float("nan"),
    )
    return out


def reset_offload_stats(model: nn.Module) -> None:
    for p in offloaded(model):
        p._drain(block=True)
        p.stats = OffloadStats()
