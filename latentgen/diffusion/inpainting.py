"""Inpainting with any denoiser by blending in latent space (Avrahami et al. 2022, "Blended Latent Diffusion")."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) in [0, 1], 1 = repaint, at latent resolution (area average, so soft at edges)."""
    return F.interpolate(mask.float(), size=latent_size, mode="area").clamp(0, 1)


class MaskBlendedDenoiser:
    """denoise(x, sigma) whose estimate keeps the known latents outside the mask.

    The scheduler then only ever moves the masked region away from the original; the known region
    follows the known image's own noising path, so the seam is denoised jointly with the rest.
    """

    def __init__(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], known: torch.Tensor,
                 mask: torch.Tensor):
        self.denoise, self.known, self.mask = denoise, known, mask.to(known.dtype)

    def blend(self, estimate: torch.Tensor) -> torch.Tensor:
        return self.mask * estimate + (1 - self.mask) * self.known

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.blend(self.denoise(x, sigma))

    @property
    def noise_schedule(self):
        """The wrapped denoiser's discrete schedule, for samplers that need timesteps (lcm, tcd)."""
        return getattr(self.denoise, "noise_schedule", None)
