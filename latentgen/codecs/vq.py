"""Vector-quantized autoencoder codec (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", Sec. 3 and App. G: the VQ-regularized first stage, e.g. LDM's VQ-f4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from latentgen.contracts.codec import Codec
from latentgen.codecs.autoencoder_body import build_autoencoder_body
from latentgen.nn.quantizer import Quantized, VectorQuantizer

__all__ = ["VQCodec"]


class VQCodec(Codec):
    """VQ autoencoder: images (B, 3, H, W) <-> scaled latents (B, latent_channels, H/f, W/f).

    As in LDM, the quantizer sits inside the decoder: `encode` returns the continuous
    pre-quantization latents (what the diffusion model learns) and `decode` snaps them to the
    nearest codes first, so samples that land between codes still decode to codebook images.
    Attribute names (`encoder`, `quant_conv`, `quantize.embedding`, `post_quant_conv`, `decoder`)
    are those of the original `VQModel`. The LDM VQ-f4 is latent_channels=3, num_codes=8192,
    channel_mult=(1, 2, 4).
    """

    def __init__(
        self,
        latent_channels: int = 3,
        num_codes: int = 8192,
        channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        resolution: int = 256,
        dropout: float = 0.0,
        z_channels: int | None = None,
        beta: float = 0.25,
        ema_decay: float | None = None,
        scale_factor: float = 1.0,
        image_channels: int = 3,
    ) -> None:
        super().__init__()
        z_channels = build_autoencoder_body(
            self, "VQCodec", latent_channels=latent_channels, channels=channels, channel_mult=channel_mult,
            num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions, resolution=resolution,
            dropout=dropout, z_channels=z_channels, scale_factor=scale_factor, image_channels=image_channels,
            double_z=False)
        self.quant_conv = nn.Conv2d(z_channels, latent_channels, kernel_size=1)
        self.quantize = VectorQuantizer(num_codes, latent_channels, beta=beta, ema_decay=ema_decay)
        self.post_quant_conv = nn.Conv2d(latent_channels, z_channels, kernel_size=1)
        self._last: Quantized | None = None

    def _encode_unscaled(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.quant_conv(self.encoder(images))  # (B, latent_channels, H/f, W/f), before quantization

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # Deterministic: there is no posterior to sample; the generator is accepted for the contract.
        return self._encode_unscaled(images) * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents)
        return self.decoder(self.post_quant_conv(self.quantize.quantize(latents / self.scale_factor)))

    def autoencode(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        quantized = self.quantize(self._encode_unscaled(images))
        self._last = quantized
        losses = {"commitment": quantized.commitment_loss}
        if quantized.codebook_loss is not None:
            losses["codebook"] = quantized.codebook_loss
        return self.decoder(self.post_quant_conv(quantized.latents)), losses

    def statistics(self) -> dict[str, float]:
        if self._last is None:
            return {}
        return {"codebook_usage": self._last.usage.item(), "perplexity": self._last.perplexity.item()}

    def last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight
