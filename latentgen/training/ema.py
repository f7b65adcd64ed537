"""Exponential moving average of a module's weights (Polyak averaging), used for sampling and saving."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps `average` = decay * average + (1 - decay) * module after each `update`.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated by
    the random initialization (the warm-up of Tarvainen and Valpola 2017's mean teacher).
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1); got {decay}")
        self.decay = decay
        self.average = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, current in zip(self.average.state_dict().values(), module.state_dict().values()):
            if average.dtype.is_floating_point:
                average.lerp_(current.detach(), 1 - decay)
            else:
                average.copy_(current)
