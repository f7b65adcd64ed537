"""Checkpoint format contract: a file (or folder) layout that holds a whole pipeline."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from latentgen.pipeline import LatentDiffusionPipeline


class CheckpointFormat(abc.ABC):
    """Reads (and usually writes) pipelines in one layout: latentgen's own file, an original Stable
    Diffusion single file, or whatever a plugin adds.

    `LatentDiffusionPipeline.from_checkpoint(path)` asks every registered format's `sniff` and loads
    with the one that says yes; `pipeline.save(path, format=name)` writes with the named one. The
    class docstring's first line says which files it reads (`latentgen plugins` and the error for a file
    no format reads show it). Subclasses implement `sniff` and `load`, `save` if they can write, and `config`
if they can tell a file's pipeline config from its header;
    `suffixes` names the file extensions it reads, the first being what it writes (for tools and tests:
    `sniff` decides).
    """

    suffixes: tuple[str, ...] = ()

    @abc.abstractmethod
    def sniff(self, path: Path) -> bool:
        """True if this format reads `path`. Cheap (a header, a folder listing) and never raising for a
        file of another format."""

    @abc.abstractmethod
    def load(self, path: Path, **options: Any) -> "LatentDiffusionPipeline":
        """The pipeline stored at `path`; options: `device`, `dtype`, and the format's own."""

    def config(self, path: Path, **options: Any) -> dict[str, Any] | None:
        """The pipeline config `path` holds (what `LatentDiffusionPipeline.from_config` takes), read from its
        header alone, so that a request can be checked against the model before any weight is read; None
        where the format cannot tell cheaply (the default). Takes `load`'s options and ignores those it
        does not need."""
        return None

    def save(self, pipeline: "LatentDiffusionPipeline", path: Path, **options: Any) -> Path:
        """Write `pipeline` to `path` (atomically: a failed write leaves an existing file intact); the
        path written. A format that cannot write, or cannot hold this pipeline, says so by name."""
        from latentgen.errors import CheckpointError

        raise CheckpointError(f"format '{self.name}' reads checkpoints but cannot write them; save with "
                              f"format='latentgen' (or another format that writes)")

    @property
    def name(self) -> str:
        return getattr(self, "registry_name", type(self).__name__)

    @property
    def summary(self) -> str:
        """The first line of the class docstring: which files this format reads."""
        return ((type(self).__doc__ or "").strip().splitlines() or [""])[0]
