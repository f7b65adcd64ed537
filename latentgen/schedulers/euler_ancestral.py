"""Euler ancestral sampling: an Euler step down to sigma_down, then fresh noise up to sigma_next (the
sigma-space form of DDIM's eta, Song et al. 2021, Eq. 16)."""

from __future__ import annotations

from latentgen.contracts import Scheduler
from latentgen.schedulers.ancestral import ancestral_step


class EulerAncestralScheduler(Scheduler):
    """eta = 1 adds DDPM's posterior noise; eta = 0 is plain Euler; `s_noise` scales the added noise."""

    order = 1

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        if eta < 0 or s_noise < 0:
            raise ValueError(f"scheduler '{self.name}' needs eta >= 0 (0: deterministic, 1: DDPM-like noise) and "
                             f"s_noise >= 0; got eta={eta}, s_noise={s_noise}")
        self.eta, self.s_noise = float(eta), float(s_noise)
        self.stochastic = self.eta > 0 and self.s_noise > 0

    def sample(self, denoise, x, sigmas, generator, callback):
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            self.report(callback, i, x, sigma, denoised)
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.eta)
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
            if float(sigma_up) > 0 and self.s_noise > 0:
                x = x + self.noise_like(x, generator) * (sigma_up * self.s_noise).to(x.dtype)
        return x
