"""The LDM first-stage encoder and decoder (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", App. G), plus the diagonal Gaussian posterior of the KL autoencoder.

Module structure and parameter names follow the original CompVis implementation exactly
(`conv_in`, `down.{i}.block.{j}`, `down.{i}.attn.{j}`, `down.{i}.downsample.conv`, `mid.block_1`,
`mid.attn_1`, `mid.block_2`, `norm_out`, `conv_out`, and `up.{i}...` in the decoder), so that the
`first_stage_model.encoder.*` / `.decoder.*` tensors of a Stable Diffusion checkpoint load with
`strict=True` and no key renaming. Constructor arguments are the original `ddconfig` keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from latentgen.nn.blocked_attention import dot_product_attention
from latentgen.nn.native_kernels import group_norm_silu

__all__ = ["ResnetBlock", "AttnBlock", "Downsample", "Upsample", "Encoder", "Decoder", "DiagonalGaussian"]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm as the original uses it: 32 groups, eps 1e-6 (not PyTorch's 1e-5 default)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, 3x3 conv, twice) without a time embedding."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            # The original's VAE always uses the 1x1 "network-in-network" shortcut, never a 3x3 one.
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H, W)
        # Norm and SiLU fused in bf16 inference, else SiLU in place on the norm's fresh output: no second
        # full-resolution tensor to allocate and fault in (latentgen/nn/native_kernels.py).
        h = self.conv1(group_norm_silu(x, self.norm1))
        h = self.conv2(self.dropout(group_norm_silu(h, self.norm2)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1-conv projections."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.norm = group_norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # (B, C, H, W) -> (B, H*W, C): one head whose width is the whole channel dimension
        q, k, v = (proj(normed).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # Neither path materializes the whole (H*W)^2 attention matrix, which at SD's 64x64 latent
        # grid is 4096^2 per image; the scale C^-1/2 is the original's.
        out = dot_product_attention(q, k, v)  # (B, H*W, C)
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halves H and W with a stride-2 3x3 conv after padding only right and bottom, as the original."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric (0, 1, 0, 1) padding: symmetric padding 1 would shift the sampling grid and
        # break parity with pretrained weights.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Doubles H and W by nearest-neighbour interpolation followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_group_norm_widths(component: str, ch: int, ch_mult: Sequence[int]) -> None:
    for mult in ch_mult:
        if (ch * mult) % 32:
            raise ValueError(
                f"{component}: every level width ch * ch_mult[i] must be a multiple of 32 (GroupNorm "
                f"uses 32 groups); got ch={ch}, ch_mult={tuple(ch_mult)}"
            )


class Encoder(nn.Module):
    """LDM first-stage encoder: images (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        out_ch: int | None = None,  # accepted so a whole ddconfig can be passed; the decoder's concern
    ) -> None:
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        _check_group_norm_widths("Encoder", ch, ch_mult)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        # `resolution` only decides which levels get attention: a level at spatial size r (for a
        # resolution x resolution input) has attention iff r is in attn_resolutions.
        current_resolution = resolution
        in_ch_mult = (1,) + ch_mult
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                current_resolution //= 2
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        # h: (B, ch * ch_mult[-1], H/f, W/f)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(group_norm_silu(h, self.norm_out))  # (B, 2*z_channels, H/f, W/f)


class Decoder(nn.Module):
    """LDM first-stage decoder: z (B, z_channels, h, w) -> images (B, out_ch, h*f, w*f)."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resolution: int,
        z_channels: int,
        in_channels: int | None = None,  # accepted so a whole ddconfig can be passed; the encoder's
        double_z: bool | None = None,  # concern, like in_channels
    ) -> None:
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        _check_group_norm_widths("Decoder", ch, ch_mult)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks

        block_in = ch * ch_mult[-1]
        current_resolution = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)

        # Built from the coarsest level down, but stored so that up[i] is level i (the same index as
        # the encoder's down[i]): that is how the original checkpoint keys are numbered.
        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            # One block more than the encoder, matching the original's capacity split.
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != 0:
                level.upsample = Upsample(block_in)
                current_resolution *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, ch * ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        # h: (B, ch * ch_mult[0], h*f, w*f)
        return self.conv_out(group_norm_silu(h, self.norm_out))  # (B, out_ch, h*f, w*f)


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) of the KL autoencoder (Rombach et al. 2022, Sec. 3).

    Built from encoder moments (B, 2C, h, w): the first C channels are the mean, the last C the
    log-variance.
    """

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)  # each (B, C, h, w)
        # Clamped as in the original so exp() can neither overflow nor collapse to exactly zero.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterized sample mean + std * eps, (B, C, h, w); gradients flow to both moments."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, (B,): summed (not averaged) over C, h, w as the original."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))
