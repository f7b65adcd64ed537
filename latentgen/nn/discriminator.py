"""PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
Networks", Sec. 3.2.2), the one Esser et al. 2021 and LDM's first stage train against."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PatchDiscriminator", "min_image_size"]


def min_image_size(num_layers: int) -> int:
    """The smallest H and W that leave a `num_layers` discriminator at least one logit: each stride-2
    conv floors size/2, each stride-1 4x4 conv with padding 1 removes one row."""
    return 3 * 2**int(num_layers)


class PatchDiscriminator(nn.Module):
    """images (B, C, H, W) -> real/fake logits (B, 1, H', W'), one per overlapping patch.

    `num_layers` stride-2 4x4 convolutions (the width doubling up to 8 * `channels`), then a stride-1
    4x4 convolution and a stride-1 4x4 convolution to one logit; batch norm after every convolution
    but the first and the last, LeakyReLU(0.2) in between. With 3 layers each logit sees a 70x70 patch.
    """

    def __init__(self, image_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1 or channels < 1:
            raise ValueError(f"PatchDiscriminator needs num_layers >= 1 and channels >= 1; got {num_layers}, {channels}")
        self.num_layers = int(num_layers)
        layers: list[nn.Module] = [nn.Conv2d(image_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for index in range(1, num_layers + 1):
            out = channels * min(2**index, 8)
            stride = 2 if index < num_layers else 1
            # No conv bias before batch norm: the norm's shift replaces it.
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_initialize)

    @property
    def min_image_size(self) -> int:
        return min_image_size(self.num_layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or min(images.shape[2:]) < self.min_image_size:
            raise ValueError(
                f"PatchDiscriminator with {self.num_layers} layers needs images (B, C, H, W) with H, W >= "
                f"{self.min_image_size}; got {tuple(images.shape)}. Lower train.codec.disc_layers"
            )
        return self.layers(images)


def _initialize(module: nn.Module) -> None:
    # DCGAN's initialization (Radford et al. 2016), which the PatchGAN training recipes keep.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
