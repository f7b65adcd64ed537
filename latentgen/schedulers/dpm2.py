"""DPM-Solver-2 (Lu et al. 2022, "DPM-Solver", Alg. 1 with r = 1/2) as a sigma-space midpoint method."""

from __future__ import annotations

from latentgen.contracts import Scheduler


class DPM2Scheduler(Scheduler):
    """Second-order single-step solver of the probability-flow ODE, two denoiser calls per step.

    In the form x = x0 + sigma * noise the linear part of the ODE vanishes (alpha = 1), so DPM-Solver's
    exponential integrator with noise prediction eps = (x - D) / sigma is an integrator in sigma: the
    first-order update is x + (sigma_next - sigma) * eps. Alg. 1 with r = 1/2 takes that update to the
    midpoint of the step in lambda = -log sigma, i.e. the geometric midpoint sqrt(sigma * sigma_next),
    and redoes the whole step with the slope found there. The step to sigma = 0 has no midpoint in
    lambda and is a plain Euler step (which lands on the denoised estimate).
    """

    order = 2

    def sample(self, denoise, x, sigmas, generator, callback):
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            self.report(callback, i, x, sigma, denoised)
            eps = (x - denoised) / sigma.to(x.dtype)
            if float(sigma_next) == 0:
                x = x + eps * (sigma_next - sigma).to(x.dtype)
                continue
            sigma_mid = (sigma * sigma_next).sqrt()
            x_mid = x + eps * (sigma_mid - sigma).to(x.dtype)
            eps_mid = (x_mid - denoise(x_mid, sigma_mid)) / sigma_mid.to(x.dtype)
            x = x + eps_mid * (sigma_next - sigma).to(x.dtype)
        return x
