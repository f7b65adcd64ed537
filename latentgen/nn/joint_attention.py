"""MMDiT's joint blocks (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis", Sec. 4 and Fig. 2; MMDiT-X's second, image-only attention from Stable Diffusion 3.5).

Text and image tokens keep separate weights (one `DismantledBlock` per stream: adaLN modulation from the
conditioning vector c, q/k/v, output projection, MLP) but attend jointly: the q, k and v of [context, x] are
concatenated along the sequence for one attention. Options of SD3.5: a per-head RMS norm on q and k (`ln_q`,
`ln_k`), a second attention over the image tokens alone (`attn2`, with its own shift, scale and gate), and
the last block's context stream being "pre-only" (q, k, v and nothing after: its output is not used).
Parameter names follow Stability AI's `mmditx.py`, so SD3 files load by prefix. adaLN chunk order:
(shift, scale, gate) for attention, then for the MLP, then attn2's; a pre-only block has (shift, scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from latentgen.nn.adaln_zero import modulate
from latentgen.nn.normalization import RMSNorm


class QKVAttention(nn.Module):
    """The q, k, v projection (with per-head RMS norm of q and k) and the output projection of one stream;
    the attention itself is computed where the streams meet (`attend`)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, pre_only: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:
            self.ln_q = RMSNorm(self.head_dim)
            self.ln_k = RMSNorm(self.head_dim)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def pre_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D) -> q, k, v, each (B, heads, L, head_dim)."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)  # (B, L, H, d)
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention, heads (B, H, L, d) -> (B, L, H * d)."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class DismantledBlock(nn.Module):
    """One stream of a joint block: adaLN-modulated attention inputs, then (unless pre-only) the gated
    residual attention output(s) and the modulated, gated MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 pre_only: bool = False, second_attention: bool = False):
        super().__init__()
        self.pre_only, self.second_attention = pre_only, second_attention
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = QKVAttention(dim, num_heads, qk_norm, pre_only)
        if second_attention:
            self.attn2 = QKVAttention(dim, num_heads, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        chunks = 2 if pre_only else 9 if second_attention else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """(q, k, v) for the joint attention, and what `post_attention` needs."""
        mods = self.adaLN_modulation(c).chunk(self.adaLN_modulation[1].out_features // x.shape[-1], dim=1)
        normed = self.norm1(x)
        qkv = self.attn.pre_attention(modulate(normed, mods[0], mods[1]))
        if self.pre_only:
            return qkv, None
        second = None
        if self.second_attention:  # attn2 reads the same norm1(x) with its own shift and scale
            second = attend(*self.attn2.pre_attention(modulate(normed, mods[6], mods[7])))
        return qkv, (x, mods, second)

    def post_attention(self, attended: torch.Tensor, saved) -> torch.Tensor:
        x, mods, second = saved
        shift_mlp, scale_mlp = mods[3], mods[4]
        x = x + mods[2][:, None] * self.attn.proj(attended)
        if second is not None:
            x = x + mods[8][:, None] * self.attn2.proj(second)
        return x + mods[5][:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Text (`context_block`) and image (`x_block`) streams attending jointly over [context, x]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 pre_only: bool = False, second_attention: bool = False):
        super().__init__()
        self.context_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, second_attention=second_attention)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """context (B, L, D), x (B, N, D), c (B, D) -> (context or None for a pre-only block, x)."""
        (cq, ck, cv), context_saved = self.context_block.pre_attention(context, c)
        (xq, xk, xv), x_saved = self.x_block.pre_attention(x, c)
        joint = attend(torch.cat([cq, xq], dim=2), torch.cat([ck, xk], dim=2), torch.cat([cv, xv], dim=2))
        length = context.shape[1]
        context_out = None if context_saved is None else \
            self.context_block.post_attention(joint[:, :length], context_saved)
        return context_out, self.x_block.post_attention(joint[:, length:], x_saved)
