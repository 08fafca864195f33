"""Where offloaded experts live: host memory (pinned when a GPU reads it) or the model's safetensors
files, memory-mapped, plus optional low-precision copies for cache misses. Shape legend in
``moe/routing.py``; H = 2F for gated experts.

A store hands out one expert at a time as host tensors in transformers' layout (``w_in_HD``,
``w_out_DF``) and says how many bytes a copy of it moves; the device cache (``offload.py``) copies
them into its slots. Checkpoints come in two layouts and both are read: fused 3-D tensors
(``...experts.gate_up_proj`` [E, 2F, D], what ``models.io.save_model`` writes) and one matrix per
expert (``...experts.{e}.w1/w3/w2.weight`` or ``gate_proj/up_proj/down_proj``, what transformers'
``save_pretrained`` writes back for Mixtral, OLMoE, Qwen2-MoE and DeepSeek-V3).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_engine.errors import InputError

# per-expert checkpoint names: (gate or the only input projection, up, down)
_PER_EXPERT = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


# ----------------------------------------------------------------------------- low-precision copies
def quantize(w_RC: torch.Tensor, bits: int, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest with one float32 scale per ``group`` columns of each row; 4-bit
    values are packed two to a byte. The copy a miss may move instead of the full weights (HOBBIT,
    Tang et al. 2024: low-precision copies of the less important experts on a cache miss)."""
    rows, cols = w_RC.shape
    group = min(group, cols) if cols % min(group, cols) == 0 else cols
    w = w_RC.float().view(rows, cols // group, group)
    qmax = 127 if bits == 8 else 7
    scale = (w.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
    q = torch.round(w / scale).clamp(-qmax - 1, qmax).to(torch.int8).view(rows, cols)
    if bits == 4:
        q = ((q[:, 0::2] & 0xF) | (q[:, 1::2] << 4)).to(torch.uint8)  # cols is even for every model here
    return q, scale.view(rows, cols // group)


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Write ``q * scale`` into ``out`` [rows, cols] (on whatever device the tensors are)."""
    rows, cols = out.shape
    if bits == 4:
        low = (q & 0xF).to(torch.int8)
        high = (q >> 4).to(torch.int8)
        q = torch.stack([low, high], dim=-1).view(rows, cols)
        q = torch.where(q > 7, q - 16, q)
    groups = scale.shape[1]
    out.copy_((q.float().view(rows, groups, cols // groups) * scale[..., None]).view(rows, cols))


class Store:
    """Base: ``expert(e)`` -> (w_in_HD, w_out_DF) host tensors; ``low(e)`` -> quantized copies."""

    num_experts: int
    gated: bool
    low_bits: int = 0

    def expert(self, e: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def expert_nbytes(self, e: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.expert(e))

    def set_low_bits(self, bits: int, device=None, precompute: bool = False) -> None:
        """Use ``bits``-bit copies on misses; ``precompute`` quantizes every expert now, on ``device``
        (a GPU does it in milliseconds; quantizing on the host at the first miss stalls decoding)."""
        if bits != self.low_bits:
            self.low_bits, self._low = bits, {}
        if bits and precompute:
            for e in range(self.num_experts):
                self.low(e, device)

    def low(self, e: int, device=None) -> tuple[torch.Tensor, ...]:
        """(q_in, scale_in, q_out, scale_out), computed once per expert and kept in host memory."""
        if e not in self._low:
            w_in, w_out = (t.to(device) if device is not None else t for t in self.full(e))
            copies = [*quantize(w_in, self.low_bits), *quantize(w_out, self.low_bits)]
            self._low[e] = tuple(t.cpu().pin_memory() if self.pin else t.cpu() for t in copies)
        return self._low[e]

    def full(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in_HD, w_out_DF) as two whole tensors (the per-expert disk layout concatenates)."""
        parts = self.expert(e)
        return (torch.cat(parts[:-1]) if len(parts) > 2 else parts[0]), parts[-1]


class PinnedStore(Store):
    """Every expert in host memory, page-locked when a GPU copies from it (so copies are asynchronous
    and run at full PCIe speed)."""

    def __init__(self, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor, gated: bool, *, dtype, pin: bool):
        def host(t):
            t = t.detach().to("cpu", dtype).contiguous()
            return t.pin_memory() if pin else t

        self.w_in_EHD, self.w_out_EDF = host(w_in_EHD), host(w_out_EDF)
        self.num_experts, self.gated, self.pin, self.low_bits = w_in_EHD.shape[0], gated, pin, 0
        self._low: dict[int, tuple] = {}

    def expert(self, e):
        return self.w_in_EHD[e], self.w_out_EDF[e]


class SafetensorsStore(Store):
    """Experts read from the model's safetensors files through a memory map, one expert's slices at
    a time (the RAM tier of a disk -> RAM -> device hierarchy is the OS page cache)."""

    def __init__(self, model_dir: Path, module_name: str, num_experts: int, gated: bool, *, dtype):
        self.num_experts, self.gated, self.dtype, self.pin, self.low_bits = num_experts, gated, dtype, False, 0
        self._low: dict[int, tuple] = {}
        self._handles: dict[Path, object] = {}
        self.weight_map = _weight_map(Path(model_dir))
        fused_in = f"{module_name}.{'gate_up_proj' if gated else 'up_proj'}"
        if fused_in in self.weight_map:
            self.fused, self.keys = True, [fused_in, f"{module_name}.down_proj"]
        else:
            self.fused, self.keys = False, self._per_expert_keys(module_name, gated)

    def _per_expert_keys(self, module_name: str, gated: bool) -> list[str]:
        # transformers writes Mixtral's experts under block_sparse_moe: match on the decoder layer's prefix
        layer_prefix = module_name.split(".mlp.")[0].split(".block_sparse_moe.")[0] + "."
        for names in _PER_EXPERT:
            wanted = names if gated else names[1:]
            found = {}
            for key in self.weight_map:
                for name in wanted:
                    if key.startswith(layer_prefix) and key.endswith(f".experts.0.{name}.weight"):
                        found[name] = key[: -len(f"0.{name}.weight")] + "{e}" + f".{name}.weight"
            if len(found) == len(wanted):
                return [found[n] for n in wanted]
        raise InputError(f"the safetensors files have no expert weights for {module_name} (looked for "
                         f"{module_name}.gate_up_proj and per-expert w1/w3/w2 or gate_proj/up_proj/down_proj); "
                         "pass the directory the model was saved to, or use store=pinned")

    def _handle(self, key: str):
        from safetensors import safe_open

        file = self.weight_map[key]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def check_shapes(self, in_HD: tuple, out_DF: tuple) -> None:
        """Refuse a checkpoint whose experts are not the model's (another model's directory)."""
        got = self.full(0)
        if tuple(got[0].shape) != in_HD or tuple(got[1].shape) != out_DF:
            raise InputError(f"the expert weights in {next(iter(self.weight_map.values())).parent} do not match the model "
                             f"(expert 0: {tuple(got[0].shape)} and {tuple(got[1].shape)}, the model has {in_HD} and "
                             f"{out_DF}); pass the directory this model was loaded from")

    def expert(self, e):
        if self.fused:
            return tuple(self._handle(k).get_slice(k)[e].to(self.dtype) for k in self.keys)
        return tuple(self._handle(k.format(e=e)).get_tensor(k.format(e=e)).to(self.dtype) for k in self.keys)


def _weight_map(model_dir: Path) -> dict[str, Path]:
    """checkpoint key -> the safetensors file holding it (one file, or a sharded index)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise InputError(f"{index} is not a safetensors index (no weight_map)") from None
        return {k: model_dir / v for k, v in mapping.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InputError(f"{model_dir} has no safetensors files to read experts from; pass the model directory "
                         "(store=disk reads the checkpoint in place) or use store=pinned")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            out.update({k: f for k in handle.keys()})
    return out
