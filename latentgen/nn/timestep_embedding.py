"""Sinusoidal timestep embedding (Vaswani et al. 2017, as used by Ho et al. 2020 and Rombach et al. 2022)."""

from __future__ import annotations

import math

import torch


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (B,) -> (B, dim), float32.

    Same layout as the original LDM `openaimodel.timestep_embedding`: the cosine half first, then
    the sine half, frequencies exp(-log(max_period) * i / half) for i < half, and a zero column
    appended when `dim` is odd. Checkpoints trained with that layout depend on this order.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timestep_embedding: expected timesteps of shape (B,), got {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding
