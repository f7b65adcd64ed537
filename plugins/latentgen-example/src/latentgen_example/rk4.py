"""The classical fourth-order Runge-Kutta method (Kutta 1901) on the probability-flow ODE in sigma space."""

from __future__ import annotations

from latentgen.contracts import Scheduler


class RK4Scheduler(Scheduler):
    """Integrates dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, "Elucidating the Design Space",
    Eq. 3 with sigma(t) = t) with RK4: slopes at the step's start, twice at its midpoint and at its end,
    weighted 1, 2, 2, 1. Four denoiser calls per step. The slope is undefined at sigma = 0, so the final
    step to 0 is an Euler step, which lands on the denoised estimate.
    """

    order = 4

    def __init__(self) -> None:  # explicit, so that the registry refuses unexpected parameters by name
        pass

    def sample(self, denoise, x, sigmas, generator, callback):
        def slope(x, sigma):
            return (x - denoise(x, sigma)) / sigma

        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            self.report(callback, i, x, sigma, denoised)
            h = sigma_next - sigma  # negative: sigma descends
            k1 = (x - denoised) / sigma
            if float(sigma_next) == 0:
                x = x + k1 * h
                continue
            k2 = slope(x + k1 * (h / 2), sigma + h / 2)
            k3 = slope(x + k2 * (h / 2), sigma + h / 2)
            k4 = slope(x + k3 * h, sigma_next)
            x = x + (k1 + 2 * k2 + 2 * k3 + k4) * (h / 6)
        return x
