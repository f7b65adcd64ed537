"""Making untrained models informative for tests."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fill_zero_parameters(module: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Give every all-zero parameter small random values.

    Denoisers zero-initialize their output layers (the LDM UNet, adaLN-Zero DiTs), so an untrained one
    outputs zeros whatever its conditioning, and a test comparing two conditions would pass vacuously.
    """
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        if not parameter.any():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module
