"""Several conditioners as one: each reads its own inputs and keeps its own unconditional-dropout rate."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from latentgen.contracts import Conditioner

# Outputs of the same key are joined along this dim (as sgm's GeneralConditioner does): token features
# side by side, vectors end to end, concat maps as extra channels.
_JOIN_DIM = {"crossattn": -1, "vector": -1, "concat": 1}


class ConditionerStack(Conditioner):
    """A list of conditioner configs ({name, **params}, built through the registry) acting as one.

    `context_dim`, `vector_dim` and `concat_channels` may declare the joined widths, so that Hydra
    configs can interpolate them like any conditioner's; declared values are checked, never trusted.
    """

    def __init__(self, conditioners: Sequence[Mapping[str, Any]], context_dim: int | None = None,
                 vector_dim: int | None = None, concat_channels: int | None = None):
        super().__init__()
        from latentgen.pipeline import build_component  # the pipeline module imports conditioners' kinds

        if not conditioners:
            raise ValueError("conditioner 'stack' needs at least one member in `conditioners`")
        self.conditioners = nn.ModuleList(build_component("conditioner", dict(member)) for member in conditioners)
        keys: list[str] = []
        for member in self.conditioners:
            keys += [key for key in member.input_keys if key not in keys]
        self.input_keys = tuple(keys)
        declared = {"crossattn": context_dim, "vector": vector_dim, "concat": concat_channels}
        for key, width in declared.items():
            if width is not None and self.outputs.get(key) != width:
                raise ValueError(f"conditioner 'stack' declares {key} width {width} but its members give "
                                 f"{self.outputs.get(key, 'none')}: fix the declaration or the members")

    @property
    def outputs(self) -> dict[str, int]:
        widths: dict[str, int] = {}
        for member in self.conditioners:
            for key, width in member.outputs.items():
                widths[key] = widths.get(key, 0) + width
        return widths

    def _join(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        joined: dict[str, list[torch.Tensor]] = {}
        for part in parts:
            for key, value in part.items():
                joined.setdefault(key, []).append(value)
        try:
            return {key: values[0] if len(values) == 1 else torch.cat(values, dim=_JOIN_DIM[key])
                    for key, values in joined.items()}
        except RuntimeError as exc:
            raise ValueError(f"conditioner 'stack': members' outputs cannot be joined ({exc}); e.g. crossattn "
                             f"outputs need the same number of tokens") from exc

    def forward(self, batch):
        return self._join([member(batch) for member in self.conditioners])

    def unconditional(self, batch):
        return self._join([member.unconditional(batch) for member in self.conditioners])

    def for_training(self, batch, generator=None):
        return self._join([member.for_training(batch, generator) for member in self.conditioners])

    def member(self, name: str) -> Conditioner | None:
        """The first member registered as `name`, if any."""
        return next((m for m in self.conditioners if getattr(m, "registry_name", None) == name), None)
