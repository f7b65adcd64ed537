"""DDPM ancestral sampler (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Alg. 2) in sigma space."""

from __future__ import annotations

from latentgen.contracts import Scheduler


class DDPMScheduler(Scheduler):
    """Sample each step from the Gaussian posterior q(x_next | x, x0_hat) of the forward process.

    In the form x = x0 + sigma * noise, going from sigma to sigma_next < sigma the posterior has mean
    x0_hat + (sigma_next / sigma)^2 (x - x0_hat) and variance sigma_next^2 (1 - sigma_next^2 / sigma^2)
    (DDPM's beta-tilde, "fixed_small"). `variance="fixed_large"` uses the forward step's own
    variance instead (DDPM's beta = 1 - abar / abar_next, which is
    (sigma^2 - sigma_next^2) (1 + sigma_next^2) / (1 + sigma^2) in this form), the paper's alternative.
    """

    stochastic = True

    def __init__(self, variance: str = "fixed_small"):
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"scheduler 'ddpm' variance must be 'fixed_small' or 'fixed_large'; got {variance!r}")
        self.variance = variance

    def sample(self, denoise, x, sigmas, generator, callback):
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            self.report(callback, i, x, sigma, denoised)
            ratio = (sigma_next / sigma) ** 2
            x = denoised + (x - denoised) * ratio.to(x.dtype)
            if float(sigma_next) > 0:
                if self.variance == "fixed_small":
                    std = sigma_next * (1 - ratio).sqrt()
                else:
                    std = ((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)).sqrt()
                x = x + self.noise_like(x, generator) * std.to(x.dtype)
        return x
