"""Owning a run directory: one process writes into it, and a finished result in it is kept unless asked.

The directory must be writable, no other process may hold it, and a result already in it is kept unless
the command says overwrite=true (the apps check all this before Hydra writes anything: latentgen.cli.preflight).
The hold is an exclusive `flock` on the directory itself: it writes nothing, and the kernel drops it when
the process ends, however it ends, so a killed run never leaves it stuck.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Sequence

from latentgen.errors import ConfigError

_held: dict[Path, int] = {}  # run directory -> open descriptor holding its lock (until `release_all`)


def writable(path: Path) -> None:
    """Refuse a run directory that cannot be created or written (read-only, another user's)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"hydra.run.dir={path}: '{existing}' is a file, not a directory; choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"hydra.run.dir={path}: '{existing}' is not writable (read-only, or another user's); "
                          f"choose a directory you may write to")


def claim(path: Path) -> None:
    """Hold `path` (created if need be) for this process, or refuse because another process holds it."""
    writable(path)
    key = path.resolve()
    if key in _held:
        return
    path.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise ConfigError(f"'{path}' is in use: another latentgen process is writing into it. Wait for it to end, "
                          f"or choose another directory (hydra.run.dir=<dir>)") from None
    _held[key] = descriptor


@contextlib.contextmanager
def holding(path: Path):
    """Hold `path` for the block (the Python API's training run); a hold the app took already stays."""
    held = path.resolve() in _held
    claim(path)
    try:
        yield
    finally:
        if not held:
            os.close(_held.pop(path.resolve()))


def release_all() -> None:
    """Let go of every run directory this process holds (the apps do this on the way out)."""
    for descriptor in _held.values():
        os.close(descriptor)
    _held.clear()


def refuse_finished(path: Path, results: Sequence[str], overwrite: bool, what: str) -> None:
    """Keep a finished result: refuse unless the command says overwrite=true."""
    found = [name for name in results if (path / name).exists()]
    if found and not overwrite:
        raise ConfigError(f"'{path}' already holds a finished {what} ({found[0]}); it is kept. Pass overwrite=true "
                          f"to replace it, or choose another directory (hydra.run.dir=<dir>)")


def clear(path: Path, names: Sequence[str]) -> None:
    """Remove what an earlier run left under these names (files or folders) in an accepted run directory."""
    for name in names:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
