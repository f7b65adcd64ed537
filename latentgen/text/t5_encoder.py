"""The T5 v1.1 encoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer"; v1.1: gated GELU feed-forward, no dropout here, untied head), the third text tower
of Stable Diffusion 3 / 3.5 (T5-XXL: d_model 4096, 24 layers, 64 heads of 64, d_ff 10240).

Parameter names follow transformers' `T5EncoderModel` (`shared`, `encoder.block.N.layer.0.SelfAttention.{q,k,
v,o}`, `layer.0.layer_norm`, `layer.1.DenseReluDense.{wi_0,wi_1,wo}`, `layer.1.layer_norm`,
`encoder.final_layer_norm`), which is how SD3 single files store it (`text_encoders.t5xxl.transformer.*`), so
their tensors load as they are. What makes T5 T5, each written here from the paper and checked against
../shared/golden/sd35-tiny-io.safetensors:

- RMS layer norm without mean subtraction or bias, computed in float32 (eps 1e-6);
- attention logits not scaled by 1/sqrt(d_kv);
- one learned relative-position bias per head, over 32 log-spaced buckets of the key - query distance
  (bidirectional: half the buckets for each sign; exact below 8, logarithmic up to 128), held by block 0
  and added in every layer;
- feed-forward wo(gelu_tanh(wi_0 x) * wi_1 x).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from latentgen.nn.normalization import RMSNorm


def relative_position_bucket(relative: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """The bucket of each key - query distance, bidirectional: half the buckets for keys after the query; within a
    half, distances below num_buckets/4 get a bucket each, larger ones share log-spaced buckets up to max_distance."""
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    far = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return buckets + torch.where(distance < exact, distance, far)


class T5Attention(nn.Module):
    """Multi-head self-attention without biases or logit scaling; block 0's holds the relative-position bias."""

    def __init__(self, d_model: int, heads: int, d_kv: int, has_bias: bool, num_buckets: int, max_distance: int):
        super().__init__()
        inner = heads * d_kv
        self.heads, self.d_kv, self.num_buckets, self.max_distance = heads, d_kv, num_buckets, max_distance
        self.q, self.k, self.v = (nn.Linear(d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """(1, heads, L, L) additive bias for a sequence of `length` tokens."""
        positions = torch.arange(length, device=device)
        relative = positions[None, :] - positions[:, None]  # key - query
        buckets = relative_position_bucket(relative, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        batch, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, self.d_kv).transpose(1, 2)  # (B, H, L, d_kv)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # T5: no 1/sqrt(d)
        return self.o(out.transpose(1, 2).reshape(batch, length, self.heads * self.d_kv))


class _AttentionLayer(nn.Module):
    def __init__(self, d_model: int, eps: float, **attention):
        super().__init__()
        self.SelfAttention = T5Attention(d_model, **attention)
        self.layer_norm = RMSNorm(d_model, eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class _GatedFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class _FeedForwardLayer(nn.Module):
    def __init__(self, d_model: int, d_ff: int, eps: float):
        super().__init__()
        self.DenseReluDense = _GatedFeedForward(d_model, d_ff)
        self.layer_norm = RMSNorm(d_model, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, d_model: int, d_ff: int, eps: float, **attention):
        super().__init__()
        self.layer = nn.ModuleList([_AttentionLayer(d_model, eps, **attention), _FeedForwardLayer(d_model, d_ff, eps)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias))


class _Stack(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, d_ff: int, num_layers: int, heads: int, d_kv: int, eps: float,
                 num_buckets: int, max_distance: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.block = nn.ModuleList(
            T5Block(d_model, d_ff, eps, heads=heads, d_kv=d_kv, has_bias=index == 0, num_buckets=num_buckets,
                    max_distance=max_distance) for index in range(num_layers))
        self.final_layer_norm = RMSNorm(d_model, eps)


class T5Encoder(nn.Module):
    """Token ids (B, L) -> final-normed hidden states (B, L, d_model). No attention mask: SD3 attends to the
    padding too. Defaults: T5 v1.1 XXL."""

    def __init__(self, vocab_size: int = 32128, d_model: int = 4096, d_ff: int = 10240, num_layers: int = 24,
                 num_heads: int = 64, d_kv: int = 64, eps: float = 1e-6, num_buckets: int = 32,
                 max_distance: int = 128):
        super().__init__()
        self.encoder = _Stack(vocab_size, d_model, d_ff, num_layers, num_heads, d_kv, eps, num_buckets, max_distance)
        self.shared = self.encoder.embed_tokens  # one tensor under both names, as in the released files

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        stack = self.encoder
        x = stack.embed_tokens(input_ids)
        bias = stack.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1], input_ids.device)
        for block in stack.block:
            x = block(x, bias)
        return stack.final_layer_norm(x)
