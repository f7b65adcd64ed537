"""Classifier-free guidance (Ho and Salimans 2022): x0 = uncond + scale * (cond - uncond)."""

from __future__ import annotations

from typing import Callable, Mapping

import torch

Cond = Mapping[str, torch.Tensor]


def concat_cond(first: Cond, second: Cond) -> dict[str, torch.Tensor]:
    """Stack two cond dicts along the batch, so cond and uncond run as one network call."""
    if set(first) != set(second):
        raise ValueError(f"conditional and unconditional inputs have different keys: {sorted(first)} vs {sorted(second)}")
    return {key: torch.cat([first[key], second[key].to(first[key].dtype)]) for key in first}


class ClassifierFreeGuidance:
    """Binds conditioning to a sigma-space model and applies guidance.

    `model(x, sigma, cond) -> x0_hat`; calling the guidance object gives `denoise(x, sigma)`, the
    scheduler contract. With scale 1 or an empty cond (an unconditional model) it makes one pass.
    """

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor], cond: Cond,
                 uncond: Cond | None, scale: float):
        self.model = model
        self.cond = dict(cond)
        self.uncond = dict(uncond) if uncond is not None else None
        self.scale = float(scale)

    @property
    def guided(self) -> bool:
        return self.scale != 1.0 and bool(self.cond) and self.uncond is not None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return self.model(x, sigma, self.cond)
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma_in = torch.cat([sigma.expand(x.shape[0])] * 2)
        uncond, cond = self.model(torch.cat([x, x]), sigma_in, concat_cond(self.uncond, self.cond)).chunk(2)
        return uncond + self.scale * (cond - uncond)
