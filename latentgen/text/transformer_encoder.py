"""A small pre-norm transformer text encoder (Vaswani et al. 2017) trained from scratch with the model."""

from __future__ import annotations

import torch
from torch import nn

from latentgen.nn.attention import Attention


class EncoderBlock(nn.Module):
    """Pre-norm self-attention and MLP, each residual."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads=num_heads, dim_head=width // num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerTextEncoder(nn.Module):
    """Token ids (B, L) -> final-layer-normed hidden states (B, L, width)."""

    def __init__(self, vocab_size: int, max_length: int, width: int = 64, num_layers: int = 2,
                 num_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"text encoder width ({width}) must be divisible by num_heads ({num_heads})")
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(max_length, width) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(width, num_heads, dropout=dropout) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]  # (B, L, D)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)
