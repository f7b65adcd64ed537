"""Adapter contract: something attached to an assembled pipeline that changes what its components
compute, reversibly (LoRA, ControlNet, textual-inversion embeddings, ...)."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Mapping

import torch

if TYPE_CHECKING:
    from latentgen.pipeline import LatentDiffusionPipeline


class Adapter(abc.ABC):
    """Changes a pipeline's computation while attached, and undoes the change exactly when detached.

    `pipeline.attach(adapter)` calls `check(pipeline)` (raise `AdapterError` naming both sides if the adapter
    cannot apply; nothing may change yet) and then `apply(pipeline)`; `pipeline.detach(adapter)` calls
    `remove(pipeline)`, after which the pipeline computes exactly what it computed before `apply`. If `apply`
    raises, the pipeline calls `remove`, so `apply` records each change as it makes it and `remove` undoes
    what was recorded: nothing stays attached half. Subclasses implement `apply` and `remove`.

    An adapter that reads request inputs (a ControlNet's control image) lists their keys in `input_keys`:
    the pipeline hands it those `conditioning=` values in `conditioning`, and puts what it returns into the
    denoiser's cond (conditional and unconditional side).
    """

    input_keys: tuple[str, ...] = ()

    def check(self, pipeline: "LatentDiffusionPipeline") -> None:
        """Raise `latentgen.errors.AdapterError` if this adapter cannot apply to `pipeline` (default: it can)."""

    @abc.abstractmethod
    def apply(self, pipeline: "LatentDiffusionPipeline") -> None:
        """Change the pipeline's components (in place, hooks, extra inputs), recording each change."""

    @abc.abstractmethod
    def remove(self, pipeline: "LatentDiffusionPipeline") -> None:
        """Undo what `apply` recorded, exactly; a no-op for what it did not get to."""

    def conditioning(self, inputs: Mapping[str, Any], *, batch_size: int, image_size: tuple[int, int],
                     sigmas: torch.Tensor, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(cond, uncond) entries for the denoiser from this adapter's `input_keys` values in `inputs` (each
        key present), for `batch_size` images of `image_size` (H, W) sampled over the grid `sigmas` (descending,
        ending in 0). Default: none."""
        return {}, {}

    def describe(self) -> dict[str, Any]:
        """What a sample's record stores about this adapter: its registered name and options."""
        return {"name": self.name}

    @property
    def name(self) -> str:
        return getattr(self, "registry_name", type(self).__name__)

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.describe().items() if key != "name")
        return f"{self.name}({options})"
