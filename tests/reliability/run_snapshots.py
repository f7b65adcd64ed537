"""What the bad-input tests compare before and after a refused run: an existing run directory and a snapshot of
its files. (A module of its own: a test module importing `conftest` would get whichever conftest.py was
imported last.)"""

from __future__ import annotations

import hashlib
from pathlib import Path


def existing_run(path: Path) -> Path:
    """A run directory with an earlier job's record and files in it (what a refused start must not touch)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text("earlier: job\n")
    (path / "notes.txt").write_text("kept\n")
    return path


def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` (hidden ones too) with its content's hash."""
    return {str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
            for file in sorted(path.rglob("*")) if file.is_file()}
