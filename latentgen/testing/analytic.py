"""Diffusion problems with exact answers: Gaussian-mixture data, whose ideal denoiser is closed-form.

For data x0 ~ sum_k w_k N(mu_k, s_k^2 I) and x = x0 + sigma * noise, E[x0 | x] is the
responsibility-weighted mix of each component's posterior mean mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k).
A perfectly trained network would return exactly this, so a sampler's error against the exact
probability-flow ODE solution (Song et al. 2021, Eq. 13; dx/dsigma = (x - D(x, sigma)) / sigma) is the
sampler's own. For a single Gaussian the ODE solution is closed-form; for a mixture a fine
fourth-order integration in log sigma gives it to float64 precision.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


class GaussianMixture:
    """Isotropic Gaussian mixture in `dim` dimensions; every computation in float64."""

    def __init__(self, means: Sequence[Sequence[float]], stds: Sequence[float], weights: Sequence[float] | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)  # (K,)
        k = self.means.shape[0]
        self.weights = torch.as_tensor(weights if weights is not None else [1 / k] * k, dtype=torch.float64)
        if self.stds.shape != (k,) or self.weights.shape != (k,):
            raise ValueError("means (K, D), stds (K,) and weights (K,) must agree on K")

    @classmethod
    def gaussian(cls, mean: float = 0.5, std: float = 0.8, dim: int = 1) -> "GaussianMixture":
        return cls([[mean] * dim], [std])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        """Total covariance (D, D) of the mixture."""
        mean = self.mean()
        centred = self.means - mean
        within = (self.weights * self.stds**2).sum() * torch.eye(self.dim, dtype=torch.float64)
        return within + (self.weights[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """E[x0 | x0 + sigma * noise = x] for x (..., D); returns x's dtype."""
        dtype = x.dtype
        x = x.to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        variance = self.stds**2 + sigma**2  # (K,)
        offsets = x[..., None, :] - self.means  # (..., K, D)
        log_likelihood = (-0.5 * (offsets**2).sum(-1) / variance - 0.5 * self.dim * variance.log()
                          + self.weights.log())  # (..., K)
        responsibility = torch.softmax(log_likelihood, dim=-1)
        posterior_means = self.means + (self.stds**2 / variance)[:, None] * offsets  # (..., K, D)
        return (responsibility[..., None] * posterior_means).sum(-2).to(dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[component] + self.stds[component, None] * noise

    def prior(self, n: int, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws of x at noise level sigma (data plus noise): where sampling starts."""
        return self.sample(n, generator) + sigma * torch.randn(n, self.dim, dtype=torch.float64, generator=generator)

    def ode_solution(self, x: torch.Tensor, sigma_start: float, sigma_end: float = 0.0, steps: int = 4000,
                     sigma_floor: float = 1e-5) -> torch.Tensor:
        """The probability-flow ODE taken from sigma_start to sigma_end (float64).

        A single Gaussian has the closed form mu + sqrt(s^2 + sigma_end^2) / sqrt(s^2 + sigma_start^2) * (x - mu).
        A mixture is integrated with classical Runge-Kutta in u = log sigma; to reach 0 it goes down to
        `sigma_floor` and takes the last stretch with the denoiser itself (error O(sigma_floor^2)).
        """
        x = x.to(torch.float64)
        if self.means.shape[0] == 1:
            mu, s = self.means[0], self.stds[0].item()
            return mu + math.sqrt(s**2 + sigma_end**2) / math.sqrt(s**2 + sigma_start**2) * (x - mu)

        def slope(x, u):  # dx/du = sigma * dx/dsigma = x - D(x, sigma)
            return x - self.denoise(x, math.exp(u))

        u, u_end = math.log(sigma_start), math.log(sigma_end if sigma_end > 0 else sigma_floor)
        h = (u_end - u) / steps
        for _ in range(steps):
            k1 = slope(x, u)
            k2 = slope(x + h / 2 * k1, u + h / 2)
            k3 = slope(x + h / 2 * k2, u + h / 2)
            k4 = slope(x + h * k3, u + h)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            u += h
        return x if sigma_end > 0 else self.denoise(x, sigma_floor)


def empirical_order(steps: Sequence[int], errors: Sequence[float]) -> float:
    """Least-squares slope p of log(error) = c - p log(steps): the observed convergence order."""
    logs = torch.tensor([[math.log(n), math.log(e)] for n, e in zip(steps, errors)], dtype=torch.float64)
    centred = logs - logs.mean(0)
    return float(-(centred[:, 0] * centred[:, 1]).sum() / (centred[:, 0] ** 2).sum())


# The accuracy problem latentgen's own tests and benchmarks use: a 2-D mixture of three Gaussians, sampled
# from sigma 20 down to 0.01 (every sampler's last step, 0.01 -> 0, is the denoiser itself).
ACCURACY_MIXTURE = GaussianMixture([[-1.0, 0.5], [1.2, -0.4], [0.2, 1.5]], [0.35, 0.5, 0.25], [0.3, 0.5, 0.2])
ACCURACY_SIGMA_MIN, ACCURACY_SIGMA_MAX = 0.01, 20.0


def accuracy_reference(paths: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Start points at ACCURACY_SIGMA_MAX and the exact ODE solution at ACCURACY_SIGMA_MIN, denoised there,
    which isolates a sampler's integration error from the final denoising step."""
    x = ACCURACY_MIXTURE.prior(paths, ACCURACY_SIGMA_MAX, torch.Generator().manual_seed(seed))
    exact = ACCURACY_MIXTURE.ode_solution(x, ACCURACY_SIGMA_MAX, ACCURACY_SIGMA_MIN)
    return x, ACCURACY_MIXTURE.denoise(exact, ACCURACY_SIGMA_MIN)
