"""The noise split of an ancestral step from sigma to sigma_next (DDIM's eta, in sigma space)."""

from __future__ import annotations

import torch


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up): go deterministically to sigma_down, then add sigma_up fresh noise.

    Song et al. 2021 (DDIM), Eq. 16, rewritten for x = x0 + sigma * noise: the DDIM noise
    sigma_t(eta), divided by sqrt(abar_{t-1}), is sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2),
    and sigma_down^2 + sigma_up^2 = sigma_next^2 keeps the marginal. eta = 1 is DDPM's posterior.
    """
    if eta == 0 or float(sigma_next) == 0:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = (eta * sigma_next * (1 - sigma_next**2 / sigma**2).clamp(min=0).sqrt()).clamp(max=sigma_next)
    sigma_down = (sigma_next**2 - sigma_up**2).clamp(min=0).sqrt()
    return sigma_down, sigma_up
