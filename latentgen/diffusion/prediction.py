"""Preconditioning that turns an eps-, v- or x0-predicting network into denoise(x, sigma) -> x0_hat.

Karras et al. 2022 (EDM), Eq. 7: D(x, sigma) = c_skip * x + c_out * F(c_in * x, c_noise). With
x = x0 + sigma * noise and the network trained on the variance-preserving input x / sqrt(1 + sigma^2):

- eps (Ho et al. 2020):         c_skip = 1,                 c_out = -sigma
- v   (Salimans and Ho 2022):   c_skip = 1 / (1 + sigma^2), c_out = -sigma / sqrt(1 + sigma^2)
- x0:                           c_skip = 0,                 c_out = 1

and c_noise is the network's own timestep for sigma. One set of samplers then serves all three.
"""

from __future__ import annotations

import abc
from typing import Mapping

import torch

from latentgen.contracts import Denoiser
from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule


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


class DiscreteTimeDenoiser:
    """Wraps a `Denoiser` trained on a discrete noise schedule into the sigma-space contract.

    `wrapper(x, sigma, cond)` returns x0_hat; `training_target(x0, x, sigma)` is what the raw
    network output must equal for that x0, so training and sampling share one set of equations.
    `trained_timesteps` (default: all) restricts training to the least noisy ones.
    """

    def __init__(self, network: Denoiser, schedule: DiscreteNoiseSchedule, prediction_type: str = "eps",
                 trained_timesteps: int | None = None):
        self.network = network
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.scaling = scaling_for(prediction_type)
        # A refiner is trained on the least noisy timesteps only (SDXL's on 200 of 1000).
        self.trained_timesteps = int(trained_timesteps or schedule.num_timesteps)
        if not 1 <= self.trained_timesteps <= schedule.num_timesteps:
            raise ValueError(f"trained_timesteps={trained_timesteps}: must be in 1..{schedule.num_timesteps}")

    def _coefficients(self, x: torch.Tensor, sigma: torch.Tensor):
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma64 = sigma.to(torch.float64)
        c_skip, c_out, c_in = (c.view(-1, *([1] * (x.ndim - 1))) for c in self.scaling(sigma64))
        t = self.schedule.sigma_to_t(sigma64)
        return c_skip, c_out, c_in, t

    def network_output(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        """The raw network output F(c_in * x, t(sigma)) and the coefficients that go with it."""
        c_skip, c_out, c_in, t = self._coefficients(x, sigma)
        dtype = next(self.network.parameters(), x).dtype
        out = self.network((x * c_in.to(x.dtype)).to(dtype), t.to(torch.float32), cond)
        return out.to(x.dtype), c_skip.to(x.dtype), c_out.to(x.dtype)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out, c_skip, c_out = self.network_output(x, sigma, cond)
        return c_skip * x + c_out * out

    def training_target(self, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """F_target with c_skip * x + c_out * F_target = x0 (eps, v or x0 itself)."""
        c_skip, c_out, _, _ = self._coefficients(x, sigma)
        return ((x0 - c_skip.to(x.dtype) * x) / c_out.to(x.dtype))

    @property
    def trained_sigma_max(self) -> float:
        """The largest sigma the network was trained on (a refiner's is far below the schedule's)."""
        return float(self.schedule.sigmas[self.trained_timesteps - 1])

    def sample_training_sigmas(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sigmas of timesteps drawn uniformly from the trained ones, as in DDPM training. (B,) float64."""
        t = torch.randint(0, self.trained_timesteps, (batch_size,), generator=generator)
        return self.schedule.sigmas[t]
