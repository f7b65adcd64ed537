"""Zeros in place of a text encoder that was left out."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from latentgen.contracts import Conditioner
from latentgen.errors import ConfigError


class ZeroTokens(Conditioner):
    """Zeros "crossattn" (B, tokens, width) in place of a text encoder that was left out, as SD3 pipelines do
    for T5 when it is not loaded (diffusers' StableDiffusion3Pipeline: 77 tokens of zeros at width 4096): the
    joint context keeps its length and layout without the 4.7-billion-parameter encoder. The same zeros are
    the unconditional output.

    It has no weights; an empty buffer carries the device and dtype that `.to(...)` gives it (float32 by
    default), which the zeros take. B is the number of items under `input_key`.
    """

    constant = True  # the same zeros whatever the prompt (the contract suite does not ask it to tell them apart)

    def __init__(self, width: int = 4096, tokens: int = 77, input_key: str = "prompt"):
        super().__init__()
        for option, value in (("width", width), ("tokens", tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"conditioner 'zero_tokens': {option} must be a positive integer; got {value!r}")
        if not isinstance(input_key, str) or not input_key:
            raise ConfigError(f"conditioner 'zero_tokens': input_key must be a non-empty string; got {input_key!r}")
        self.width, self.tokens = width, tokens
        self.input_keys = (input_key,)
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # device and dtype only; no state

    @property
    def outputs(self) -> dict[str, int]:
        return {"crossattn": self.width}

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        self.check_inputs(batch)
        items = batch[self.input_keys[0]]
        count = 1 if isinstance(items, str) else len(items)
        return {"crossattn": self.anchor.new_zeros(count, self.tokens, self.width)}

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.forward(batch)

    def extra_repr(self) -> str:
        return f"tokens={self.tokens}, width={self.width}"
