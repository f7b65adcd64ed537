"""CLIP's text transformer (Radford et al. 2021, CLIP) in the parameter layout Stable Diffusion v1
checkpoints store under `cond_stage_model.transformer.*`.

Module names follow that layout exactly so that a checkpoint's tensors load with `strict=True` once the
prefix is stripped. No `position_ids` buffer is saved: positions are an `arange` of the sequence
length (some checkpoints carry such a buffer; the checkpoint loader drops it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN_ACTS = ("quick_gelu", "gelu")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU used by OpenAI's CLIP (Hendrycks and Gimpel 2016, sec. 2)."""
    return x * torch.sigmoid(1.702 * x)


def activation(name: str):
    """"quick_gelu" or "gelu" (exact, erf) -> the function."""
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return F.gelu
    raise ValueError(f"CLIP text transformer: unknown hidden_act '{name}'; valid values: {', '.join(HIDDEN_ACTS)}")


def check_layer_index(layer: int, num_layers: int, owner: str) -> int:
    """A Python index into `num_layers` blocks (-1 = last) -> the number of blocks to run."""
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"{owner}: layer {layer} is out of range for {num_layers} blocks "
                         f"(valid: {-num_layers}..{num_layers - 1})")
    return layer % num_layers + 1


class CLIPEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_position_embeddings, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, D)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        batch, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, H, L, D/H)
            return t.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.act = activation(hidden_act)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, hidden_act: str, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(hidden_size, num_heads)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, hidden_act)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of blocks (`encoder.layers.{i}`)."""

    def __init__(self, num_layers: int, **block: object):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(**block) for _ in range(num_layers))


class CLIPTextTransformer(nn.Module):
    """CLIP text tower (Radford et al. 2021): token ids (B, L) -> hidden states (B, L, hidden_size).

    Defaults are CLIP ViT-L/14's text tower, the one Stable Diffusion v1 uses.
    """

    def __init__(self, vocab_size: int = 49408, hidden_size: int = 768, intermediate_size: int = 3072,
                 num_hidden_layers: int = 12, num_attention_heads: int = 12, max_position_embeddings: int = 77,
                 hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5):
        super().__init__()
        if hidden_size % num_attention_heads:
            raise ValueError(f"CLIP text transformer: hidden_size {hidden_size} is not divisible by "
                             f"num_attention_heads {num_attention_heads}")
        activation(hidden_act)  # validates the name
        self.max_position_embeddings = max_position_embeddings
        self.embeddings = CLIPEmbeddings(vocab_size, hidden_size, max_position_embeddings)
        self.encoder = CLIPEncoder(num_hidden_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                   num_heads=num_attention_heads, hidden_act=hidden_act, eps=layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CLIP's initialization: small embeddings, projections scaled down with depth."""
        width, depth = self.final_layer_norm.normalized_shape[0], len(self.encoder.layers)
        nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)
        for block in self.encoder.layers:
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                nn.init.normal_(proj.weight, std=width ** -0.5)
            nn.init.normal_(block.self_attn.out_proj.weight, std=width ** -0.5 * (2 * depth) ** -0.5)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=width ** -0.5 * (2 * depth) ** -0.5)
            for linear in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                           block.self_attn.out_proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(linear.bias)

    def forward(self, input_ids: torch.Tensor, layer: int = -1, return_last: bool = False):
        """Hidden state (B, L, D) after block `layer` (-1 last, -2 penultimate), before `final_layer_norm`; with
        `return_last`, (that state, the last block's output) from one pass."""
        if input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(f"CLIP text transformer: {input_ids.shape[1]} tokens exceed the "
                             f"{self.max_position_embeddings} positions")
        count = check_layer_index(layer, len(self.encoder.layers), "CLIP text transformer")
        x = self.embeddings(input_ids)  # (B, L, D)
        blocks = self.encoder.layers
        for index, block in enumerate(blocks if return_last else blocks[:count]):
            x = block(x)
            if index + 1 == count:
                chosen = x
        return (chosen, x) if return_last else x
