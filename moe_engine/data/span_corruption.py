"""T5 span corruption, the pretraining objective of encoder-decoder MoEs (Switch Transformer).

Raffel et al. 2020 (T5), sec. 3.1.4 and 3.3.4; Fedus et al. 2021 (Switch) pretrain with it on C4.
A fraction ``noise_density`` of each sequence's tokens, in spans of mean length
``mean_span_length``, is removed from the encoder input; each removed span is replaced by one
sentinel token, and the decoder target lists the sentinels, each followed by its span:

    tokens   a b c d e f g h         noise: c d, g
    input    a b <s0> e f <s1> h
    target   <s0> c d <s1> g

For a fixed sequence length the counts are fixed (noise tokens ``round(L * density)``, spans
``round(noise / mean_span_length)``), so every row of a batch has the same input and target length
and no padding is needed. Span lengths are a random composition of those counts, as in T5's
``random_spans_noise_mask``; the spans alternate with the kept runs, and whether the sequence
starts with a kept run or a noise span is drawn per row, so the first token can be noise too.
Sentinel ``i`` is token id ``vocab_size - 1 - i`` (T5's ``<extra_id_i>``), so the model's vocabulary
is the tokenizer's plus :func:`num_spans` ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpanCorruption:
    seq_len: int
    noise_density: float = 0.15
    mean_span_length: float = 3.0

    def __post_init__(self):
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_span_length < 1.0:
            raise ValueError(f"mean_span_length must be >= 1, got {self.mean_span_length}")
        if self.num_noise < 1 or self.seq_len - self.num_noise < self.num_spans:
            raise ValueError(f"seq_len {self.seq_len} is too short for noise_density {self.noise_density}")

    @property
    def num_noise(self) -> int:
        return max(1, min(self.seq_len - 1, round(self.seq_len * self.noise_density)))

    @property
    def num_spans(self) -> int:
        return max(1, round(self.num_noise / self.mean_span_length))

    @property
    def input_length(self) -> int:
        return self.seq_len - self.num_noise + self.num_spans

    @property
    def target_length(self) -> int:
        return self.num_noise + self.num_spans

    def __call__(self, tokens_BL: torch.Tensor, vocab_size: int, generator: torch.Generator | None = None):
        """(input_ids [B, input_length], labels [B, target_length]) for token rows [B, seq_len]."""
        batch, length = tokens_BL.shape
        if length != self.seq_len:
            raise ValueError(f"expected sequences of {self.seq_len} tokens, got {length}")
        noise_BL = self.noise_mask(batch, generator).to(tokens_BL.device)
        span_start_BL = noise_BL & ~torch.nn.functional.pad(noise_BL, (1, 0))[:, :-1]
        span_id_BL = span_start_BL.cumsum(1) - 1  # which noise span a noise token belongs to
        sentinel_BL = vocab_size - 1 - span_id_BL
        # encoder: kept tokens, and the sentinel in place of each span's first token
        keep_in_BL = ~noise_BL | span_start_BL
        enc_BL = torch.where(span_start_BL, sentinel_BL, tokens_BL)
        # decoder: a sentinel before each span, then the span's tokens
        dec_B2L = torch.stack([torch.where(span_start_BL, sentinel_BL, -1), torch.where(noise_BL, tokens_BL, -1)], dim=2)
        dec_flat = dec_B2L.reshape(batch, 2 * length)
        input_ids = enc_BL[keep_in_BL].view(batch, self.input_length)
        labels = dec_flat[dec_flat >= 0].view(batch, self.target_length)
        return input_ids, labels

    def noise_mask(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, seq_len] bool: True where a token is removed (a random composition of the counts)."""
        noise, spans, kept = self.num_noise, self.num_spans, self.seq_len - self.num_noise
        noise_lengths = _random_composition(noise, spans, batch, generator)  # [B, spans], each >= 1
        kept_lengths = _random_composition(kept, spans, batch, generator)
        noise_first = torch.rand(batch, generator=generator) < 0.5
        # runs alternate kept/noise (or noise/kept); with noise first, the last kept run closes the row
        first = torch.where(noise_first[:, None], noise_lengths, kept_lengths)
        second = torch.where(noise_first[:, None], kept_lengths, noise_lengths)
        runs_B2S = torch.stack([first, second], dim=2).reshape(batch, 2 * spans)
        is_noise_run = torch.zeros(batch, 2 * spans, dtype=torch.bool)
        is_noise_run[:, 0::2] = noise_first[:, None]
        is_noise_run[:, 1::2] = ~noise_first[:, None]
        run_of_token = torch.repeat_interleave(torch.arange(2 * spans).repeat(batch), runs_B2S.flatten()).view(batch, self.seq_len)
        return is_noise_run.gather(1, run_of_token)


def _random_composition(total: int, parts: int, batch: int, generator) -> torch.Tensor:
    """[batch, parts] positive integers summing to ``total``, uniform over compositions (T5's
    ``_random_segmentation``: choose parts - 1 cut points among the total - 1 gaps)."""
    if parts == 1:
        return torch.full((batch, 1), total, dtype=torch.long)
    cuts = torch.rand(batch, total - 1, generator=generator).argsort(dim=1)[:, : parts - 1].sort(dim=1).values + 1
    edges = torch.cat([torch.zeros(batch, 1, dtype=torch.long), cuts, torch.full((batch, 1), total, dtype=torch.long)], dim=1)
    return edges.diff(dim=1)


def num_sentinels(seq_len: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> int:
    """How many sentinel ids a model needs on top of its tokenizer's vocabulary."""
    return SpanCorruption(seq_len, noise_density, mean_span_length).num_spans
