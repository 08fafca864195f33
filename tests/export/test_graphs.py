"""Every architecture exports and matches stock transformers on onnxruntime (CPU, fp32), on inputs of
other batch sizes and lengths than the export example (so other routings), and the generation graphs
decode greedily to the same tokens as stock transformers."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from moe_engine.export.config import ExportConfig
from moe_engine.export.export import run

from .conftest import ARCHS, fast_export

TOL = 1e-4


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel(a: np.ndarray, b: torch.Tensor) -> float:
    b = b.numpy()
    return float(np.abs(a - b).max() / np.abs(b).max())


def _inputs(batch: int, length: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0  # the last row left-padded
    return ids, mask


def _greedy_causal(out, stock, ids, mask, steps):
    """Greedy decoding with model_with_past.onnx from an empty past, against stock transformers
    recomputing the whole sequence each step (no cache)."""
    sess = _session(out / "model_with_past.onnx")
    names = [o.name for o in sess.get_outputs()]
    past = {i.name: np.zeros((ids.shape[0], int(i.shape[1]), 0, int(i.shape[3])), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(), **past}
    ours, ref_ids, ref_mask, worst = [], ids, mask, 0.0
    for _ in range(steps):
        outs = sess.run(None, feed)
        with torch.no_grad():
            ref = stock(input_ids=ref_ids, attention_mask=ref_mask, position_ids=(ref_mask.cumsum(-1) - 1).clamp_min(0)).logits
        worst = max(worst, _rel(outs[0][:, -1], ref[:, -1]))
        nxt = torch.from_numpy(outs[0][:, -1].argmax(-1))[:, None]
        assert torch.equal(nxt[:, 0], ref[:, -1].argmax(-1))
        ours.append(nxt)
        ref_ids, ref_mask = torch.cat([ref_ids, nxt], 1), torch.cat([ref_mask, torch.ones_like(nxt)], 1)
        feed = {"input_ids": nxt.numpy(), "attention_mask": ref_mask.numpy(),
                "position_ids": ((ref_mask.cumsum(-1) - 1)[:, -1:]).numpy(),
                **{n.replace("present.", "past_key_values."): o for n, o in zip(names[1:], outs[1:])}}
    return worst


def _greedy_seq2seq(out, stock, ids, mask, steps):
    enc, dec = _session(out / "encoder.onnx"), _session(out / "decoder.onnx")
    (hidden,) = enc.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    d = torch.full((ids.shape[0], 1), stock.config.decoder_start_token_id)
    worst = 0.0
    for _ in range(steps):
        (logits,) = dec.run(None, {"decoder_input_ids": d.numpy(), "encoder_hidden_states": hidden,
                                   "attention_mask": mask.numpy()})
        with torch.no_grad():
            ref = stock(input_ids=ids, attention_mask=mask, decoder_input_ids=d).logits
        worst = max(worst, _rel(logits, ref))
        nxt = torch.from_numpy(logits[:, -1].argmax(-1))[:, None]
        assert torch.equal(nxt[:, 0], ref[:, -1].argmax(-1))
        d = torch.cat([d, nxt], 1)
    return worst


# mixtral and switch (a decoder and the encoder-decoder) in the quick set; each 10-25 s on an idle 2-core box, twice that
# under load, so the other three run with the slow tests
@pytest.mark.parametrize("arch", [a if a in ("mixtral", "switch_transformers") else pytest.param(a, marks=pytest.mark.slow)
                                  for a in ARCHS])
def test_export_matches_stock_transformers_on_new_inputs(arch, tiny_dir, tmp_path):
    src, out = tiny_dir(arch), tmp_path / "onnx"
    result = run(ExportConfig.from_dict(fast_export()), src, out)
    assert max(result.metrics["parity"].values()) <= TOL  # the stage's own check
    seq2seq = arch == "switch_transformers"
    stock = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(src).eval()  # default experts
    sess = _session(out / "model.onnx")
    expected = ["input_ids", "attention_mask"] + (["decoder_input_ids"] if seq2seq else [])
    assert [i.name for i in sess.get_inputs()] == expected and [o.name for o in sess.get_outputs()] == ["logits"]
    assert all(isinstance(d, str) for i in sess.get_inputs() for d in i.shape)  # batch and length are dynamic
    for batch, length, seed in ((1, 3, 1), (4, 23, 2)):  # the export example was 2 x 8
        ids, mask = _inputs(batch, length, stock.config.vocab_size, seed)
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        kw = {}
        if seq2seq:
            kw["decoder_input_ids"] = ids[:, : max(1, length - 2)]
            feed["decoder_input_ids"] = kw["decoder_input_ids"].numpy()
        with torch.no_grad():
            ref = stock(input_ids=ids, attention_mask=mask, **kw).logits
        (logits,) = sess.run(None, feed)
        keep = slice(None) if seq2seq else mask.bool().numpy()  # padded positions' logits are not defined
        assert np.abs(logits - ref.numpy())[keep].max() / np.abs(ref.numpy()).max() <= TOL
    ids, mask = _inputs(3, 7, stock.config.vocab_size, 3)
    worst = (_greedy_seq2seq if seq2seq else _greedy_causal)(out, stock, ids, mask, steps=4)
    assert worst <= TOL
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["graphs"]) == ({"model", "encoder", "decoder"} if seq2seq else {"model", "model_with_past"})
    assert (out / "config.json").is_file() and (out / "model.onnx.data").is_file()
