"""Several conditioners' tokens one after another: SD3's joint context (Esser et al. 2024, Sec. 5.2.1).

SD3 puts CLIP-L and CLIP-G side by side (768 + 1280 features), zero-pads them to T5's 4096 features and
appends T5's tokens after them: 77 + 77 tokens of width 4096. A `stack` does the side by side; this does the
one after another, so SD3's text encoder is `sequence_stack[stack[clip_l, clip_g], t5_text]`, with no
SD3-specific code.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from latentgen.conditioners.stack import ConditionerStack
from latentgen.contracts import Conditioner


class SequenceStack(ConditionerStack):
    """Members' "crossattn" tokens concatenated along the sequence, each zero-padded on the feature axis to
    `context_dim` (default: the widest member's); their "vector" outputs end to end. Members giving other
    keys ("concat" maps) are refused: they have no sequence to extend. Building, inputs and the CFG and
    training paths are the `stack`'s; only the join differs."""

    def __init__(self, conditioners: Sequence[Mapping[str, Any]], context_dim: int | None = None):
        super().__init__(conditioners)
        for member in self.conditioners:
            other = sorted(set(member.outputs) - {"crossattn", "vector"})
            if other:
                raise ValueError(f"conditioner 'sequence_stack': member '{member.name}' gives {other}, which has no "
                                 f"token sequence to join; put it beside this one in a `stack`")
        widths = [member.outputs["crossattn"] for member in self.conditioners if "crossattn" in member.outputs]
        if not widths:
            raise ValueError("conditioner 'sequence_stack': no member gives 'crossattn' tokens to join")
        widest = max(widths)
        if context_dim is not None and int(context_dim) < widest:
            raise ValueError(f"conditioner 'sequence_stack': context_dim {context_dim} is narrower than a member's "
                             f"tokens ({widest} features); pass context_dim >= {widest} or leave it out")
        self.context_dim = widest if context_dim is None else int(context_dim)

    @property
    def outputs(self) -> dict[str, int]:
        widths = {"crossattn": self.context_dim}
        vector = sum(member.outputs.get("vector", 0) for member in self.conditioners)
        if vector:
            widths["vector"] = vector
        return widths

    def _join(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        tokens = [F.pad(part["crossattn"], (0, self.context_dim - part["crossattn"].shape[-1]))
                  for part in parts if "crossattn" in part]
        joined = {"crossattn": torch.cat([t.to(tokens[0].dtype) for t in tokens], dim=1)}
        vectors = [part["vector"] for part in parts if "vector" in part]
        if vectors:
            joined["vector"] = torch.cat(vectors, dim=-1)
        return joined

    def reader_of(self, input_key: str) -> str:
        return next((member.reader_of(input_key) for member in self.conditioners if input_key in member.input_keys),
                    self.name)

    def member(self, name: str) -> Conditioner | None:
        """The first member (or a stack's member) registered as `name`, if any."""
        for member in self.conditioners:
            if getattr(member, "registry_name", None) == name:
                return member
            inner = getattr(member, "member", None)
            found = inner(name) if callable(inner) else None
            if found is not None:
                return found
        return None
