"""Training checkpoints: complete or absent, verified before use.

Layout of ``<out>/checkpoints``::

    step_00000100/
        model_ep000.pt      module state dict of expert-parallel rank 0 (its experts + the rest)
        rank00000.pt        per-rank optimizer partition (DeepSpeed ZeRO or torch), scheduler,
                            RNG states and the data loader position
        meta.json           step, world/ep sizes, sha256 of every file above (written last)
    latest                  name of the newest complete checkpoint

A checkpoint is written under a hidden temporary name and renamed when every rank has written
and rank 0 has hashed the files; ``latest`` is replaced atomically after that. A crash at any
moment leaves the previous checkpoint as ``latest``. Loading verifies every hash first and
refuses a checkpoint that does not match, naming the file.

DeepSpeed's own ``save_checkpoint`` is not used for the module: its MoE path only knows
DeepSpeed-native MoE modules, while the engine keeps transformers' fused expert tensors. The
optimizer partitions are DeepSpeed's (``optimizer.state_dict()`` per rank), as in its own format.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from moe_engine.data.shards import file_sha256

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or from an incompatible run."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save(root: Path, step: int, *, rank: int, world_size: int, ep_rank: int, ep_size: int, writes_model: bool,
         module: torch.nn.Module, rank_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = Path(root)
    name = f"step_{step:08d}"
    tmp, final = root / f".{name}.tmp", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if writes_model:
        torch.save(module.state_dict(), tmp / f"model_ep{ep_rank:03d}.pt")
    torch.save(rank_state, tmp / f"rank{rank:05d}.pt")
    _barrier()
    if rank == 0:
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        meta = {"step": step, "world_size": world_size, "ep_size": ep_size, "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, root / LATEST)
        complete = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest(root: Path) -> Path | None:
    marker = Path(root) / LATEST
    if not marker.exists():
        return None
    path = Path(root) / marker.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{marker} points to {path.name}, which does not exist; delete {marker} to start over")
    return path


def verify(path: Path) -> dict:
    """meta.json of a complete checkpoint whose files all match their hashes."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise CheckpointError(f"{path} has no meta.json: the checkpoint is incomplete; remove it or resume from an older one")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    for file, digest in meta["files"].items():
        f = path / file
        if not f.exists():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if file_sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is corrupt: its sha256 does not match meta.json")
    return meta


def load(path: Path, *, rank: int, world_size: int, ep_rank: int, ep_size: int, module: torch.nn.Module) -> dict:
    """Verify, restore the module in place, and return this rank's saved state."""
    meta = verify(path)
    if (meta["world_size"], meta["ep_size"]) != (world_size, ep_size):
        raise CheckpointError(
            f"{path} was written by {meta['world_size']} ranks with ep_size={meta['ep_size']}; this run has "
            f"{world_size} ranks with ep_size={ep_size}. Resume with the same layout."
        )
    module.load_state_dict(torch.load(path / f"model_ep{ep_rank:03d}.pt", map_location="cpu", weights_only=False))
    return torch.load(path / f"rank{rank:05d}.pt", map_location="cpu", weights_only=False)
