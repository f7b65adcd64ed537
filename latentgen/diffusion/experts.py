"""Two denoisers sharing one sampling run, split by noise level: the high-noise expert above a switch sigma,
the low-noise one at and below it. This is how SDXL's base hands its latents to the refiner (Podell et al.
2023, Sec. 2.5), and eDiff-I's ensemble of expert denoisers (Balaji et al. 2022) in its simplest form.

Splitting the denoiser rather than the grid keeps one scheduler run over the whole grid: every scheduler
works unchanged (its contract is a grid ending in 0), multistep history carries over the switch, and a
Heun-type corrector is evaluated by whichever model owns its noise level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from latentgen.contracts.scheduler import DenoiseFn

if TYPE_CHECKING:
    from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule

# Grid sigmas reach a denoiser as float32; neighbouring grid points differ by far more than this.
_SAME = 1e-5


class NoiseLevelExperts:
    """denoise(x, sigma): `high(x, sigma)` for sigma above `switch`, else `low(x, sigma)`."""

    def __init__(self, high: DenoiseFn, low: DenoiseFn, switch: float):
        self.high, self.low, self.switch = high, low, float(switch)

    @property
    def noise_schedule(self) -> DiscreteNoiseSchedule | None:
        """The high-noise expert's discrete noise schedule, or None (the optional `denoise.noise_schedule`
        protocol): the grid starts in its noise levels, so timestep-based samplers (lcm, tcd) use its timesteps."""
        return getattr(self.high, "noise_schedule", None)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        above = torch.as_tensor(sigma).double().flatten() > self.switch * (1 + _SAME)
        if bool(above.all()):
            return self.high(x, sigma)
        if not bool(above.any()):
            return self.low(x, sigma)
        # per-sample sigmas on both sides of the switch: each sample from its own expert
        chosen = above.to(x.device).view(-1, *([1] * (x.ndim - 1)))
        return torch.where(chosen, self.high(x, sigma), self.low(x, sigma))


def switch_index(steps: int, fraction: float) -> int:
    """The grid index where the low-noise expert takes over: after round(fraction * steps) steps."""
    return round(fraction * steps)


def first_index_within(grid: torch.Tensor, sigma_max: float) -> int:
    """The first index of a descending grid whose sigma is at most `sigma_max` (up to float32 rounding)."""
    within = (grid.double() <= sigma_max * (1 + _SAME)).nonzero()
    return int(within[0]) if len(within) else len(grid) - 1
