"""Training checkpoints: complete or absent, verified before use, loaded without running code.

Layout of ``<out>/checkpoints``::

    step_00000100/
        model_ep000.pt      module state dict of expert-parallel rank 0 (its experts + the rest)
        rank00000.pt        per-rank optimizer partition (DeepSpeed ZeRO or torch), scheduler,
                            RNG states, the data loader position and the callbacks' state
        meta.json           step, world/ep sizes, the run's settings, sha256 of every file above
    latest                  name of the newest complete checkpoint

A checkpoint is written under a hidden temporary name and renamed when every rank has written
and rank 0 has hashed the files; ``latest`` is replaced atomically after that. A crash at any
moment leaves the previous checkpoint as ``latest``.

Safety: files are read with ``torch.load(weights_only=True)``, which unpickles tensors and plain
data only (plus DeepSpeed's loss-scaler record and two of its enums/named tuples, allow-listed by
name), so a crafted checkpoint cannot run code; a file that needs anything else is refused. The
sha256 list in meta.json guards against corruption (a truncated copy, a bad disk), not against an
attacker, who could rewrite it too: safety comes from the loader.

Corruption: if ``latest`` fails verification, older checkpoints are tried newest first and the
first valid one is used, with a warning naming what was skipped.

DeepSpeed's own ``save_checkpoint`` is not used for the module: its MoE path only knows
DeepSpeed-native MoE modules, while the engine keeps transformers' fused expert tensors.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from moe_engine.data.shards import file_sha256
from moe_engine.errors import UserError

LATEST = "latest"


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, corrupt, unsafe or from an incompatible run."""


def rng_state() -> dict:
    """Every RNG's state as tensors and plain data (numpy's key array as a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _safe_globals() -> list:
    """The non-tensor records DeepSpeed's ZeRO optimizer puts in its state_dict."""
    allowed = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # no DeepSpeed: plain torch optimizer states only
        pass
    return allowed


def load_file(path: Path):
    """``torch.load`` of tensors and plain data only; anything else is refused, naming the file."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for an object outside the allow-list
        first = str(exc).split("\n")
        detail = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0][:200])
        raise CheckpointError(f"refused to load {path}: it holds more than tensors and plain data ({detail}); "
                              "only checkpoints written by moe-lab are accepted") from None


def _barrier():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save(root: Path, step: int, *, rank: int, world_size: int, ep_rank: int, ep_size: int, writes_model: bool,
         module: torch.nn.Module, rank_state: dict, keep: int, settings: dict | None = None) -> Path:
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
        meta = {"step": step, "world_size": world_size, "ep_size": ep_size, "settings": settings or {}, "files": files}
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
    """The checkpoint ``latest`` names (not verified); None when there is none."""
    marker = Path(root) / LATEST
    if not marker.exists():
        return None
    return Path(root) / marker.read_text().strip()


def verify(path: Path) -> dict:
    """meta.json of a complete checkpoint whose files all match their hashes."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not meta_path.exists():
        raise CheckpointError(f"{path} has no meta.json: the checkpoint is incomplete; remove it or resume from an older one")
    try:
        meta = json.loads(meta_path.read_text())
        files = dict(meta["files"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path} is not a valid checkpoint record ({exc}); the checkpoint is corrupt") from None
    for file, digest in files.items():
        f = path / file
        if Path(file).name != file:
            raise CheckpointError(f"{meta_path} names a file outside its checkpoint ({file!r}); refusing it")
        if not f.exists():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if file_sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is corrupt: its sha256 does not match meta.json")
    return meta


def find_resumable(root: Path, quiet: bool = False) -> tuple[Path, dict] | None:
    """(checkpoint, meta) to resume from: ``latest`` if it verifies, else the newest valid older one
    (with a warning naming what was skipped); None when there are no checkpoints at all."""
    root = Path(root)
    if not root.is_dir():
        return None
    named = latest(root)
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    if named is not None and named not in candidates and named.name.startswith("step_"):
        candidates.insert(0, named)
    elif named is not None and named in candidates:
        candidates.remove(named)
        candidates.insert(0, named)
    problems = []
    for path in candidates:
        try:
            meta = verify(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems and not quiet:
            print(f"warning: skipped {len(problems)} unusable checkpoint(s) and resuming from {path.name}: "
                  + "; ".join(problems), file=sys.stderr)
        return path, meta
    if problems:
        raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(problems)
                              + ". Delete the folder (or run with --fresh) to start over")
    return None


def check_resumable(meta: dict, settings: dict, resumable: frozenset[str], path: Path) -> list[str]:
    """Names of the resumable settings that changed; raises if any other setting changed."""
    saved = meta.get("settings") or {}
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    fixed = [k for k in changed if k not in resumable]
    if fixed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in fixed)
        raise CheckpointError(f"{path} was written with other settings ({diff}); a resumed run must keep them. "
                              f"Only {', '.join(sorted(resumable))} may change on resume. Restore the settings, "
                              "or start over with --fresh (or another --out)")
    return [k for k in changed if k in resumable]


def load(path: Path, *, rank: int, world_size: int, ep_rank: int, ep_size: int, module: torch.nn.Module,
         meta: dict | None = None) -> dict:
    """Verify, restore the module in place, and return this rank's saved state."""
    meta = meta or verify(path)
    if (meta["world_size"], meta["ep_size"]) != (world_size, ep_size):
        raise CheckpointError(
            f"{path} was written by {meta['world_size']} ranks with ep_size={meta['ep_size']}; this run has "
            f"{world_size} ranks with ep_size={ep_size}. Resume with the same layout."
        )
    state = load_file(path / f"model_ep{ep_rank:03d}.pt")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # another architecture, expert count or size
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()][:4]
        raise CheckpointError(f"{path} holds another model than this run builds ({' '.join(lines)[:400]}); "
                              "resume with the same arch, preset, model and router settings, or use --fresh") from None
    return load_file(path / f"rank{rank:05d}.pt")
