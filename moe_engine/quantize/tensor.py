"""One quantized weight: integers, scales (and zero points) in a module's buffers, dequantised on use.

A weight ``W[..., O, I]`` (I, the input width, is the dimension a matmul reduces over; leading
dimensions are experts) is stored as:

* ``bits=8``: ``qweight`` int8 ``[..., O, I]`` and ``scales`` float16 ``[..., O, 1]``; one symmetric
  scale per output row, ``W ~ qweight * scales`` (the int8 weight-only scheme of torchao and
  bitsandbytes). ``scale = max|W_row| / 127``.
* ``bits=4``: ``qweight`` uint8 ``[..., O, I/2]`` holding two 4-bit values per byte (column ``2j`` in
  the low nibble, ``2j+1`` in the high one: ONNX's and onnxruntime's uint4 packing), ``scales``
  float16 and ``zeros`` uint8 (0..15) ``[..., O, I/G]`` for groups of G input columns,
  ``W ~ (q - zeros) * scales``. Round-to-nearest with the range widened to include 0, as GPTQ's
  quantizer does (``scale = (max - min) / 15``, ``zero = round(-min / scale)``), so that 0 is exact.

Integer zero points (not float minimums) keep the format expressible as ONNX's
``DequantizeLinear`` with blocks, so the ONNX export runs the very same integers.
"""

from __future__ import annotations

import torch
from torch import nn

SCALE_DTYPE = torch.float16


class QuantizedWeight(nn.Module):
    """Buffers of one quantized weight; ``dequantize()`` gives it back as ``[..., O, I]``."""

    def __init__(self, shape: tuple[int, ...], bits: int, group_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        *lead, out_dim, in_dim = shape
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        group = in_dim if bits == 8 else group_size
        if in_dim % group:
            raise ValueError(f"group size {group} does not divide the input width {in_dim}")
        self.shape, self.bits, self.group_size, self.dtype = tuple(shape), bits, group, dtype
        groups = in_dim // group
        kw = dict(device=device)
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(*lead, out_dim, in_dim, dtype=torch.int8, **kw))
        else:
            self.register_buffer("qweight", torch.zeros(*lead, out_dim, in_dim // 2, dtype=torch.uint8, **kw))
            self.register_buffer("zeros", torch.zeros(*lead, out_dim, groups, dtype=torch.uint8, **kw))
        self.register_buffer("scales", torch.ones(*lead, out_dim, groups, dtype=SCALE_DTYPE, **kw))

    @classmethod
    def quantize(cls, w: torch.Tensor, bits: int, group_size: int) -> "QuantizedWeight":
        q = cls(tuple(w.shape), bits, group_size, dtype=w.dtype, device=w.device)
        ints, scales, zeros = quantize_tensor(w.detach(), bits, q.group_size)
        q.qweight.copy_(pack_int4(ints) if bits == 4 else ints)
        q.scales.copy_(scales)
        if zeros is not None:
            q.zeros.copy_(zeros)
        return q

    def int_values(self) -> torch.Tensor:
        """The integers, unpacked: int8 [-127, 127] or uint8 [0, 15], ``[..., O, I]``."""
        return unpack_int4(self.qweight) if self.bits == 4 else self.qweight

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        *lead, out_dim, in_dim = self.shape
        ints = self.int_values().reshape(*lead, out_dim, in_dim // self.group_size, self.group_size)
        scales = self.scales.float()[..., None]
        values = ints.float() if self.bits == 8 else ints.float() - self.zeros.float()[..., None]
        return (values * scales).reshape(self.shape).to(dtype or self.dtype)

    def _apply(self, fn, recurse=True):
        # Moving the model keeps the stored dtypes: ``model.to(torch.bfloat16)`` must not re-round the
        # float16 scales (it would change the checkpoint's numbers); it sets the compute dtype instead.
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            if moved.dtype != buf.dtype:
                moved = buf.to(moved.device)  # the move alone, from the original values
            self._buffers[name] = moved
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.dtype.is_floating_point:
            self.dtype = probe.dtype
        return self

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values() if b is not None)

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, bits={self.bits}, group_size={self.group_size}, dtype={self.dtype}"


def quantize_tensor(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(integers ``[..., O, I]``, float16 scales ``[..., O, I/G]``, uint8 zeros or None) by round-to-nearest."""
    *lead, out_dim, in_dim = w.shape
    g = w.float().reshape(*lead, out_dim, in_dim // group_size, group_size)
    if bits == 8:
        scales = (g.abs().amax(-1) / 127.0).clamp_min(1e-12).to(SCALE_DTYPE)
        ints = torch.round(g / scales.float()[..., None]).clamp(-127, 127).to(torch.int8)
        return ints.reshape(w.shape), scales, None
    lo = g.amin(-1).clamp_max(0.0)
    hi = g.amax(-1).clamp_min(0.0)
    scales = ((hi - lo) / 15.0).clamp_min(1e-12).to(SCALE_DTYPE)
    s = scales.float()  # quantize against the scale that is stored, not the unrounded one
    zeros = torch.round(-lo / s).clamp(0, 15)
    ints = (torch.round(g / s[..., None]) + zeros[..., None]).clamp(0, 15).to(torch.uint8)
    return ints.reshape(w.shape), scales, zeros.to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [..., I] of values 0..15 -> [..., I/2]: even columns in the low nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    return torch.stack((p & 0x0F, p >> 4), dim=-1).flatten(-2)
