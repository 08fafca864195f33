from pathlib import Path

import numpy as np
import pytest
import torch

from moe_engine.data import ShardDataset
from moe_engine.data.errors import ConfigError, ShardIntegrityError
from moe_engine.data.shards import read_manifest


def all_rows(path: Path, split: str = "train") -> np.ndarray:
    m = read_manifest(path)
    return np.concatenate([np.load(path / s["file"]) for s in m["splits"][split]["shards"]]).astype(np.int64)


def row_ids(batches, rows: np.ndarray) -> list[int]:
    """Map each yielded row back to its index in the split (rows are distinct text)."""
    index = {r.tobytes(): i for i, r in enumerate(rows)}
    return [index[r.numpy().tobytes()] for b in batches for r in b]


def test_batches_are_long_tensors_of_seq_len(prepared: Path):
    ds = ShardDataset(prepared, batch_size=4, epochs=1)
    batches = list(ds)
    assert len(batches) == len(ds) == ds.num_sequences // 4
    assert all(b.dtype == torch.long and b.shape == (4, 32) for b in batches)
    assert max(int(b.max()) for b in batches) < ds.vocab_size


def test_unshuffled_order_is_the_shard_order(prepared: Path):
    rows = all_rows(prepared, "val")
    ds = ShardDataset(prepared, split="val", batch_size=1, shuffle=False, epochs=1)
    assert np.array_equal(torch.cat(list(ds)).numpy(), rows[: len(ds)])


def test_ranks_get_disjoint_equal_slices_covering_the_epoch(prepared: Path):
    rows = all_rows(prepared)
    assert len({r.tobytes() for r in rows}) == len(rows)  # rows are distinguishable
    seen = []
    for rank in range(3):
        ds = ShardDataset(prepared, rank=rank, world_size=3, seed=7, batch_size=2, epochs=1, drop_last=False)
        seen.append(row_ids(ds, rows))
    assert len({len(s) for s in seen}) == 1  # lockstep
    flat = [i for s in seen for i in s]
    assert len(set(flat)) == len(flat) == (len(rows) // 3) * 3


def test_shuffle_is_reproducible_by_seed_and_changes_per_epoch(prepared: Path):
    rows = all_rows(prepared)
    order = lambda seed, epochs: row_ids(ShardDataset(prepared, seed=seed, batch_size=5, epochs=epochs, drop_last=False), rows)  # noqa: E731
    a, b, c = order(1, 2), order(1, 2), order(2, 2)
    assert a == b and a != c
    half = len(a) // 2
    assert a[:half] != a[half:] and sorted(a[:half]) == sorted(a[half:])  # same rows, new order


def test_resume_at_exact_position(prepared: Path):
    full = ShardDataset(prepared, rank=1, world_size=2, seed=3, batch_size=3, epochs=3)
    expected = [b.clone() for b in full]
    ds = ShardDataset(prepared, rank=1, world_size=2, seed=3, batch_size=3, epochs=3)
    it = iter(ds)
    k = len(ds) + 2  # into the second epoch
    head = [next(it) for _ in range(k)]
    state = ds.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 2
    resumed = ShardDataset(prepared, rank=1, world_size=2, seed=3, batch_size=3, epochs=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(head) + len(rest) == len(expected)
    assert all(torch.equal(x, y) for x, y in zip(head + rest, expected))


def test_incompatible_state_is_refused(prepared: Path):
    state = ShardDataset(prepared, seed=0).state_dict()
    with pytest.raises(ConfigError, match="seed=0 but this loader seed=1"):
        ShardDataset(prepared, seed=1).load_state_dict(state)
    with pytest.raises(ConfigError, match="lacks"):
        ShardDataset(prepared).load_state_dict({"epoch": 0})


def test_bad_arguments(prepared: Path):
    with pytest.raises(ConfigError, match="no split 'test'"):
        ShardDataset(prepared, split="test")
    with pytest.raises(ConfigError, match="rank 2 must be in"):
        ShardDataset(prepared, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="too few"):
        ShardDataset(prepared, split="val", batch_size=10_000)


def test_truncated_or_tampered_shard_stops_the_loader(prepared_copy: Path):
    shard = prepared_copy / "train_00000.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes
    ShardDataset(prepared_copy)  # structure is fine: opening is cheap and does not hash
    with pytest.raises(ShardIntegrityError, match="sha256_mismatch"):
        ShardDataset(prepared_copy, verify=True)
    shard.write_bytes(data[:1000])
    with pytest.raises(ShardIntegrityError, match="truncated"):
        ShardDataset(prepared_copy)
