"""The ControlNet network (Zhang, Rao and Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): a trainable copy of a UNet's encoder and middle block, fed the noisy latent plus an embedded control
map, whose zero-initialised 1x1 convs give one residual per skip connection and one for the middle block.

Parameter names follow lllyasviel/ControlNet's `cldm.cldm.ControlNet` (the released `control_model.*` keys):
`time_embed`, `input_hint_block.{0,2,...,14}`, `input_blocks`, `zero_convs.{i}.0`, `middle_block`,
`middle_block_out.0`, and `label_emb` for a UNet with a vector input (SDXL). The encoder is built by
latentgen's own UNet from the steered UNet's options, so the two always share one block structure.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from latentgen.denoisers.unet import Downsample, ResBlock, TimestepEmbedSequential, UNet
from latentgen.nn.timestep_embedding import timestep_embedding

# cldm's input_hint_block: 3x3 convs with SiLU between them, downsampling 8x over three stride-2 convs.
_HINT_WIDTHS = ((16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2))


class ControlNetModel(nn.Module):
    """x (B, C, h, w), hint (B, hint_channels, 8h, 8w) in [0, 1], t (B,), cond -> residuals, one per UNet skip
    connection then one for the middle block."""

    def __init__(self, unet_params: Mapping[str, Any], hint_channels: int = 3):
        super().__init__()
        unet = UNet(**{**unet_params, "concat_channels": 0})
        self.model_channels = unet.model_channels
        self.context_dim, self.vector_dim = unet.context_dim, unet.vector_dim
        self.time_embed = unet.time_embed
        if unet.vector_dim is not None:
            self.label_emb = unet.label_emb
        self.input_blocks = unet.input_blocks
        self.middle_block = unet.middle_block
        layers: list[nn.Module] = []
        channels = hint_channels
        for width, stride in _HINT_WIDTHS:
            layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1), nn.SiLU()]
            channels = width
        layers.append(nn.Conv2d(channels, self.model_channels, 3, padding=1))
        self.input_hint_block = nn.Sequential(*layers)
        self.zero_convs = nn.ModuleList(TimestepEmbedSequential(nn.Conv2d(width, width, 1))
                                        for width in _output_widths(self.input_blocks))
        middle = _output_widths([self.middle_block])[0]
        self.middle_block_out = TimestepEmbedSequential(nn.Conv2d(middle, middle, 1))

    def forward(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))
        if self.vector_dim is not None:
            emb = emb + self.label_emb(cond["vector"].to(dtype))
        context = cond["crossattn"].to(dtype) if self.context_dim is not None else None
        guided_hint = self.input_hint_block(hint.to(dtype))  # (B, model_channels, h, w)
        h, outs = x.to(dtype), []
        for index, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if index == 0:
                h = h + guided_hint  # the control map enters after the first conv, as in cldm
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs


def _output_widths(blocks) -> list[int]:
    """The channels each block outputs (its last conv's or ResBlock's)."""
    widths = []
    for block in blocks:
        width = None
        for layer in block:
            if isinstance(layer, ResBlock):
                width = layer.out_layers[3].out_channels
            elif isinstance(layer, Downsample):
                width = layer.op.out_channels
            elif isinstance(layer, nn.Conv2d):
                width = layer.out_channels
        widths.append(width)
    return widths
