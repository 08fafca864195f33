"""T5 span corruption: the input and target together give back the sequence, the counts are
exact, spans are random, and the noise is reproducible from a seed."""

import pytest
import torch

from moe_engine.data.span_corruption import SpanCorruption, num_sentinels

VOCAB = 2000  # token ids below 900 in these tests; sentinels count down from 1999


def reconstruct(input_ids, labels, num_spans):
    """The original row, by putting each sentinel's span back in its place."""
    is_sentinel = lambda t: t >= VOCAB - num_spans  # noqa: E731
    spans, current = {}, None
    for t in labels.tolist():
        if is_sentinel(t):
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in input_ids.tolist():
        out.extend(spans[t] if is_sentinel(t) else [t])
    return out


@pytest.mark.parametrize("seq_len,density,mean_span", [(64, 0.15, 3.0), (20, 0.3, 2.0), (2048, 0.15, 3.0), (33, 0.5, 1.0)])
def test_input_and_target_rebuild_the_sequence_with_exact_counts(seq_len, density, mean_span):
    sc = SpanCorruption(seq_len, density, mean_span)
    tokens = torch.randint(0, 900, (16, seq_len), generator=torch.Generator().manual_seed(1))
    input_ids, labels = sc(tokens, VOCAB, torch.Generator().manual_seed(2))
    assert input_ids.shape == (16, seq_len - sc.num_noise + sc.num_spans)
    assert labels.shape == (16, sc.num_noise + sc.num_spans)
    assert sc.num_noise == round(seq_len * density) and sc.num_spans == round(sc.num_noise / mean_span)
    sentinels = list(range(VOCAB - 1, VOCAB - 1 - sc.num_spans, -1))
    for row in range(16):
        assert reconstruct(input_ids[row], labels[row], sc.num_spans) == tokens[row].tolist()
        # sentinels appear once each, in order, in both streams
        assert [t for t in input_ids[row].tolist() if t >= 900] == sentinels
        assert [t for t in labels[row].tolist() if t >= 900] == sentinels
        assert labels[row, 0].item() == VOCAB - 1


def test_span_lengths_are_random_and_noise_can_lead():
    sc = SpanCorruption(64)
    mask = sc.noise_mask(512, torch.Generator().manual_seed(0))
    assert (mask.sum(1) == sc.num_noise).all()
    starts = mask & ~torch.nn.functional.pad(mask, (1, 0))[:, :-1]
    assert (starts.sum(1) == sc.num_spans).all()  # spans never touch: a kept run separates them
    first_is_noise = mask[:, 0].float().mean().item()
    assert 0.4 < first_is_noise < 0.6
    # different rows get different layouts, and the layout of a seed is reproducible
    assert len({tuple(r.tolist()) for r in mask}) > 500
    assert torch.equal(mask, sc.noise_mask(512, torch.Generator().manual_seed(0)))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="noise_density"):
        SpanCorruption(64, noise_density=1.5)
    with pytest.raises(ValueError, match="too short"):
        SpanCorruption(1, noise_density=0.5, mean_span_length=1.0)
    with pytest.raises(ValueError, match="expected sequences of 64"):
        SpanCorruption(64)(torch.zeros(2, 32, dtype=torch.long), VOCAB)
    assert num_sentinels(2048) == 102
