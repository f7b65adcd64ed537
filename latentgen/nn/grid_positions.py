"""Where each token of a feature map lies, for attention layers that would otherwise not know it.

A convolutional UNet can only infer position from its zero padding, which a small model learns slowly; a prompt
that binds attributes to places ("a red circle left of a blue star") needs every query of the cross-attention
to know which half it is in. The features are Fourier features of the token's centre in fractions of the map
(Tancik et al. 2020), so the same place gets the same features at any resolution, projected by a zero-initialised
linear layer: a model built with them starts exactly as one without.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GridPositions(nn.Module):
    """(h, w) -> (h * w, dim) position embeddings, row-major like `x.flatten(2)`.

    `frequencies` per axis, geometric from 1/2 to `max_cycles` cycles across the map (the lowest tells the halves
    apart, the highest resolves single tokens of a 2 * max_cycles map); sine and cosine of each.
    """

    def __init__(self, dim: int, frequencies: int = 8, max_cycles: float = 16.0) -> None:
        super().__init__()
        if frequencies < 1 or max_cycles <= 0.5:
            raise ValueError(f"GridPositions needs frequencies >= 1 and max_cycles > 0.5; got {frequencies}, "
                             f"{max_cycles}")
        cycles = torch.logspace(math.log10(0.5), math.log10(max_cycles), frequencies) if frequencies > 1 \
            else torch.tensor([0.5])
        self.register_buffer("angular", 2 * math.pi * cycles, persistent=False)  # (F,)
        self.proj = nn.Linear(4 * frequencies, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def features(self, height: int, width: int) -> torch.Tensor:
        """(h * w, 4F) sines and cosines of the token centres, (i + 0.5) / size along each axis."""
        device = self.angular.device
        ys = (torch.arange(height, device=device) + 0.5) / height
        xs = (torch.arange(width, device=device) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
        angular = self.angular.float()  # float32 even in a bf16 model: the angles reach 2 pi * max_cycles
        angles = torch.cat([grid_x.reshape(-1, 1) * angular, grid_y.reshape(-1, 1) * angular], dim=1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (h * w, 4F)

    def forward(self, height: int, width: int) -> torch.Tensor:
        features = self.features(height, width).to(self.proj.weight.dtype)
        return self.proj(features)  # (h * w, dim)
