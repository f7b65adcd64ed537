"""Euler's method on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space", Alg. 1 without the Heun correction)."""

from __future__ import annotations

from latentgen.contracts import Scheduler


class EulerScheduler(Scheduler):
    """x <- x + (sigma_next - sigma) * d with d = (x - D(x, sigma)) / sigma; first order, one evaluation per step."""

    order = 1

    def sample(self, denoise, x, sigmas, generator, callback):
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            self.report(callback, i, x, sigma, denoised)
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        return x
