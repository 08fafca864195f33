"""Outputs that are complete or absent: write beside, rename on success (the one helper for it).

    with atomic_output("outputs/evaluate") as tmp:      # a hidden sibling, .evaluate.tmp-<pid>
        (tmp / "metrics.json").write_text(...)
    # only now is outputs/evaluate replaced; on any error, SIGTERM or Ctrl-C the previous
    # outputs/evaluate is untouched and the temporary is removed

A directory is replaced in two renames (old aside, new in, old deleted); if the process dies between
them the next ``atomic_output`` of that path puts the old one back first. Temporaries left by a
``kill -9`` (their process is gone) are removed the next time the same output is written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from moe_engine.errors import InputError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sweep(path: Path) -> None:
    """Restore an old output a crash left aside, and delete temporaries of dead processes."""
    parent = path.parent
    if not parent.is_dir():
        return
    for marker, restore in ((".tmp-", False), (".old-", True)):
        for leftover in parent.glob(f".{path.name}{marker}*"):
            pid = leftover.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _pid_alive(int(pid)) and int(pid) != os.getpid():
                continue
            if restore and not path.exists():
                leftover.rename(path)
            else:
                _remove(leftover)


def ensure_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """``mkdir -p`` with a readable error (naming the folder) instead of a PermissionError traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the {what} {path}: {exc.strerror or exc}; choose another --out") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"the {what} {path} is not writable; choose another --out or fix its permissions")
    return path


# Every output folder moe-lab publishes holds this file: only such a folder (or an empty one) is
# replaced whole, so ``--out`` naming a folder of the user's own files refuses instead of deleting them.
OUTPUT_MARKER = ".moe-lab-output"
# Folders published before the marker existed: recognised by the file their stage always writes.
_LEGACY_MARKERS = ("metrics.json", "manifest.json", "config.json", "adapter_config.json", "report.html", "index.html")


def _check_replaceable(path: Path) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        raise InputError(f"{path} is a file, not a folder: choose a new folder (or one moe-lab wrote) for --out")
    visible = [p for p in path.iterdir() if not p.name.startswith(".")]  # e.g. the .gitignore DVC writes there
    if visible and not any((path / name).exists() for name in (OUTPUT_MARKER, *_LEGACY_MARKERS)):
        raise InputError(f"{path} exists and holds files moe-lab did not write (it has no {OUTPUT_MARKER}); "
                         "refusing to replace it: choose a new or empty folder for --out, or remove it yourself")


@contextmanager
def atomic_output(path: str | Path, *, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (a directory, or a file path when ``directory=False``);
    it replaces ``path`` only when the block finishes without an exception. A directory output may
    replace only an empty folder or one moe-lab wrote (``OUTPUT_MARKER``); anything else is an
    ``InputError`` before any work."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    _sweep(path)
    if directory:
        _check_replaceable(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory:
            (tmp / OUTPUT_MARKER).write_text("written by moe-lab: the next run with this output replaces the whole folder\n")
        publish(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def publish(tmp: Path, path: Path) -> None:
    """Move a finished temporary into place, replacing ``path``."""
    if path.is_dir() and not path.is_symlink():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        _remove(old)
        path.rename(old)
        tmp.rename(path)
        _remove(old)
    else:
        os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> Path:
    """Write a file atomically (a reader sees the old content or the new, never half)."""
    with atomic_output(path, directory=False) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Inside the block SIGTERM raises SystemExit(143) in the main thread, so ``atomic_output`` and
    every ``finally`` clean up as they do for Ctrl-C (a scheduler stopping a run sends SIGTERM)."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
