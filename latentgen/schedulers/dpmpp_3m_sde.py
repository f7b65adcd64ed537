"""DPM-Solver++(3M) SDE (Lu et al. 2022b, "DPM-Solver++", multistep data prediction, third order) with eta-noise."""

from __future__ import annotations

import math

from latentgen.contracts import Scheduler
from latentgen.schedulers.dpmpp_2m_sde import check_sde_options, exponential_weights, sde_noise_std


class DPMPP3MSDEScheduler(Scheduler):
    """Third-order multistep solver of the eta-SDE (see `exponential_weights`), one denoiser call per step.

    D is modelled as the quadratic in u = lambda - lambda_i through the last three estimates (Newton
    form, nodes 0, -h1, -h1 - h2): D(u) = D0 + u d1 + u (u + h1) d2 with d1 = (D0 - D1) / h1 and
    d2 = (d1 - (D1 - D2) / h2) / (h1 + h2), integrated exactly against the step's exponential weight:
    x_next = e^-ch x + w0 D0 + w1 d1 + (w2 + h1 w1) d2 (+ noise). Warm-up: the first step is first
    order, the second uses the line through two estimates (second order); the step to sigma = 0
    returns D. eta = 0 is a deterministic third-order ODE solver, eta = 1 the reverse SDE.
    """

    order = 3

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        check_sde_options("dpmpp_3m_sde", eta, s_noise)
        self.eta, self.s_noise = float(eta), float(s_noise)
        self.stochastic = self.eta > 0

    def sample(self, denoise, x, sigmas, generator, callback):
        history: list[tuple] = []  # (denoised, h of the step that followed it), most recent first
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            denoised = denoise(x, sigmas[i])
            self.report(callback, i, x, sigmas[i], denoised)
            if sigma_next == 0:
                x = denoised
                continue
            h = math.log(sigma / sigma_next)
            decay, w0, w1, w2 = exponential_weights(h, self.eta)
            x = x * decay + denoised * w0
            if history:
                previous, h1 = history[0]
                d1 = (denoised - previous) / h1
                x = x + d1 * w1
                if len(history) > 1:
                    before, h2 = history[1]
                    d2 = (d1 - (previous - before) / h2) / (h1 + h2)
                    x = x + d2 * (w2 + h1 * w1)
            std = sde_noise_std(sigma_next, h, self.eta) * self.s_noise
            if std > 0:
                x = x + self.noise_like(x, generator) * std
            history = [(denoised, h)] + history[:1]
        return x
