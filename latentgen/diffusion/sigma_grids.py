"""Sigma grids for sampling: the model's own timesteps, Karras et al.'s, evenly spaced in log sigma, or the
timesteps a latent consistency model was distilled on.

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


def lcm_timesteps(schedule: DiscreteNoiseSchedule, steps: int, origin_steps: int = 50) -> torch.Tensor:
    """`steps` descending integer timesteps out of a latent consistency model's distillation grid.

    Luo et al. 2023 ("Latent Consistency Models", skipping-step k of their distillation) distil on `origin_steps`
    evenly skipped timesteps: with k = T // origin_steps, the timesteps k - 1, 2k - 1, ..., origin_steps * k - 1
    (999 for T = 1000). Sampling takes `steps` of them, from the noisiest down, at the indices
    floor(i * origin_steps / steps), i = 0..steps-1, of that grid listed noisiest first (the rule of the
    reference LCM scheduler, diffusers' LCMScheduler.set_timesteps: floor of
    linspace(0, origin_steps, steps, endpoint=False), computed the same way in float64). For 4 steps on
    Stable Diffusion's 1000: 999, 759, 499, 259.
    """
    T = schedule.num_timesteps
    if not isinstance(origin_steps, int) or isinstance(origin_steps, bool) or not 1 <= origin_steps <= T:
        raise ValueError(f"origin_steps must be an integer in 1..{T} (the model's training timesteps): the size of "
                         f"the grid the consistency model was distilled on (50 for LCM); got {origin_steps!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if steps > origin_steps:
        raise ValueError(f"the lcm grid takes its steps out of the {origin_steps} timesteps the model was distilled "
                         f"on (origin_steps={origin_steps}); steps={steps} is more than that")
    skip = T // origin_steps
    origin = torch.arange(origin_steps, 0, -1, dtype=torch.long) * skip - 1  # noisiest first
    indices = (torch.arange(steps, dtype=torch.float64) * (origin_steps / steps)).floor().long()
    return origin[indices]


def lcm(schedule: DiscreteNoiseSchedule, steps: int, origin_steps: int = 50) -> torch.Tensor:
    """The sigmas of `lcm_timesteps`, then 0."""
    return _append_zero(schedule.sigmas[lcm_timesteps(schedule, steps, origin_steps)])


GRIDS = ("discrete", "karras", "exponential", "lcm")


def sigma_grid(schedule: DiscreteNoiseSchedule, steps: int, grid: str = "discrete", spacing: str = "leading",
               rho: float = 7.0, origin_steps: int = 50) -> torch.Tensor:
    """`steps` noise levels for a model trained on `schedule`, then 0.

    "discrete" takes the model's own timesteps with `spacing` (leading / trailing / linspace); "karras"
    and "exponential" span the schedule's [sigma_min, sigma_max] continuously (the wrapper
    interpolates the timestep between training levels); "lcm" takes `steps` of the `origin_steps`
    timesteps a latent consistency model was distilled on (`lcm_timesteps`).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if grid == "discrete":
        return schedule.sigma_grid(steps, spacing)
    if grid == "karras":
        return karras(steps, schedule.sigma_min, schedule.sigma_max, rho)
    if grid == "exponential":
        return exponential(steps, schedule.sigma_min, schedule.sigma_max)
    if grid == "lcm":
        return lcm(schedule, steps, origin_steps)
    raise ValueError(f"unknown sigma grid '{grid}'; choose one of {GRIDS}")
