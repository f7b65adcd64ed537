"""OpenCLIP's text tower (Ilharco et al. 2021, OpenCLIP; Cherti et al. 2023) in the parameter layout
Stable Diffusion v2 checkpoints store under `cond_stage_model.model.*`.

Same architecture as CLIP's text transformer (Radford et al. 2021) with other names: a fused q/k/v
projection (`attn.in_proj_weight`), `ln_1`/`ln_2`, `mlp.c_fc`/`mlp.c_proj`, `ln_final`, plus the
contrastive head (`text_projection`, `logit_scale`), which text conditioning does not use but which
checkpoints carry. Attention is written out here rather than through nn.MultiheadAttention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from latentgen.text.clip_text_model import activation, check_layer_index


class FusedSelfAttention(nn.Module):
    """Causal multi-head self-attention with one (3 * width, width) input projection, q then k then v."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def in_projection(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v of x, (B, L, 3D); a method of its own so that an unmerged LoRA can add to its rows."""
        return F.linear(x, self.in_proj_weight, self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        batch, length, width = x.shape
        qkv = self.in_projection(x)  # (B, L, 3D)
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, D/H)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    """c_fc -> activation -> c_proj."""

    def __init__(self, width: int, hidden: int, hidden_act: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.act = activation(hidden_act)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, hidden_act: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = FusedSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_width, hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The stack of blocks (`transformer.resblocks.{i}`)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, hidden_act: str):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_width, hidden_act)
                                       for _ in range(layers))


class OpenCLIPTextTower(nn.Module):
    """OpenCLIP text tower (Cherti et al. 2023): token ids (B, L) -> hidden states (B, L, width).

    Defaults are OpenCLIP ViT-H/14's text tower, the one Stable Diffusion v2 uses (GELU, exact erf).
    """

    def __init__(self, vocab_size: int = 49408, width: int = 1024, layers: int = 24, heads: int = 16,
                 mlp_ratio: float = 4.0, context_length: int = 77, embed_dim: int = 1024, hidden_act: str = "gelu"):
        super().__init__()
        if width % heads:
            raise ValueError(f"OpenCLIP text tower: width {width} is not divisible by heads {heads}")
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, round(width * mlp_ratio), hidden_act)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CLIP's initialization: small embeddings, projections scaled down with depth, temperature 0.07."""
        width, depth = self.positional_embedding.shape[1], len(self.transformer.resblocks)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=width ** -0.5 * (2 * depth) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=width ** -0.5 * (2 * depth) ** -0.5)
            for linear in (block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
                nn.init.zeros_(linear.bias)
        nn.init.normal_(self.text_projection, std=width ** -0.5)
        self.logit_scale.fill_(math.log(1 / 0.07))

    def forward(self, input_ids: torch.Tensor, layer: int = -1, return_last: bool = False):
        """Hidden state (B, L, width) after block `layer` (-1 last, -2 penultimate), before `ln_final`; with
        `return_last`, (that state, the last block's output) from one pass."""
        length = input_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"OpenCLIP text tower: {length} tokens exceed the context of {self.context_length}")
        count = check_layer_index(layer, len(self.transformer.resblocks), "OpenCLIP text tower")
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]  # (B, L, D)
        blocks = self.transformer.resblocks
        for index, block in enumerate(blocks if return_last else blocks[:count]):
            x = block(x)
            if index + 1 == count:
                chosen = x
        return (chosen, x) if return_last else x
