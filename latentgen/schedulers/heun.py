"""Heun's second-order method with optional stochastic churn (Karras et al. 2022, "Elucidating the Design Space", Alg. 2)."""

from __future__ import annotations

import math

from latentgen.contracts import Scheduler


class HeunScheduler(Scheduler):
    """An Euler step, corrected with the slope at its end (two evaluations per step; Euler for the final
    step to 0). With `s_churn` > 0, each step in [s_tmin, s_tmax] first raises the noise level by a
    factor (1 + gamma), gamma = min(s_churn / steps, sqrt(2) - 1), adding fresh noise scaled by `s_noise`.
    """

    order = 2

    def __init__(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0):
        if s_churn < 0 or s_noise < 0 or s_tmin < 0 or s_tmax < s_tmin:
            raise ValueError(f"scheduler 'heun' needs s_churn >= 0, s_noise >= 0 and 0 <= s_tmin <= s_tmax; got "
                             f"s_churn={s_churn}, s_tmin={s_tmin}, s_tmax={s_tmax}, s_noise={s_noise}")
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)
        self.stochastic = self.s_churn > 0

    def sample(self, denoise, x, sigmas, generator, callback):
        steps = len(sigmas) - 1
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            gamma = min(self.s_churn / steps, math.sqrt(2) - 1) if self.s_tmin <= float(sigma) <= self.s_tmax else 0.0
            sigma_hat = sigma * (1 + gamma)
            if gamma > 0:
                x = x + self.noise_like(x, generator) * (self.s_noise * (sigma_hat**2 - sigma**2).sqrt()).to(x.dtype)
            denoised = denoise(x, sigma_hat)
            self.report(callback, i, x, sigma_hat, denoised)
            d = (x - denoised) / sigma_hat
            x_euler = x + d * (sigma_next - sigma_hat)
            if float(sigma_next) == 0:
                x = x_euler
            else:
                d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
                x = x + (d + d_next) / 2 * (sigma_next - sigma_hat)
        return x
