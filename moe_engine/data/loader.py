"""Training data loader over token shards: disjoint per rank, seeded shuffle, exact resume.

    ds = ShardDataset("outputs/data", split="train", rank=0, world_size=1, seed=0, batch_size=8)
    for input_ids_BL in ds:   # torch.LongTensor [B, L], L = manifest seq_len
        ...
    ds.state_dict() / ds.load_state_dict(state)

Order: epoch e visits the N sequences of the split in the permutation
`default_rng([seed, e]).permutation(N)` (identity when shuffle=False); rank r takes positions
[r*M, (r+1)*M) of it, M = N // world_size, so ranks are disjoint, equally long (DDP steps
stay in lockstep), and together they cover the epoch bar N % world_size sequences. The
state is (epoch, batches already yielded in it): resuming recomputes the permutation and
skips to that batch, without reading any data before it.

Shards are memory-mapped, so only the rows of the current batch are read from disk. The
whole permutation is kept ([N] int64, 8 bytes per sequence: 800 MB at 1e8 sequences).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from moe_engine.data.errors import ConfigError, RuleFailure, ShardIntegrityError
from moe_engine.data.shards import read_manifest, shard_problem, verify_shards

STATE_KEYS = ("epoch", "batch", "seed", "rank", "world_size", "batch_size", "num_sequences", "shuffle")


class ShardDataset:
    """Iterable of LongTensor batches [batch_size, seq_len] from one split of a shards dir."""

    def __init__(self, path: str | Path, split: str = "train", rank: int = 0, world_size: int = 1,
                 seed: int = 0, batch_size: int = 8, shuffle: bool = True, epochs: int | None = None,
                 drop_last: bool = True, verify: bool = False):
        """epochs: None = repeat forever; verify: also check sha256 and ids of every shard
        (reads all data once); sizes and headers are always checked."""
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} must be in [0, world_size={world_size})")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        manifest = verify_shards(self.path) if verify else read_manifest(self.path)
        if split not in manifest["splits"]:
            raise ConfigError(f"{self.path}: no split '{split}' (has: {', '.join(manifest['splits'])})")
        self.manifest, self.split = manifest, split
        self.seq_len: int = manifest["seq_len"]
        self.vocab_size: int = manifest["vocab_size"]
        self.rank, self.world_size, self.seed, self.batch_size = rank, world_size, seed, batch_size
        self.shuffle, self.epochs, self.drop_last = shuffle, epochs, drop_last
        self._shards_NL = [self._open(s) for s in manifest["splits"][split]["shards"]]
        counts = [len(s) for s in self._shards_NL]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [shards + 1]
        self.num_sequences = int(self._offsets[-1])
        self.per_rank = self.num_sequences // world_size
        full, rest = divmod(self.per_rank, batch_size)
        self.batches_per_epoch = full + (1 if rest and not drop_last else 0)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"{self.path}: split '{split}' has {self.num_sequences} sequences, too few for "
                f"world_size={world_size} x batch_size={batch_size}")
        self.epoch, self.batch = 0, 0

    def _open(self, shard: dict[str, Any]) -> np.ndarray:
        problem = shard_problem(self.path, shard, self.manifest)
        if problem:
            rule, description, example = problem
            raise ShardIntegrityError([RuleFailure(rule, description, 1, (str(self.path / shard["file"]),), (example,))])
        return np.load(self.path / shard["file"], mmap_mode="r")

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self.batches_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        """[per_rank] global sequence indices of this rank in `epoch`."""
        n = self.num_sequences
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def read(self, index_B: np.ndarray) -> np.ndarray:
        """Rows [B, L] (int64) of the split by global sequence index, in the order given."""
        return self._read(np.asarray(index_B, dtype=np.int64))

    def _read(self, index_B: np.ndarray) -> np.ndarray:
        """Rows [B, L] as int64, gathered shard by shard from the memory maps."""
        shard_B = np.searchsorted(self._offsets, index_B, side="right") - 1
        out_BL = np.empty((len(index_B), self.seq_len), dtype=np.int64)
        for s in np.unique(shard_B):
            mask = shard_B == s
            out_BL[mask] = self._shards_NL[s][index_B[mask] - self._offsets[s]]
        return out_BL

    def __iter__(self) -> Iterator[Any]:
        import torch

        while self.epochs is None or self.epoch < self.epochs:
            order = self._order(self.epoch)
            while self.batch < self.batches_per_epoch:
                index_B = order[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
                batch_BL = torch.from_numpy(self._read(index_B))
                self.batch += 1  # counted before yielding: a state taken now resumes after it
                yield batch_BL
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state`; it must come from a loader over the same data and layout."""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ConfigError(f"loader state lacks {', '.join(missing)}")
        for key in STATE_KEYS[2:]:
            if state[key] != getattr(self, key):
                raise ConfigError(
                    f"loader state has {key}={state[key]!r} but this loader {key}={getattr(self, key)!r};"
                    " positions would not match")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
