"""Exponential moving average of a module's weights (Polyak averaging), used for sampling and saving."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def warmup_decay(decay: float, updates: int) -> float:
    """min(decay, (1 + n) / (10 + n)) after the n-th update: early averages forget the random
    initialization quickly (the warm-up of Tarvainen and Valpola 2017's mean teacher), and the decay
    reaches `decay` after about 9 / (1 - decay) updates (0.999: ~9000)."""
    return min(decay, (1 + updates) / (10 + updates))


class EMA:
    """Keeps `average` = d * average + (1 - d) * module after each `update`, d = warmup_decay(decay, n)."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1); got {decay}")
        self.decay = decay
        self.average = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = warmup_decay(self.decay, self.updates)
        for average, current in zip(self.average.state_dict().values(), module.state_dict().values()):
            if average.dtype.is_floating_point:
                average.lerp_(current.detach(), 1 - decay)
            else:
                average.copy_(current)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "average": self.average.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.average.load_state_dict(state["average"])
