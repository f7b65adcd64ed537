"""DPM-Solver++(2S) (Lu et al. 2022b, "DPM-Solver++", Alg. 1 with r = 1/2), single-step, with ancestral noise."""

from __future__ import annotations

import math

from latentgen.contracts import Scheduler
from latentgen.schedulers.ancestral import ancestral_step


class DPMPP2SAncestralScheduler(Scheduler):
    """Second-order single-step data-prediction solver, two denoiser calls per step, plus DDIM-style noise.

    Each step splits sigma_next into sigma_down and sigma_up (`ancestral_step`, DDIM's eta), takes a
    DPM-Solver++(2S) step from sigma to sigma_down and adds sigma_up * s_noise fresh noise. The 2S step
    with h = log(sigma / sigma_down): a first-order data-prediction step to the lambda midpoint
    sigma_mid = sqrt(sigma * sigma_down), then the whole step with the estimate found there,
    x_down = (sigma_down / sigma) x + (1 - e^-h) D(x_mid, sigma_mid). The step to sigma = 0 is first
    order (it returns the denoised estimate). eta = 0 is a deterministic second-order ODE solver.
    """

    order = 2

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        if not eta >= 0:
            raise ValueError(f"scheduler 'dpmpp_2s_ancestral' needs eta >= 0 (0: deterministic ODE solver, "
                             f"1: full ancestral noise); got {eta}")
        if not s_noise >= 0:
            raise ValueError(f"scheduler 'dpmpp_2s_ancestral' needs s_noise >= 0 (scale of the added noise, "
                             f"1 for the exact variance); got {s_noise}")
        self.eta, self.s_noise = float(eta), float(s_noise)
        self.stochastic = self.eta > 0

    def sample(self, denoise, x, sigmas, generator, callback):
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i]
            denoised = denoise(x, sigma)
            self.report(callback, i, x, sigma, denoised)
            sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1], self.eta)
            if float(sigma_down) == 0:
                x = denoised
            else:
                s, s_down = float(sigma), float(sigma_down)
                h = math.log(s / s_down)
                s_mid = math.sqrt(s * s_down)
                x_mid = x * (s_mid / s) - denoised * math.expm1(-h / 2)
                denoised_mid = denoise(x_mid, sigmas.new_tensor(s_mid))
                x = x * (s_down / s) - denoised_mid * math.expm1(-h)
            if float(sigma_up) > 0 and self.s_noise > 0:
                x = x + self.noise_like(x, generator) * (float(sigma_up) * self.s_noise)
        return x
