"""adaLN-Zero transformer blocks of the Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion
Models with Transformers", Sec. 3.2), with optional cross-attention to a context (Chen et al. 2023, PixArt-alpha).

Self-attention and MLP come from timm (`timm.layers.Attention`, `timm.layers.Mlp`) with DiT's parameter
names, so a DiT block's state-dict keys are the original's (`norm1`, `attn.qkv`, `attn.proj`, `norm2`,
`mlp.fc1`, `mlp.fc2`, `adaLN_modulation.1`); cross-attention adds `norm_cross` and `cross_attn.*`.
"""

from __future__ import annotations

import torch
from timm.layers import Attention, Mlp
from torch import nn

from latentgen.nn.attention import Attention as CrossAttention


def xavier_init_linears(module: nn.Module) -> None:
    """DiT's basic initialisation: Xavier-uniform weights and zero biases for every nn.Linear in `module`."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer-norm affine, x * (1 + scale) + shift, for x (B, N, D) and shift, scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning on c (B, D), plus cross-attention when `context_dim` is set.

    The conditioning vector regresses shift, scale and gate for the self-attention and MLP branches.
    Its regression layer is zero-initialised, so every gate is 0 and a fresh block is the identity
    (adaLN-Zero). The cross-attention branch (pre-LayerNorm, then attention to the context, added
    ungated as in PixArt-alpha) has a zero-initialised output projection for the same reason.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"DiTBlock: hidden_size {hidden_size} must be a multiple of num_heads {num_heads}")
        # The norms carry no affine parameters of their own: adaLN supplies shift and scale.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.context_dim = context_dim
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, context_dim=context_dim, heads=num_heads,
                                             dim_head=hidden_size // num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        xavier_init_linears(self)
        zeroed = [self.adaLN_modulation[1]] + ([self.cross_attn.to_out[0]] if context_dim is not None else [])
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), c (B, D), context (B, L, context_dim) when built with one -> (B, N, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.context_dim is not None:
            if context is None:
                raise ValueError("DiTBlock: built with a context_dim, so forward needs a context (B, L, D)")
            x = x + self.cross_attn(self.norm_cross(x), context)
        elif context is not None:
            raise ValueError("DiTBlock: built without context_dim (no cross-attention), got a context")
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """DiT's output head: adaLN (shift, scale from c), then a linear map of each token to a p x p x C patch.

    Both the modulation and the linear layer are zero-initialised, so a fresh DiT outputs zeros.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        for layer in (self.linear, self.adaLN_modulation[1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), c (B, D) -> (B, N, p * p * out_channels)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
