"""Validating a denoiser's forward inputs against what it declares (the Denoiser contract's attributes)."""

from __future__ import annotations

from typing import Mapping

import torch

from latentgen.contracts import Denoiser
from latentgen.contracts.cond_keys import COND_KEYS


def _format(shape: tuple) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ")"


def check_denoiser_inputs(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor | float,
                          cond: Mapping[str, torch.Tensor], size_reason: str) -> torch.Tensor:
    """Raise ValueError naming the denoiser and the expected shape unless x (B, latent_channels, h, w),
    h and w multiples of `latent_size_multiple` (`size_reason` says why), and every required cond key
    (shapes from `latentgen.contracts.cond_keys`) fit; returns t broadcast to (B,)."""
    latent_channels = denoiser.latent_channels
    if x.ndim != 4 or x.shape[1] != latent_channels:
        raise ValueError(f"{denoiser.name}: expected x of shape (B, {latent_channels}, h, w), got {tuple(x.shape)}")
    batch, _, height, width = x.shape
    multiple = denoiser.latent_size_multiple
    if height % multiple or width % multiple:
        raise ValueError(f"{denoiser.name}: expected latent height and width that are multiples of {multiple} "
                         f"({size_reason}), got {height}x{width}")
    for key, key_width in denoiser.required_cond.items():
        shape = COND_KEYS[key].expected_shape(batch, key_width, (height, width))
        if key not in cond:
            raise ValueError(f"{denoiser.name}: cond[{key!r}] of shape {_format(shape)} is required, "
                             f"got keys {sorted(cond)}")
        value = cond[key]
        matches = value.ndim == len(shape) and all(want == "L" or got == want for got, want in zip(value.shape, shape))
        if not matches:
            raise ValueError(f"{denoiser.name}: expected cond[{key!r}] of shape {_format(shape)}, "
                             f"got {tuple(value.shape)}")
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
        return t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{denoiser.name}: expected t of shape () or ({batch},), got {tuple(t.shape)}")
    return t
