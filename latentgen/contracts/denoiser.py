"""Denoiser contract: the network trained in latent space, and what conditioning it needs."""

from __future__ import annotations

import abc
from typing import Mapping

import torch
from torch import nn


class Denoiser(nn.Module, abc.ABC):
    """A network F(x, t, cond) trained to reverse the noising process in latent space.

    Subclasses set in `__init__` what they expect, so that a pipeline can refuse an incompatible
    assembly before any computation:

    - `in_channels`: channels of x *plus* `concat_channels` (concatenated inside `forward`);
    - `out_channels`: channels of the raw output (the latent channels for eps/v/x0 prediction);
    - `context_dim`: width D of `cond["crossattn"]` (B, L, D), or None if there is no cross-attention;
    - `vector_dim`: width of `cond["vector"]` (B, D), or None;
    - `concat_channels`: channels of `cond["concat"]` (B, C, H, W), 0 if none;
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
        """Raw network output for x (B, C, h, w) at noise level t (B,), with `cond` keyed by
        "crossattn" (B, L, D), "vector" (B, D) and/or "concat" (B, C', h, w)."""

    @property
    def name(self) -> str:
        return getattr(self, "registry_name", type(self).__name__)

    @property
    def latent_channels(self) -> int:
        """Channels of the noisy latent itself (input channels not taken by concat conditioning)."""
        return self.in_channels - self.concat_channels

    @property
    def required_cond(self) -> dict[str, int]:
        """The cond keys `forward` needs, each with its width (channels for "concat")."""
        required = {}
        if self.context_dim is not None:
            required["crossattn"] = int(self.context_dim)
        if self.vector_dim is not None:
            required["vector"] = int(self.vector_dim)
        if self.concat_channels:
            required["concat"] = int(self.concat_channels)
        return required
