"""Sigma grids for sampling: the model's own timesteps, Karras et al.'s, or evenly spaced in log sigma.

Every grid is descending, float64, and ends in 0 (the clean sample).
"""

from __future__ import annotations

import math

import torch

from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (EDM), Eq. 5: evenly spaced in sigma^(1/rho); rho = 7 spends steps at low noise."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((high + ramp * (low - high)) ** rho)


def exponential(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log sigma (the step DPM-Solver takes in its time variable lambda = -log sigma)."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp())


GRIDS = ("discrete", "karras", "exponential")


def sigma_grid(schedule: DiscreteNoiseSchedule, steps: int, grid: str = "discrete", spacing: str = "leading",
               rho: float = 7.0) -> torch.Tensor:
    """`steps` noise levels for a model trained on `schedule`, then 0.

    "discrete" takes the model's own timesteps with `spacing` (leading / trailing / linspace); "karras"
    and "exponential" span the schedule's [sigma_min, sigma_max] continuously (the wrapper
    interpolates the timestep between training levels).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if grid == "discrete":
        return schedule.sigma_grid(steps, spacing)
    if grid == "karras":
        return karras(steps, schedule.sigma_min, schedule.sigma_max, rho)
    if grid == "exponential":
        return exponential(steps, schedule.sigma_min, schedule.sigma_max)
    raise ValueError(f"unknown sigma grid '{grid}'; choose one of {GRIDS}")
