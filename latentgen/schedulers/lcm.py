"""Latent consistency model sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 1, multistep
latent consistency sampling): at each grid sigma, the consistency function's estimate of x0, then fresh noise
up to the next sigma.

The consistency function is the denoiser's x0 under the boundary-condition parameterisation of a
discrete-time consistency model (Song et al. 2023, "Consistency Models", as LCM's reference code applies
it): f(x, t) = c_skip(t) * x_vp + c_out(t) * x0_hat with, for the scaled timestep
tau = t * timestep_scaling,

    c_skip = sigma_data^2 / (tau^2 + sigma_data^2),    c_out = tau / sqrt(tau^2 + sigma_data^2),

where t is the model's training timestep of the sigma and x_vp = x / sqrt(1 + sigma^2) is the
variance-preserving sample (the x_t of the paper, which c_skip multiplies there). At t = 0 this is the
identity on x_vp (f(x, 0) = x, the boundary condition); at LCM's timesteps (tau >= 10 * 19) c_skip is below
1e-5 and f is the denoiser's x0.

Timesteps come from `denoise.noise_schedule` when the denoiser exposes one (the pipeline's does), else from
Stable Diffusion's schedule (scaled_linear, beta 0.00085..0.012, 1000 steps), on which every published LCM
and LCM-LoRA was distilled (`latentgen.schedulers.discrete_timesteps`). Use it with the "lcm" sigma grid
(`latentgen.diffusion.sigma_grids.lcm`): the timesteps the model was distilled on.
"""

from __future__ import annotations

import math

from latentgen.contracts import Scheduler
from latentgen.schedulers.discrete_timesteps import noise_schedule_of


def boundary_scalings(t: float, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[float, float]:
    """(c_skip, c_out) of a discrete-time consistency model at training timestep t."""
    tau = t * timestep_scaling
    return sigma_data**2 / (tau**2 + sigma_data**2), tau / math.sqrt(tau**2 + sigma_data**2)


class LCMScheduler(Scheduler):
    """LCM's multistep consistency sampling: x0 = f(x, t(sigma)), then fresh noise up to sigma_next.

    No noise after the last step. Meant for consistency-distilled models (LCM, LCM-LoRA): with an ordinary
    denoiser it returns posterior-mean estimates re-noised, which does not reach the data distribution.
    `timestep_scaling` (10, as LCM's) multiplies the timestep in the boundary scalings; `sigma_data` (0.5) is
    the data's assumed standard deviation there.
    """

    stochastic = True
    order = 1
    consistency = True

    def __init__(self, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
        for option, value in (("timestep_scaling", timestep_scaling), ("sigma_data", sigma_data)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"scheduler '{self.name}' needs {option} > 0 (finite); got {option}={value!r}")
        self.timestep_scaling, self.sigma_data = float(timestep_scaling), float(sigma_data)

    def scalings(self, t: float) -> tuple[float, float]:
        """(c_skip, c_out) at training timestep t with this scheduler's options."""
        return boundary_scalings(t, self.timestep_scaling, self.sigma_data)

    def sample(self, denoise, x, sigmas, generator, callback):
        schedule = noise_schedule_of(denoise)
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            c_skip, c_out = self.scalings(float(schedule.sigma_to_t(float(sigma))))
            x0 = c_skip * (x / math.sqrt(1 + float(sigma) ** 2)) + c_out * denoised
            self.report(callback, i, x, sigma, x0)
            x = x0
            if float(sigma_next) > 0:
                x = x0 + self.noise_like(x0, generator) * sigma_next.to(x0.dtype)
        return x
