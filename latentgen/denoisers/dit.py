"""The Diffusion Transformer denoiser (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

A latent (B, C, h, w) is cut into p x p patches, each embedded as a token (timm's PatchEmbed) plus a
fixed 2-D sin-cos position embedding; `depth` adaLN-Zero blocks (latentgen.nn.adaln_zero) conditioned
on the timestep embedding (plus the projected `cond["vector"]`) process the tokens, optionally
cross-attending to `cond["crossattn"]` (PixArt-alpha's text conditioning); a final adaLN layer and a
linear map turn each token back into a patch. Parameter names follow the original `models.py`.

Deviations from the original, on purpose: class labels are not embedded here but arrive as
`cond["vector"]` from a conditioner (the class_label conditioner holds the embedding table and the
null class for classifier-free guidance); there is no `learn_sigma` (the pipeline trains eps, v or x0
prediction with a fixed variance: set `out_channels` to the latent channels); the position
embedding is computed for the grid of each input instead of being a buffer of fixed size, so any
latent whose sides are multiples of the patch size works.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Mapping

import torch
from timm.layers import PatchEmbed
from torch import nn

from latentgen.contracts import Denoiser
from latentgen.denoisers.inputs import check_denoiser_inputs
from latentgen.nn.adaln_zero import DiTBlock, FinalLayer, xavier_init_linears
from latentgen.nn.patches import unpatchify
from latentgen.nn.position_embedding import sincos_position_embedding_2d
from latentgen.nn.timestep_embedding import timestep_embedding


@lru_cache(maxsize=16)
def _position_embedding(grid_height: int, grid_width: int, dim: int) -> torch.Tensor:
    # Read-only by every caller: the same grid recurs at every step.
    return sincos_position_embedding_2d(grid_height, grid_width, dim)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t (latentgen.nn.timestep_embedding) followed by DiT's two-layer MLP: (B,) -> (B, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        for layer in (self.mlp[0], self.mlp[2]):  # the original's normal(0.02) initialisation
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class DiT(Denoiser):
    """Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023, Fig. 3), class/vector, text and concat conditioning.

    The paper's sizes (depth / hidden_size / num_heads): S 12/384/6, B 12/768/12, L 24/1024/16,
    XL 28/1152/16, each with patch_size 2, 4 or 8 (conf/denoiser/dit_*.yaml).

    - `vector_dim`: width of `cond["vector"]` (e.g. a class-label embedding), mapped by an MLP and
      added to the timestep embedding, which conditions every block through adaLN.
    - `context_dim`: width of `cond["crossattn"]` (B, L, D); each block gets a cross-attention layer.
    - `concat_channels`: channels of `cond["concat"]`, appended to x before patchifying; they are
      part of `in_channels`.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        vector_dim: int | None = None,
        concat_channels: int = 0,
        frequency_embedding_size: int = 256,
    ) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"dit: patch_size must be at least 1, got {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"dit: hidden_size {hidden_size} must be a multiple of num_heads {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"dit: hidden_size must be a multiple of 4 (the 2-D sin-cos position embedding), "
                             f"got {hidden_size}")
        if not 0 <= concat_channels < in_channels:
            raise ValueError(f"dit: concat_channels must be in [0, in_channels={in_channels}), got {concat_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.context_dim = context_dim
        self.vector_dim = vector_dim
        self.concat_channels = concat_channels
        self.latent_size_multiple = patch_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size

        # img_size=None: the grid is whatever the input's is (sides checked against the patch in forward).
        self.x_embedder = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_channels,
                                     embed_dim=hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_embedding_size)
        if vector_dim is not None:
            self.vector_embedder = nn.Sequential(
                nn.Linear(vector_dim, hidden_size),
                nn.SiLU(),
                nn.Linear(hidden_size, hidden_size),
            )
            xavier_init_linears(self.vector_embedder)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim=context_dim) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        # The original initialises the patch embedding like a linear layer over flattened patches.
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x (B, C, h, w), t () or (B,), cond {"crossattn": (B, L, D), "vector": (B, V), "concat":
        (B, C', h, w)} as built -> (B, out_channels, h, w) in x's dtype."""
        cond = {} if cond is None else cond
        t = check_denoiser_inputs(self, x, t, cond, f"the DiT cuts it into {self.patch_size}x{self.patch_size} patches")
        dtype = self.x_embedder.proj.weight.dtype  # compute in the parameters' dtype
        grid_height, grid_width = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size

        h = x.to(dtype)
        if self.concat_channels:
            h = torch.cat([h, cond["concat"].to(dtype)], dim=1)  # (B, in_channels, h, w)
        position = _position_embedding(grid_height, grid_width, self.hidden_size)
        tokens = self.x_embedder(h) + position.to(device=x.device, dtype=dtype)  # (B, T, D), T = h * w / p^2
        c = self.t_embedder(t)  # (B, D)
        if self.vector_dim is not None:
            c = c + self.vector_embedder(cond["vector"].to(dtype))  # (B, D)
        context = cond["crossattn"].to(dtype) if self.context_dim is not None else None  # (B, L, D_context)
        for block in self.blocks:
            tokens = block(tokens, c, context)  # (B, T, D)
        patches = self.final_layer(tokens, c)  # (B, T, p * p * out_channels)
        return unpatchify(patches, self.patch_size, grid_height, grid_width).to(x.dtype)
