"""The eps / v / x0 parameterisations of the discrete (DDPM) process as Karras et al.'s coefficients (EDM,
Eq. 7): with x = x0 + sigma * noise and the network fed the variance-preserving x / sqrt(1 + sigma^2),

- eps (Ho et al. 2020):         c_skip = 1,                 c_out = -sigma
- v   (Salimans and Ho 2022):   c_skip = 1 / (1 + sigma^2), c_out = -sigma / sqrt(1 + sigma^2)
- x0:                           c_skip = 0,                 c_out = 1
"""

from __future__ import annotations

import abc

import torch


class Scaling(abc.ABC):
    """(c_skip, c_out, c_in) for a sigma, each shaped like it."""

    @abc.abstractmethod
    def skip_and_out(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) for the prediction type."""

    def __call__(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c_skip, c_out = self.skip_and_out(sigma)
        c_in = (sigma**2 + 1).rsqrt()
        return c_skip, c_out, c_in


class EpsScaling(Scaling):
    """The network predicts the added noise."""

    def skip_and_out(self, sigma):
        return torch.ones_like(sigma), -sigma


class VScaling(Scaling):
    """The network predicts v = alpha * noise - sigma_vp * x0."""

    def skip_and_out(self, sigma):
        return 1 / (sigma**2 + 1), -sigma * (sigma**2 + 1).rsqrt()


class X0Scaling(Scaling):
    """The network predicts the clean sample itself."""

    def skip_and_out(self, sigma):
        return torch.zeros_like(sigma), torch.ones_like(sigma)


PREDICTION_TYPES: dict[str, type[Scaling]] = {"eps": EpsScaling, "v": VScaling, "x0": X0Scaling}


def scaling_for(prediction_type: str) -> Scaling:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type '{prediction_type}'; choose one of {sorted(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[prediction_type]()
