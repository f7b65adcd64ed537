"""KL-regularized autoencoder codec (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", Sec. 3 and App. G): Stable Diffusion's first stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from latentgen.contracts.codec import Codec
from latentgen.codecs.autoencoder_body import build_autoencoder_body
from latentgen.nn.autoencoder import DiagonalGaussian

__all__ = ["KLCodec"]


class KLCodec(Codec):
    """KL autoencoder: images (B, 3, H, W) <-> scaled latents (B, latent_channels, H/f, W/f).

    Attribute names (`encoder`, `decoder`, `quant_conv`, `post_quant_conv`) are those of the
    original `AutoencoderKL`, so `state_dict()` keys equal a Stable Diffusion checkpoint's
    `first_stage_model.*` keys with that prefix removed. The defaults are SD v1's KL-f8 except
    `scale_factor`, which is a property of the trained weights (0.18215 for SD v1) and so left at 1.

    Stable Diffusion 3's 16-channel VAE: `quant_convs=False` (its encoder and decoder meet the latent
    directly) and `shift_factor` 0.0609 with `scale_factor` 1.5305: latents = (z - shift) * scale
    (SD3LatentFormat; the shift is 0 for every earlier model).
    """

    def __init__(
        self,
        latent_channels: int = 4,
        channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        resolution: int = 256,
        dropout: float = 0.0,
        z_channels: int | None = None,
        scale_factor: float = 1.0,
        image_channels: int = 3,
        shift_factor: float = 0.0,
        quant_convs: bool = True,
    ) -> None:
        super().__init__()
        z_channels = build_autoencoder_body(
            self, "KLCodec", latent_channels=latent_channels, channels=channels, channel_mult=channel_mult,
            num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions, resolution=resolution,
            dropout=dropout, z_channels=z_channels, scale_factor=scale_factor, image_channels=image_channels,
            double_z=True)
        self.shift_factor = float(shift_factor)
        # 1x1 convs between the encoder/decoder width z_channels and the latent width, named as in
        # the original (nothing is quantized in the KL variant; the name is kept for the weights).
        if quant_convs:
            self.quant_conv = nn.Conv2d(2 * z_channels, 2 * latent_channels, kernel_size=1)
            self.post_quant_conv = nn.Conv2d(latent_channels, z_channels, kernel_size=1)
        elif z_channels != latent_channels:
            raise ValueError(f"codec 'KLCodec': without quant_convs the latent is the encoder's output, so z_channels "
                             f"({z_channels}) must equal latent_channels ({latent_channels})")
        else:
            self.quant_conv, self.post_quant_conv = nn.Identity(), nn.Identity()

    def posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        """The unscaled posterior q(z | images) over (B, latent_channels, H/f, W/f)."""
        self.check_images(images)
        moments = self.quant_conv(self.encoder(images))  # (B, 2 * latent_channels, H/f, W/f)
        return DiagonalGaussian(moments)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        posterior = self.posterior(images)
        latents = posterior.mean if generator is None else posterior.sample(generator)
        return (latents - self.shift_factor) * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents)
        return self._decode_unscaled(latents / self.scale_factor + self.shift_factor)

    def autoencode(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        posterior = self.posterior(images)
        z = posterior.mean if generator is None else posterior.sample(generator)
        # Decoding the unscaled z directly skips a multiply/divide by scale_factor that would only
        # add rounding; the KL is of the unscaled latents, as in the original training objective.
        return self._decode_unscaled(z), {"kl": posterior.kl().mean()}

    def last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight

    def _decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        # z: (B, latent_channels, h, w) unscaled -> images (B, image_channels, h*f, w*f)
        return self.decoder(self.post_quant_conv(z))
