"""DDIM sampler (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12) in sigma space."""

from __future__ import annotations

from latentgen.contracts import Scheduler
from latentgen.schedulers.ancestral import ancestral_step


class DDIMScheduler(Scheduler):
    """DDIM: move along the predicted noise direction to the next sigma; eta > 0 re-injects noise.

    For x = x0 + sigma * noise, eta = 0 is exactly a first-order (Euler) step of the
    probability-flow ODE in sigma; eta = 1 matches DDPM's ancestral sampling.
    """

    def __init__(self, eta: float = 0.0):
        if eta < 0:
            raise ValueError(f"scheduler 'ddim' needs eta >= 0 (0: deterministic, 1: DDPM-like); got {eta}")
        self.eta = float(eta)
        self.stochastic = self.eta > 0

    def sample(self, denoise, x, sigmas, generator, callback):
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            self.report(callback, i, x, sigma, denoised)
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.eta)
            eps = (x - denoised) / sigma
            x = denoised + eps * sigma_down.to(x.dtype)
            if float(sigma_up) > 0:
                x = x + self.noise_like(x, generator) * sigma_up.to(x.dtype)
        return x
