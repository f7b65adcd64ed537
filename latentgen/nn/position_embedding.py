"""Fixed 2-D sine-cosine position embedding of a token grid (Vaswani et al. 2017; as in MAE and DiT)."""

from __future__ import annotations

import torch


def _sincos_1d(positions: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """positions (N,) float64 -> (N, dim): sin(pos * w_i) then cos(pos * w_i), w_i = max_period^(-i / (dim / 2))."""
    frequencies = max_period ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions[:, None] * frequencies[None]  # (N, dim / 2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_position_embedding_2d(grid_height: int, grid_width: int, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(grid_height * grid_width, dim) float32 for tokens in row-major order; dim divisible by 4.

    The first half of each vector encodes the column, the second half the row, each as a 1-D
    sin-cos embedding: the layout of MAE's `get_2d_sincos_pos_embed`, which DiT uses, so a DiT trained
    with it sees the same embedding here. Computed in float64 on the CPU (float64 is not on every
    accelerator) for the actual grid, so any latent size works; the caller moves it to its device.
    """
    if dim % 4:
        raise ValueError(f"sincos_position_embedding_2d: dim must be a multiple of 4, got {dim}")
    rows = torch.arange(grid_height, dtype=torch.float64)
    columns = torch.arange(grid_width, dtype=torch.float64)
    row, column = torch.meshgrid(rows, columns, indexing="ij")  # (gh, gw) each
    embedding = torch.cat([_sincos_1d(column.reshape(-1), dim // 2, max_period),
                           _sincos_1d(row.reshape(-1), dim // 2, max_period)], dim=1)  # (gh * gw, dim)
    return embedding.float()
