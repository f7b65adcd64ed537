"""Inpainting conditioning: the mask and the masked image's latents, concatenated to the denoiser's input.

The layout of Stable Diffusion's inpainting models (Rombach et al. 2022, Sec. 4.5): channels
[mask (1), latents of image * (1 - mask) (C)], so a 4-channel-latent UNet takes 9 input channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentgen.contracts import Conditioner


class MaskedImageConditioner(Conditioner):
    """Reads "mask" (B, 1, H, W), 1 = repaint, and "masked_image_latents" (B, C, h, w) -> "concat" (B, 1 + C, h, w).

    The pipeline fills both inputs from `image=` and `mask=` with its codec. The same tensors serve
    the unconditional pass: guidance acts on the other conditioners only, as in the original.
    """

    input_keys = ("mask", "masked_image_latents")

    def __init__(self, latent_channels: int = 4):
        super().__init__()
        if latent_channels < 1:
            raise ValueError(f"conditioner 'masked_image' needs latent_channels >= 1; got {latent_channels}")
        self.latent_channels = int(latent_channels)

    @property
    def outputs(self) -> dict[str, int]:
        return {"concat": 1 + self.latent_channels}

    def forward(self, batch):
        self.check_inputs(batch)
        latents = batch["masked_image_latents"]
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"conditioner '{self.name}' expects masked_image_latents (B, {self.latent_channels}, h, w); "
                             f"got {tuple(latents.shape)}")
        mask = F.interpolate(batch["mask"].to(latents.dtype), size=latents.shape[-2:])  # nearest, as the original
        return {"concat": torch.cat([mask, latents], dim=1)}

    def unconditional(self, batch):
        return self.forward(batch)
