import numpy as np
import pytest
import torch

from moe_engine.quantize.tensor import QuantizedWeight, pack_int4, unpack_int4


def _reference(w: torch.Tensor, bits: int, group: int):
    """Round-to-nearest in float64 numpy, written from the format's definition (tensor.py docstring)."""
    a = w.double().numpy()
    *lead, o, i = a.shape
    g = a.reshape(*lead, o, i // group, group)
    if bits == 8:
        s = (np.abs(g).max(-1) / 127.0).astype(np.float16).astype(np.float64)
        q = np.clip(np.round(g / s[..., None]), -127, 127)
        return q.reshape(a.shape), (q * s[..., None]).reshape(a.shape), s
    lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
    s = ((hi - lo) / 15.0).astype(np.float16).astype(np.float64)
    z = np.clip(np.round(-lo / s), 0, 15)
    q = np.clip(np.round(g / s[..., None]) + z[..., None], 0, 15)
    return q.reshape(a.shape), ((q - z[..., None]) * s[..., None]).reshape(a.shape), s


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 16), (4, 32)])
def test_quantize_matches_the_reference_math(bits, group):
    w = torch.randn(3, 24, 64) * 0.05
    q = QuantizedWeight.quantize(w, bits, group)
    ints, deq, s = _reference(w, bits, group if bits == 4 else 64)
    # float32 vs float64 rounding may move a value sitting exactly on .5 by one step; none does here
    assert np.array_equal(q.int_values().numpy().astype(np.int64), ints.astype(np.int64))
    np.testing.assert_allclose(q.dequantize().numpy(), deq, rtol=1e-6, atol=1e-9)
    # round to nearest: no value is off by more than half a step (plus the range the float16 scale and the
    # integer zero point shave off the edges: 15 steps of 2^-11 relative error, under 1% of a step)
    step = np.repeat(s, (group if bits == 4 else 64), axis=-1)
    assert np.all(np.abs(w.double().numpy() - deq) <= step * 0.51)


def test_int4_storage_is_packed_and_zero_is_exact():
    w = torch.randn(5, 32)
    w[:, ::3] = 0.0
    q = QuantizedWeight.quantize(w, 4, 16)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (5, 16)
    assert q.zeros.shape == (5, 2) and q.scales.dtype == torch.float16
    assert torch.all(q.dequantize()[:, ::3] == 0)
    assert 0 <= int(q.int_values().min()) and int(q.int_values().max()) <= 15
    vals = torch.randint(0, 16, (4, 10), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(vals)), vals)
    assert torch.equal(pack_int4(vals)[:, 0], vals[:, 0] | (vals[:, 1] << 4))  # ONNX uint4 order


def test_moving_the_model_keeps_the_stored_numbers():
    w = torch.randn(8, 32)
    q = QuantizedWeight.quantize(w, 4, 16)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.to(torch.bfloat16)
    assert q.scales.dtype == torch.float16 and torch.equal(q.scales, before["scales"])
    assert q.dequantize().dtype == torch.bfloat16
    q.float()
    assert q.dequantize().dtype == torch.float32
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in before.items())


def test_group_must_divide_the_input_width():
    with pytest.raises(ValueError, match="does not divide"):
        QuantizedWeight((4, 30), 4, 16)
