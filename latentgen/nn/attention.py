"""Attention layers of the LDM UNet (Rombach et al. 2022, Sec. 3.3): cross-attention, GEGLU feed-forward,
transformer block and the spatial transformer, with the original CompVis module and parameter names."""

from __future__ import annotations

import torch
from torch import nn

from latentgen.nn.blocked_attention import dot_product_attention
from latentgen.nn.grid_positions import GridPositions
from latentgen.nn.native_kernels import geglu
from latentgen.nn.normalization import GroupNorm32


class Attention(nn.Module):
    """Multi-head (cross-)attention, softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017), as LDM's `CrossAttention`.

    Queries come from x (B, N, query_dim); keys and values from `context` (B, L, context_dim), or from x
    itself when `context` is None (self-attention). Parameters: `to_q`, `to_k`, `to_v` (no bias unless
    `qkv_bias`) and `to_out.0` (with bias), followed by dropout `to_out.1`.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.query_dim = query_dim
        self.context_dim = query_dim if context_dim is None else context_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=qkv_bias)
        self.to_k = nn.Linear(self.context_dim, inner_dim, bias=qkv_bias)
        self.to_v = nn.Linear(self.context_dim, inner_dim, bias=qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, N, query_dim), context (B, L, context_dim) or None -> (B, N, query_dim).

        `attn_mask` is passed to `scaled_dot_product_attention`: boolean (True = attend) or additive,
        broadcastable to (B, heads, N, L); e.g. a causal mask for a text encoder.
        """
        context = x if context is None else context
        batch, n_queries, _ = x.shape
        q = self.to_q(x).view(batch, n_queries, self.heads, self.dim_head).transpose(1, 2)  # (B, H, N, d)
        k = self.to_k(context).view(batch, context.shape[1], self.heads, self.dim_head).transpose(1, 2)  # (B, H, L, d)
        v = self.to_v(context).view(batch, context.shape[1], self.heads, self.dim_head).transpose(1, 2)  # (B, H, L, d)
        # Attention in the input dtype; the softmax accumulates in float32 internally for bf16/fp16.
        out = dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(batch, n_queries, self.heads * self.dim_head)  # (B, N, H * d)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection, x W * GELU(x V) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return geglu(self.proj(x))  # value * GELU(gate), one pass in bf16 inference


class FeedForward(nn.Module):
    """Transformer MLP with a GEGLU input projection, as in LDM: `net.0.proj` (GEGLU), `net.1` dropout, `net.2`."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        self.net = nn.Sequential(
            GEGLU(dim, inner_dim),
            nn.Dropout(dropout),
            nn.Linear(inner_dim, dim if dim_out is None else dim_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block of LDM: self-attention, cross-attention to the context, GEGLU MLP.

    Deviation from the original: with `context_dim=None` the block has no `attn2`/`norm2` at all
    (self-attention and MLP only). The original still builds `attn2` and, without a context, runs it
    as a second self-attention; so an original checkpoint of an *unconditional* spatial transformer
    has extra `attn2`/`norm2` keys that this block does not take. Stable Diffusion always has a
    context, so its checkpoints are unaffected.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dim_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.attn1 = Attention(dim, heads=num_heads, dim_head=dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        if context_dim is not None:
            self.attn2 = Attention(dim, context_dim=context_dim, heads=num_heads, dim_head=dim_head, dropout=dropout)
            self.norm2 = nn.LayerNorm(dim)
        else:
            self.attn2 = None
            self.norm2 = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), context (B, L, context_dim) -> (B, N, dim)."""
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            if context is None:
                raise ValueError(
                    "BasicTransformerBlock: built with a context_dim, so forward needs a context (B, L, D)"
                )
            x = x + self.attn2(self.norm2(x), context=context)
        elif context is not None:
            raise ValueError("BasicTransformerBlock: built without context_dim (no cross-attention), got a context")
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, LDM's `SpatialTransformer` (Rombach et al. 2022, Sec. 3.3).

    GroupNorm, `proj_in` to heads * dim_head channels (1x1 conv, or a Linear over tokens when
    `use_linear`, the Stable Diffusion v2 layout), `depth` transformer blocks over the h * w tokens,
    `proj_out` back (zero-initialised, so the block starts as the identity), plus the input.
    The linear `proj_out` maps inner_dim -> in_channels (the original declares it the other way
    round, which only works because the two are equal in every released model).
    `positions` adds `GridPositions` to the tokens after `proj_in` (not in the original: its models must infer
    position from the convolutions' padding), so that cross-attention can bind words to places.
    """

    def __init__(
        self,
        in_channels: int,
        num_heads: int,
        dim_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_linear: bool = False,
        norm_groups: int = 32,
        positions: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = num_heads * dim_head
        self.use_linear = use_linear
        self.positions = GridPositions(inner_dim) if positions else None
        self.norm = GroupNorm32(norm_groups, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, num_heads, dim_head, dropout=dropout, context_dim=context_dim)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, h, w), context (B, L, D) or None -> (B, C, h, w)."""
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)  # (B, inner, h, w)
        h = h.flatten(2).transpose(1, 2)  # (B, h * w, C or inner)
        if self.use_linear:
            h = self.proj_in(h)  # (B, h * w, inner)
        if self.positions is not None:
            h = h + self.positions(height, width).to(h.dtype)
        for block in self.transformer_blocks:
            h = block(h, context=context)
        if self.use_linear:
            h = self.proj_out(h)  # (B, h * w, C)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)  # (B, C or inner, h, w)
        if not self.use_linear:
            h = self.proj_out(h)  # (B, C, h, w)
        return x + h
