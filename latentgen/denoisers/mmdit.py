"""The multimodal diffusion transformer (MMDiT; Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis"), the denoiser of Stable Diffusion 3 and 3.5, with SD3.5's MMDiT-X options.

Image latents are cut into p x p patches (`x_embedder`) plus a learned position table (`pos_embed`, a
max_size x max_size grid whose centre crop fits the input); the text context is projected to the model width
(`context_embedder`); the timestep (its sinusoid, `t_embedder`) plus the pooled text vector (`y_embedder`)
give the adaLN conditioning c; `depth` joint blocks (latentgen.nn.joint_attention) then a final adaLN layer
map each image token back to a patch. Parameter names are Stability AI's (`model.diffusion_model.*` of the
SD3 files). The reference sizes: hidden = 64 * depth and heads = depth (3.5 medium: depth 24, 1536 wide, attn2
in blocks 0-12, qk RMS norm, pos_embed max 384; large: depth 38, 2432 wide, no attn2).

`t` is the network's own noise-level input: for SD3's rectified flow, 1000 * sigma. `skip_layers` (forward
keyword) leaves those joint blocks out of both streams: the mechanics of skip-layer guidance.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from timm.layers import PatchEmbed
from torch import nn

from latentgen.contracts import Denoiser
from latentgen.denoisers.dit import TimestepEmbedder
from latentgen.denoisers.inputs import check_denoiser_inputs
from latentgen.nn.adaln_zero import FinalLayer
from latentgen.nn.joint_attention import JointBlock
from latentgen.nn.patches import unpatchify
from latentgen.nn.position_embedding import sincos_position_embedding_2d


class MMDiT(Denoiser):
    """MMDiT / MMDiT-X: joint text-image attention, adaLN-Zero from the timestep and pooled text, optional
    per-head q/k RMS norm and a second image-only attention in the blocks `dual_attention_layers`."""

    def __init__(self, in_channels: int = 16, out_channels: int = 16, patch_size: int = 2, depth: int = 24,
                 hidden_size: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0,
                 context_dim: int = 4096, vector_dim: int | None = 2048, pos_embed_max_size: int = 384,
                 qk_norm: bool = True, dual_attention_layers: Sequence[int] = ()):
        super().__init__()
        hidden_size = 64 * depth if hidden_size is None else int(hidden_size)
        num_heads = depth if num_heads is None else int(num_heads)
        if patch_size < 1 or depth < 1 or hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"mmdit: needs patch_size >= 1, depth >= 1 and hidden_size a multiple of num_heads and "
                             f"of 4; got patch_size={patch_size}, depth={depth}, hidden_size={hidden_size}, "
                             f"num_heads={num_heads}")
        if context_dim is None:
            raise ValueError("mmdit: attends jointly to text and image tokens, so it needs a context_dim (a conditioner "
                             "with cond 'crossattn', e.g. conditioner=text); for labels alone use denoiser=dit")
        bad = [index for index in dual_attention_layers if not 0 <= index < depth]
        if bad:
            raise ValueError(f"mmdit: dual_attention_layers {bad} are not blocks of a depth-{depth} model")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.context_dim, self.vector_dim = context_dim, vector_dim
        self.latent_size_multiple = self.patch_size = patch_size
        self.hidden_size, self.pos_embed_max_size = hidden_size, pos_embed_max_size

        self.x_embedder = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_channels,
                                     embed_dim=hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if vector_dim is not None:
            self.y_embedder = VectorEmbedder(vector_dim, hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        # A table (saved with the weights, as in the released files); sin-cos for a model trained from scratch.
        table = sincos_position_embedding_2d(pos_embed_max_size, pos_embed_max_size, hidden_size)
        self.register_buffer("pos_embed", table.reshape(1, pos_embed_max_size ** 2, hidden_size))
        self.joint_blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=index == depth - 1,
                       second_attention=index in set(dual_attention_layers)) for index in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        for block in self.joint_blocks:  # adaLN-Zero: every block starts as the identity
            for stream in (block.context_block, block.x_block):
                nn.init.zeros_(stream.adaLN_modulation[1].weight)
                nn.init.zeros_(stream.adaLN_modulation[1].bias)

    def cropped_pos_embed(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """The centre grid_height x grid_width crop of the position table, (1, h * w, D), row-major."""
        size = self.pos_embed_max_size
        if grid_height > size or grid_width > size:
            raise ValueError(f"mmdit: a {grid_height}x{grid_width} patch grid exceeds the position table's "
                             f"{size}x{size} (pos_embed_max_size); generate at most "
                             f"{size * self.patch_size} latent pixels per side")
        top, left = (size - grid_height) // 2, (size - grid_width) // 2
        table = self.pos_embed.reshape(1, size, size, -1)[:, top:top + grid_height, left:left + grid_width]
        return table.reshape(1, grid_height * grid_width, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None,
                skip_layers: Sequence[int] = ()) -> torch.Tensor:
        """x (B, C, h, w), t (B,) (1000 * sigma for SD3), cond {"crossattn": (B, L, context_dim), "vector":
        (B, vector_dim)} -> (B, out_channels, h, w): the raw output (a velocity for SD3), in x's dtype."""
        cond = {} if cond is None else cond
        t = check_denoiser_inputs(self, x, t, cond, f"the MMDiT cuts it into {self.patch_size}x{self.patch_size} "
                                                    f"patches")
        dtype = self.x_embedder.proj.weight.dtype
        grid_height, grid_width = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        tokens = self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(grid_height, grid_width).to(dtype)
        c = self.t_embedder(t)  # (B, D)
        if self.vector_dim is not None:
            c = c + self.y_embedder(cond["vector"].to(dtype))
        context = self.context_embedder(cond["crossattn"].to(dtype))  # (B, L, D)
        skipped = set(skip_layers)
        for index, block in enumerate(self.joint_blocks):
            if index not in skipped:
                context, tokens = block(context, tokens, c)
        patches = self.final_layer(tokens, c)  # (B, N, p * p * out_channels)
        return unpatchify(patches, self.patch_size, grid_height, grid_width).to(x.dtype)


class VectorEmbedder(nn.Module):
    """The pooled text vector's two-layer MLP, (B, V) -> (B, D) (`y_embedder.mlp.{0,2}`)."""

    def __init__(self, vector_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(vector_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
