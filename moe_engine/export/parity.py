"""Parity of the exported graphs with stock transformers, on onnxruntime's CPU provider in fp32.

Every check runs on inputs unlike the export example (other batch sizes and lengths, seeded random
ids, the last row left-padded), so the routing differs from anything the export saw: a graph that
had baked the example's routing in would fail here. The error of a check is
``max |onnx - torch| / max |torch|`` over the attended positions. The with-past graph is run as
generation runs it: prefill from an empty past, then decode steps fed with its own ``present``
tensors, each step against stock transformers on the whole sequence (no cache).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moe_engine.export.graphs import DecoderLogits, Encoder, Graph, positions
from moe_engine.export.runtime import run, session


def rel_err(ort: np.ndarray, ref: torch.Tensor, attended: torch.Tensor | None = None) -> float:
    ref = ref.detach().float().numpy()
    diff = np.abs(ort - ref)
    if attended is not None:
        diff = diff[attended.bool().numpy()]
    return float(diff.max() / max(np.abs(ref).max(), 1e-30))


def _batch(g: torch.Generator, vocab: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, : max(1, length // 3)] = 0  # left padding
    return ids, mask


def _empty_past(sess, batch: int) -> dict[str, np.ndarray]:
    past = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, dim = i.shape
            past[i.name] = np.zeros((batch, int(heads), 0, int(dim)), np.float32)
    return past


@torch.no_grad()
def causal_parity(model: nn.Module, graphs: dict[str, Graph], cfg, providers=None) -> dict[str, float]:
    """{graph name: max relative error over the cases} for model.onnx and model_with_past.onnx."""
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = model.config.vocab_size
    errors = {}
    sess = session(graphs["model"].path, providers, exact=True)
    worst = 0.0
    for batch, length in cfg.cases:
        ids, mask = _batch(g, vocab, batch, length)
        (logits,) = run(sess, {"input_ids": ids, "attention_mask": mask}, ["logits"])
        worst = max(worst, rel_err(logits, model(input_ids=ids, attention_mask=mask).logits, mask))
    errors["model"] = worst
    if "model_with_past" in graphs:
        sess = session(graphs["model_with_past"].path, providers, exact=True)
        names = [o.name for o in sess.get_outputs()]
        worst = 0.0
        for batch, _ in cfg.cases:
            ids, mask = _batch(g, vocab, batch, cfg.past_length)
            feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask), **_empty_past(sess, batch)}
            new = ids
            for step in range(cfg.decode_steps + 1):
                outs = run(sess, feed)
                ref = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -new.shape[1]:]
                worst = max(worst, rel_err(outs[0], ref, mask[:, -new.shape[1]:]))
                new = torch.randint(0, vocab, (batch, 1), generator=g)
                ids, mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
                past = {n.replace("present.", "past_key_values."): o for n, o in zip(names[1:], outs[1:])}
                feed = {"input_ids": new, "attention_mask": mask, "position_ids": positions(mask)[:, -1:], **past}
        errors["model_with_past"] = worst
    return errors


@torch.no_grad()
def seq2seq_parity(model: nn.Module, graphs: dict[str, Graph], cfg, providers=None) -> dict[str, float]:
    """{graph name: max relative error} for Switch's model.onnx, encoder.onnx and decoder.onnx."""
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = model.config.vocab_size
    errors = {name: 0.0 for name in graphs}
    sessions = {name: session(graph.path, providers, exact=True) for name, graph in graphs.items()}
    for batch, length in cfg.cases:
        ids, mask = _batch(g, vocab, batch, length)
        dec = torch.randint(0, vocab, (batch, length + 2), generator=g)
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        (logits,) = run(sessions["model"], {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}, ["logits"])
        errors["model"] = max(errors["model"], rel_err(logits, ref))
        if "encoder" in sessions:
            hidden_ref = Encoder(model)(ids, mask)
            (hidden,) = run(sessions["encoder"], {"input_ids": ids, "attention_mask": mask})
            errors["encoder"] = max(errors["encoder"], rel_err(hidden, hidden_ref, mask))
            # the decoder on the ONNX encoder's output: the two graphs chained as generation chains them
            (logits,) = run(sessions["decoder"], {"decoder_input_ids": dec, "encoder_hidden_states": hidden,
                                                  "attention_mask": mask})
            errors["decoder"] = max(errors["decoder"], rel_err(logits, DecoderLogits(model)(dec, hidden_ref, mask)))
    return errors


def parity(model: nn.Module, graphs: list[Graph], cfg, providers=None) -> dict[str, float]:
    by_name = {g.name: g for g in graphs}
    if model.config.is_encoder_decoder:
        return seq2seq_parity(model, by_name, cfg, providers)
    return causal_parity(model, by_name, cfg, providers)
