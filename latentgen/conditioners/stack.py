"""Several conditioners as one: each reads its own inputs and keeps its own unconditional-dropout rate."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from latentgen.assembly import build_component
from latentgen.contracts import Conditioner
from latentgen.contracts.cond_keys import COND_KEYS, cond_key


class ConditionerStack(Conditioner):
    """A list of conditioner configs ({name, **params}, built through the registry) acting as one.

    Outputs of the same key are joined as the key's row of `latentgen.contracts.cond_keys` says (as sgm's
    GeneralConditioner does: token features side by side, vectors end to end, maps as extra channels).
    `context_dim`, `vector_dim` and `concat_channels` may declare the joined widths, so that Hydra
    configs can interpolate them like any conditioner's; declared values are checked, never trusted.
    """

    def __init__(self, conditioners: Sequence[Mapping[str, Any]], **widths: int | None):
        super().__init__()
        if not conditioners:
            raise ValueError("conditioner 'stack' needs at least one member in `conditioners`")
        self.conditioners = nn.ModuleList(build_component("conditioner", dict(member)) for member in conditioners)
        keys: list[str] = []
        for member in self.conditioners:
            keys += [key for key in member.input_keys if key not in keys]
        self.input_keys = tuple(keys)
        attributes = {key.width_attribute: key for key in COND_KEYS.values()}
        unknown = sorted(set(widths) - set(attributes))
        if unknown:
            raise ValueError(f"conditioner 'stack' takes `conditioners` and the joined widths {sorted(attributes)}; "
                             f"got {unknown}")
        for attribute, width in widths.items():
            key = attributes[attribute]
            if width is not None and self.outputs.get(key.name) != width:
                raise ValueError(f"conditioner 'stack' declares {key.name} width {width} but its members give "
                                 f"{self.outputs.get(key.name, 'none')}: fix the declaration or the members")

    @property
    def outputs(self) -> dict[str, int]:
        widths: dict[str, int] = {}
        for member in self.conditioners:
            for key, width in member.outputs.items():
                adds_up = key in COND_KEYS and COND_KEYS[key].joins_widths
                widths[key] = widths.get(key, 0) + width if adds_up else width
        return widths

    def _join(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        joined: dict[str, list[torch.Tensor]] = {}
        for part in parts:
            for key, value in part.items():
                joined.setdefault(key, []).append(value)
        try:
            return {key: values[0] if len(values) == 1 else torch.cat(values, dim=cond_key(key).join_dim)
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

    def reader_of(self, input_key: str) -> str:
        return next((member.name for member in self.conditioners if input_key in member.input_keys), self.name)

    def member(self, name: str) -> Conditioner | None:
        """The first member registered as `name`, if any."""
        return next((m for m in self.conditioners if getattr(m, "registry_name", None) == name), None)
