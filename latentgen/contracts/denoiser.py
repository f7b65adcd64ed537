"""Denoiser contract: the network trained in latent space, and what conditioning it needs."""

from __future__ import annotations

import abc
from typing import Mapping

import torch
from torch import nn

from latentgen.contracts.cond_keys import COND_KEYS, declared_width


class Denoiser(nn.Module, abc.ABC):
    """A network F(x, t, cond) trained to reverse the noising process in latent space.

    Subclasses set in `__init__` what they expect, so that a pipeline can refuse an incompatible
    assembly before any computation:

    - `in_channels`: channels of x *plus* `concat_channels` (concatenated inside `forward`);
    - `out_channels`: channels of the raw output (the latent channels for eps/v/x0 prediction);
    - for each conditioning key it reads, that key's width attribute (the table in
      `latentgen.contracts.cond_keys`): `context_dim` for `cond["crossattn"]` (B, L, D), `vector_dim`
      for `cond["vector"]` (B, D), `concat_channels` for `cond["concat"]` (B, C, H, W); None (0 for
      concat) when it does not read the key;
    - `latent_size_multiple`: latent height and width must be multiples of this (UNet levels).
    """

    in_channels: int
    out_channels: int
    context_dim: int | None = None
    vector_dim: int | None = None
    concat_channels: int = 0
    latent_size_multiple: int = 1

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Raw network output for x (B, C, h, w) at noise level t (B,), with `cond` holding the keys of
        `required_cond` (shapes in `latentgen.contracts.cond_keys`)."""

    @property
    def name(self) -> str:
        return getattr(self, "registry_name", type(self).__name__)

    @property
    def latent_channels(self) -> int:
        """Channels of the noisy latent itself (input channels not taken by concatenated conditioning)."""
        return self.in_channels - sum(width for key, width in self.required_cond.items()
                                      if COND_KEYS[key].in_input_channels)

    @property
    def required_cond(self) -> dict[str, int]:
        """The cond keys `forward` needs, each with its declared width (channels for "concat")."""
        widths = {key.name: declared_width(self, key) for key in COND_KEYS.values()}
        return {name: width for name, width in widths.items() if width is not None}
