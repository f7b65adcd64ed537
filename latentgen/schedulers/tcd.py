"""Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, "Trajectory
Consistency Distillation", its strategic stochastic sampling with parameter gamma), in sigma space.

From sigma_i: x0 = denoise(x, sigma_i) and eps = (x - x0) / sigma_i; a deterministic (DDIM) move to
sigma_mid, the noise level of training timestep s = floor((1 - gamma) * t(sigma_next)); then forward noise
from sigma_mid up to sigma_next:

    x_mid = x0 + sigma_mid * eps,    x = x_mid + sqrt(sigma_next^2 - sigma_mid^2) * z.

In the variance-preserving form of the paper the re-noising is x_t' = sqrt(abar_t' / abar_s) x_s +
sqrt(1 - abar_t' / abar_s) z; divided by sqrt(abar_t') (with 1 / abar = 1 + sigma^2) it is exactly the line
above. gamma = 0 is DDIM (deterministic, eta 0); gamma = 1 moves to timestep 0 and re-noises from there, LCM's
re-noising up to timestep 0's small sigma (0.029 for Stable Diffusion).

Timesteps come from `denoise.noise_schedule` when the denoiser exposes one (the pipeline's does), else from
Stable Diffusion's schedule (scaled_linear, beta 0.00085..0.012, 1000 steps), on which every published TCD
model was distilled (`latentgen.schedulers.discrete_timesteps`). The last step (to sigma 0) returns x0, as
every latentgen sampler does; diffusers' TCDScheduler instead stops at timestep 0's noise level.
"""

from __future__ import annotations

import math

import torch

from latentgen.contracts import Scheduler
from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule
from latentgen.schedulers.discrete_timesteps import noise_schedule_of

# A grid sigma maps back to its integer timestep within float64 rounding; this tells the two apart.
_ON_TIMESTEP = 1e-6


class TCDScheduler(Scheduler):
    """TCD sampling: DDIM to the noise level of floor((1 - gamma) * t_next), then fresh noise up to sigma_next.

    `gamma` in [0, 1] (0.3 by default, TCD's) sets the stochasticity: 0 is DDIM, 1 LCM-like re-noising.
    """

    order = 1

    def __init__(self, gamma: float = 0.3):
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
            raise ValueError(f"scheduler '{self.name}' needs gamma in [0, 1] (0: deterministic DDIM, 1: LCM-like "
                             f"re-noising; TCD uses 0.3); got gamma={gamma!r}")
        self.gamma = float(gamma)
        self.stochastic = self.gamma > 0

    def mid_sigma(self, schedule: DiscreteNoiseSchedule, sigma_next: torch.Tensor) -> torch.Tensor:
        """sigma of timestep floor((1 - gamma) * t(sigma_next)), at most sigma_next; sigma_next itself when gamma
        is 0 or sigma_next is 0 (the final step goes to the clean sample)."""
        if self.gamma == 0 or float(sigma_next) == 0:
            return sigma_next
        t_next = float(schedule.sigma_to_t(float(sigma_next)))
        if abs(t_next - round(t_next)) < _ON_TIMESTEP:
            t_next = float(round(t_next))
        t_mid = min(max(math.floor((1 - self.gamma) * t_next + _ON_TIMESTEP), 0), schedule.num_timesteps - 1)
        sigma_mid = min(float(schedule.sigmas[t_mid]), float(sigma_next))
        return torch.as_tensor(sigma_mid, dtype=sigma_next.dtype, device=sigma_next.device)

    def sample(self, denoise, x, sigmas, generator, callback):
        schedule = noise_schedule_of(denoise)
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            self.report(callback, i, x, sigma, denoised)
            sigma_mid = self.mid_sigma(schedule, sigma_next)
            x = x + (x - denoised) / sigma * (sigma_mid - sigma)  # DDIM: x0 + sigma_mid * eps
            sigma_up = (sigma_next**2 - sigma_mid**2).clamp(min=0).sqrt()
            if float(sigma_up) > 0:
                x = x + self.noise_like(x, generator) * sigma_up.to(x.dtype)
        return x
