"""The LDM UNet denoiser (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models").

Module structure and parameter names follow CompVis's `openaimodel.UNetModel` with
`use_spatial_transformer=True`, so Stable Diffusion v1/v2 `model.diffusion_model.*` weights load with
`load_state_dict(strict=True)` once the prefix is stripped.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from latentgen.contracts import Denoiser
from latentgen.denoisers.inputs import check_denoiser_inputs
from latentgen.nn.attention import SpatialTransformer
from latentgen.nn.native_kernels import group_norm_silu
from latentgen.nn.normalization import GroupNorm32
from latentgen.nn.timestep_embedding import timestep_embedding


class ResBlock(nn.Module):
    """Residual block with an additive timestep embedding (Ho et al. 2020; LDM's `ResBlock`).

    x (B, C, h, w), emb (B, E) -> (B, C_out, h, w). The last conv is zero-initialised as in the
    original, so every block starts as its skip connection.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # in_layers and out_layers keep the original's layout (their state-dict keys) but run as
        # norm-SiLU-conv with the norm and SiLU fused, the embedding added inside the second norm (one pass over
        # the map where torch needs three; latentgen/nn/native_kernels.py).
        h = self.in_layers[2](group_norm_silu(x, self.in_layers[0]))  # (B, C_out, h, w)
        h = group_norm_silu(h, self.out_layers[0], shift=self.emb_layers(emb))
        return self.skip_connection(x) + self.out_layers[3](self.out_layers[2](h))


class Downsample(nn.Module):
    """Halves height and width with a stride-2 3x3 conv (`op`)."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels if out_channels is None else out_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Doubles height and width: nearest-neighbour upsampling, then a 3x3 conv (`conv`)."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels if out_channels is None else out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers where ResBlocks also get the timestep embedding and transformers the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _per_level(value: int | Sequence[int], levels: int, what: str, minimum: int = 0) -> list[int]:
    values = [value] * levels if isinstance(value, int) else [int(v) for v in value]
    if len(values) != levels:
        raise ValueError(f"unet: {what} must be an int or one value per level ({levels}), got {values}")
    if any(v < minimum for v in values):
        raise ValueError(f"unet: {what} must be at least {minimum} at every level; got {value}")
    return values


class UNet(Denoiser):
    """The LDM UNet with spatial transformers and cross-attention (Rombach et al. 2022, Fig. 3).

    Arguments mirror the original `UNetModel`. `attention_resolutions` lists the downsampling rates
    (1, 2, 4, ...) at which a SpatialTransformer follows each ResBlock; exactly one of `num_heads`
    and `num_head_channels` is set. `vector_dim` is the original's `adm_in_channels` with
    `num_classes="sequential"` (an MLP embedding added to the time embedding, as in SD x4-upscaler
    and SDXL). `concat_channels` of `in_channels` are taken by `cond["concat"]`, concatenated to x.
    `dropout` applies inside the ResBlocks only, as in the original. `attention_positions` (not in the original)
    tells every spatial transformer where its tokens lie (`latentgen.nn.grid_positions`), which prompts that place
    objects ("a red circle left of a blue star") need; it adds `positions.proj` to each transformer's keys.
    `patch_size` p (not in the original) folds each p x p block of latent pixels into channels before the first
    convolution and unfolds the output the same way (pixel unshuffle / shuffle), so that the network works at 1/p
    of the latent resolution, as Hoogeboom et al. 2023 ("simple diffusion", Sec. 3.3) do in pixel space: a codec
    with a small factor keeps small objects, and the UNet costs what it would on a codec with a p times larger one.

    Not supported (unused by Stable Diffusion v1/v2): `use_scale_shift_norm`, `resblock_updown`,
    `conv_resample=False`, `num_heads_upsample`, `disable_self_attentions`, integer `num_classes`,
    the non-transformer `AttentionBlock` path, 1D/3D convolutions.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        num_res_blocks: int | Sequence[int] = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_heads: int = -1,
        num_head_channels: int = -1,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | None = None,
        use_linear_in_transformer: bool = False,
        vector_dim: int | None = None,
        concat_channels: int = 0,
        dropout: float = 0.0,
        norm_groups: int = 32,
        num_attention_blocks: Sequence[int] | None = None,
        legacy: bool = False,
        attention_positions: bool = False,
        patch_size: int = 1,
    ) -> None:
        super().__init__()
        context_dim = _one_context_dim(context_dim)
        _check_options(in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                       context_dim=context_dim, vector_dim=vector_dim, norm_groups=norm_groups,
                       channel_mult=channel_mult, dropout=dropout, num_heads=num_heads,
                       num_head_channels=num_head_channels, concat_channels=concat_channels)
        if not isinstance(attention_positions, bool):
            raise ValueError(f"unet: attention_positions must be true or false; got {attention_positions!r}")
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"unet: patch_size must be a positive integer (1: no patches); got {patch_size!r}")
        levels = len(channel_mult)
        res_blocks = _per_level(num_res_blocks, levels, "num_res_blocks", minimum=1)
        depths = _per_level(transformer_depth, levels, "transformer_depth")
        if num_attention_blocks is not None:
            num_attention_blocks = _per_level(num_attention_blocks, levels, "num_attention_blocks")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.context_dim = context_dim
        self.vector_dim = vector_dim
        self.concat_channels = concat_channels
        self.patch_size = patch_size
        self.latent_size_multiple = patch_size * 2 ** (levels - 1)
        self.model_channels = model_channels

        def head_layout(channels: int) -> tuple[int, int]:
            # The original's rule, including its `legacy` branch (only differs when channels is not a
            # multiple of num_head_channels).
            if num_head_channels == -1:
                heads, dim_head = num_heads, channels // num_heads
            else:
                heads, dim_head = channels // num_head_channels, num_head_channels
            if legacy:
                dim_head = channels // heads
            return heads, dim_head

        def transformer(channels: int, depth: int) -> SpatialTransformer:
            heads, dim_head = head_layout(channels)
            return SpatialTransformer(
                channels,
                heads,
                dim_head,
                depth=depth,
                context_dim=context_dim,
                use_linear=use_linear_in_transformer,
                norm_groups=norm_groups,
                positions=attention_positions,
            )

        def res_block(channels: int, out: int) -> ResBlock:
            return ResBlock(channels, time_embed_dim, dropout, out_channels=out, norm_groups=norm_groups)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if vector_dim is not None:
            # Nested Sequential: the original's key layout is `label_emb.0.{0,2}`.
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(vector_dim, time_embed_dim),
                    nn.SiLU(),
                    nn.Linear(time_embed_dim, time_embed_dim),
                )
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels * patch_size**2, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        channels = model_channels
        rate = 1  # downsampling rate of the current level
        for level, mult in enumerate(channel_mult):
            for block in range(res_blocks[level]):
                layers: list[nn.Module] = [res_block(channels, mult * model_channels)]
                channels = mult * model_channels
                if rate in attention_resolutions and (
                    num_attention_blocks is None or block < num_attention_blocks[level]
                ):
                    layers.append(transformer(channels, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(channels)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(channels)))
                skip_channels.append(channels)
                rate *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(channels, channels),
            transformer(channels, depths[-1]),
            res_block(channels, channels),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for block in range(res_blocks[level] + 1):
                layers = [res_block(channels + skip_channels.pop(), mult * model_channels)]
                channels = mult * model_channels
                if rate in attention_resolutions and (
                    num_attention_blocks is None or block < num_attention_blocks[level]
                ):
                    layers.append(transformer(channels, depths[level]))
                if level and block == res_blocks[level]:
                    layers.append(Upsample(channels))
                    rate //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(norm_groups, channels),
            nn.SiLU(),
            nn.Conv2d(model_channels, out_channels * patch_size**2, 3, padding=1),
        )
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)
        # Residual sources (a ControlNet adapter adds one): source(x, t, cond) -> one tensor per skip connection
        # and one for the middle block's output, added there (Zhang et al. 2023, Fig. 3), or None to add nothing.
        self.residual_sources: list = []
        # Feature cache (a DeepCache adapter sets one; None = off): `lookup(x, t, cond) -> (depth, deep)`. With `deep` a
        # tensor the call runs only input_blocks[:depth] and output_blocks[K - depth:], `deep` taking the place of
        # output_blocks[K - depth]'s input h (K blocks each side); with `deep` None it runs everything and hands that
        # h to `store(h)` (Ma et al. 2024, "DeepCache", Sec. 3.2).
        self.feature_cache = None
        # Training option (not a build parameter): recompute each block in the backward pass instead of storing its
        # activations (Chen et al. 2016), for fine-tuning on little memory.
        self.gradient_checkpointing = False

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x (B, C, h, w), t () or (B,), cond {"crossattn": (B, L, D), "vector": (B, V), "concat":
        (B, C', h, w)} as built -> (B, out_channels, h, w) in x's dtype."""
        cond = {} if cond is None else cond
        t = check_denoiser_inputs(self, x, t, cond, f"the UNet downsamples {self.latent_size_multiple}x" + (
            f", {self.patch_size}x of it by folding patches" if self.patch_size > 1 else ""))
        dtype = self.time_embed[0].weight.dtype  # compute in the parameters' dtype

        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))  # (B, E)
        if self.vector_dim is not None:
            emb = emb + self.label_emb(cond["vector"].to(dtype))  # (B, E)
        context = cond["crossattn"].to(dtype) if self.context_dim is not None else None  # (B, L, D)

        h = x.to(dtype)
        if self.concat_channels:
            h = torch.cat([h, cond["concat"].to(dtype)], dim=1)  # (B, in_channels, h, w)
        if self.patch_size > 1:
            h = F.pixel_unshuffle(h, self.patch_size)  # (B, in_channels * p^2, h / p, w / p)
        residuals = [found for source in self.residual_sources if (found := source(x, t, cond)) is not None]
        run = self._checkpointed if self.gradient_checkpointing and self.training and torch.is_grad_enabled() \
            else (lambda block, *args: block(*args))
        cache = self.feature_cache
        depth, deep = (0, None) if cache is None else cache.lookup(x, t, cond)
        count = len(self.input_blocks)
        skips = []
        for block in self.input_blocks if deep is None else self.input_blocks[:depth]:
            h = run(block, h, emb, context)
            skips.append(h)
        if deep is None:
            h = run(self.middle_block, h, emb, context)
        if residuals:
            *to_skips, to_middle = (sum(parts) for parts in zip(*residuals))
            if deep is None:
                h = h + to_middle.to(dtype)
            skips = [skip + residual.to(dtype) for skip, residual in zip(skips, to_skips)]  # the skips used
        if deep is not None:
            h = deep
        for index in range(count - len(skips), count):
            if cache is not None and deep is None and index == count - depth:
                cache.store(h)
            h = run(self.output_blocks[index], torch.cat([h, skips.pop()], dim=1), emb, context)
        out = self.out[2](group_norm_silu(h, self.out[0]))  # self.out: norm, SiLU, conv
        if self.patch_size > 1:
            out = F.pixel_shuffle(out, self.patch_size)  # (B, out_channels, h, w)
        return out.to(x.dtype)

    @staticmethod
    def _checkpointed(block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


def _one_context_dim(context_dim: int | Sequence[int] | None) -> int | None:
    """The original also takes a list, one width per transformer layer (the SDXL refiner's [1280] * 4); every
    file it released has them equal, which is the one width this UNet builds."""
    if isinstance(context_dim, (list, tuple)):
        if not context_dim or len(set(context_dim)) != 1:
            raise ValueError(f"unet: context_dim as a list must repeat one width (one per transformer layer, as the "
                             f"original's); got {list(context_dim)}")
        return context_dim[0]
    return context_dim


def _check_options(channel_mult: Sequence[int], dropout: float, num_heads: int, num_head_channels: int,
                   concat_channels: int, **sizes: int | None) -> None:
    """Refuse UNet options it cannot be built with, naming the option (None allowed for the optional widths)."""
    for name, value in sizes.items():
        if value is None and name in ("context_dim", "vector_dim"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"unet: {name} must be a positive integer; got {value!r}")
    if not channel_mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in channel_mult):
        raise ValueError(f"unet: channel_mult must be a non-empty list of positive integers; got {list(channel_mult)}")
    if not 0 <= dropout < 1:
        raise ValueError(f"unet: dropout must be in [0, 1); got {dropout}")
    if (num_heads == -1) == (num_head_channels == -1):
        raise ValueError(f"unet: set exactly one of num_heads and num_head_channels, got num_heads={num_heads}, "
                         f"num_head_channels={num_head_channels}")
    if not 0 <= concat_channels < sizes["in_channels"]:
        raise ValueError(f"unet: concat_channels must be in [0, in_channels={sizes['in_channels']}), got {concat_channels}")
