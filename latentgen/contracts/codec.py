"""First-stage codec contract: images (B, 3, H, W) in [-1, 1] <-> scaled latents (B, C, H/f, W/f)."""

from __future__ import annotations

import abc

import torch
from torch import nn


class Codec(nn.Module, abc.ABC):
    """Maps images to the latent space the denoiser works in, and back.

    Subclasses set `latent_channels`, `downsampling_factor` and `scale_factor` in `__init__` and
    implement `encode` and `decode`. The codec owns its latent scaling: `encode` returns latents
    multiplied by `scale_factor` (Rombach et al. 2022, Sec. 4.3.2 / App. G) and `decode` divides
    by it first, so nothing outside the codec ever sees unscaled latents.
    """

    latent_channels: int
    downsampling_factor: int
    scale_factor: float = 1.0
    image_channels: int = 3

    @abc.abstractmethod
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f).

        Deterministic when `generator` is None (a KL codec returns the posterior mean); samples
        the posterior with `generator` otherwise.
        """

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f), roughly in [-1, 1]."""

    def autoencode(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction of `images` plus the codec's own regularization losses (e.g. {"kl": ...}),
        each a scalar; what a first-stage trainer minimizes besides the reconstruction error."""
        return self.decode(self.encode(images, generator)), {}

    def statistics(self) -> dict[str, float]:
        """Monitoring values of the last `autoencode` call (e.g. a VQ codec's codebook usage and
        perplexity), logged next to the losses; never minimized. None by default."""
        return {}

    def last_layer(self) -> nn.Parameter | None:
        """The weight of the decoder's output layer, where a first-stage trainer balances the
        reconstruction and adversarial gradients (Esser et al. 2021, Eq. 7); None if there is none."""
        return None

    @property
    def name(self) -> str:
        return getattr(self, "registry_name", type(self).__name__)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """The latent (h, w) for an image of (height, width); refuses sizes the codec cannot tile."""
        f = self.downsampling_factor
        for label, size in (("height", height), ("width", width)):
            if size <= 0 or size % f:
                lower, upper = size // f * f, (size // f + 1) * f
                nearest = f"nearest valid: {lower} or {upper}" if lower >= f else f"the smallest valid is {f}"
                raise ValueError(f"codec '{self.name}' downsamples by {f}, so image {label} must be a positive "
                                 f"multiple of {f}; got {size} ({nearest})")
        return height // f, width // f

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a ValueError naming the codec unless `images` is (B, 3, H, W) with H, W tileable."""
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise ValueError(
                f"codec '{self.name}' expects images of shape (B, {self.image_channels}, H, W); "
                f"got {tuple(images.shape)}"
            )
        self.latent_size(images.shape[2], images.shape[3])

    def check_latents(self, latents: torch.Tensor) -> None:
        """Raise a ValueError naming the codec unless `latents` is (B, latent_channels, h, w)."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"codec '{self.name}' decodes latents of shape (B, {self.latent_channels}, h, w); "
                f"got {tuple(latents.shape)}"
            )
