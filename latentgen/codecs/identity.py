"""Identity codec for pixel-space diffusion (the f=1 baseline of Rombach et al. 2022, Sec. 4.1)."""

from __future__ import annotations

import torch

from latentgen.contracts.codec import Codec

__all__ = ["IdentityCodec"]


class IdentityCodec(Codec):
    """Pixel space as the "latent" space: (B, 3, H, W) <-> (B, 3, H, W), optionally rescaled.

    `latent_channels` is a constructor argument only so that Hydra configs can interpolate
    `${codec.latent_channels}` the same way for every codec; it must be 3.
    """

    def __init__(self, latent_channels: int = 3, scale_factor: float = 1.0) -> None:
        super().__init__()
        if latent_channels != self.image_channels:
            raise ValueError(
                f"codec 'IdentityCodec' passes images through unchanged, so latent_channels must be "
                f"{self.image_channels} (the image channels); got {latent_channels}"
            )
        if scale_factor <= 0:
            raise ValueError(f"codec 'IdentityCodec' needs scale_factor > 0; got {scale_factor}")
        self.latent_channels = int(latent_channels)
        self.downsampling_factor = 1
        self.scale_factor = float(scale_factor)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # Nothing to sample: the generator is accepted for the contract and ignored.
        self.check_images(images)
        return images * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents)
        return latents / self.scale_factor
