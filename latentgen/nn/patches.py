"""Cutting a latent into non-overlapping p x p patches and putting it back (Dosovitskiy et al. 2021; Peebles & Xie 2023)."""

from __future__ import annotations

import torch
from einops import rearrange


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C): row-major patches, each flattened as (p, p, C).

    The (p, p, C) order within a patch is the one DiT's final linear layer predicts, so `unpatchify`
    of a DiT output is its inverse.
    """
    height, width = x.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"patchify: height and width must be multiples of the patch size {patch_size}, "
                         f"got {height}x{width}")
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(tokens: torch.Tensor, patch_size: int, grid_height: int, grid_width: int) -> torch.Tensor:
    """(B, grid_height * grid_width, p * p * C) -> (B, C, grid_height * p, grid_width * p), inverse of `patchify`."""
    if tokens.shape[1] != grid_height * grid_width or tokens.shape[2] % (patch_size * patch_size):
        raise ValueError(
            f"unpatchify: expected tokens of shape (B, {grid_height} * {grid_width}, {patch_size}^2 * C), "
            f"got {tuple(tokens.shape)}"
        )
    return rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=grid_height, w=grid_width, p=patch_size,
                     q=patch_size)
