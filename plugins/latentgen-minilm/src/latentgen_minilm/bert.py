"""A BERT encoder (Devlin et al. 2019), inference only: embeddings and post-LN transformer layers.

Module and parameter names follow the original BERT checkpoints' (`embeddings.word_embeddings`,
`encoder.layer.N.attention.self.query`, ...) so that a BERT `model.safetensors`, e.g.
all-MiniLM-L6-v2's (Wang et al. 2020, "MiniLM"; Reimers and Gurevych 2019, "Sentence-BERT"), loads
with `load_state_dict(strict=True)`. There is no dropout: this encoder is only ever used frozen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "layer_norm_eps")


class BertEmbeddings(nn.Module):
    """Token + position + segment embeddings, layer-normed: ids (B, L) -> (B, L, D)."""

    def __init__(self, vocab_size: int, width: int, max_positions: int, type_vocab_size: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # One segment: every token has token type 0.
        embedded = (self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
                    + self.token_type_embeddings.weight[0])
        return self.LayerNorm(embedded)


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with a key padding mask."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        split = lambda t: t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))  # (B, H, L, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])  # (B, H, L, d)
        return out.transpose(1, 2).reshape(batch, length, width)


class BertSelfOutput(nn.Module):
    """Projection, then the residual and LayerNorm (post-LN)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertAttention(nn.Module):
    def __init__(self, width: int, heads: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(width, heads)
        self.output = BertSelfOutput(width, eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, key_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, width: int, intermediate_size: int):
        super().__init__()
        self.dense = nn.Linear(width, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # the exact (erf) GELU, BERT's "gelu"


class BertOutput(nn.Module):
    def __init__(self, width: int, intermediate_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(intermediate_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, width: int, heads: int, intermediate_size: int, eps: float):
        super().__init__()
        self.attention = BertAttention(width, heads, eps)
        self.intermediate = BertIntermediate(width, intermediate_size)
        self.output = BertOutput(width, intermediate_size, eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, key_mask)
        return self.output(self.intermediate(x), x)


class BertStack(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, intermediate_size: int, eps: float):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(width, heads, intermediate_size, eps) for _ in range(layers))


class BertEncoder(nn.Module):
    """Token ids (B, L) and attention mask (B, L) -> last hidden states (B, L, hidden_size).

    Padded positions (mask False) are never attended to, so real tokens' states do not depend on
    padding; the padded positions' own states are whatever BERT computes there (callers mask them).
    """

    def __init__(self, vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, max_position_embeddings: int = 512, type_vocab_size: int = 2,
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        if hidden_size % num_attention_heads:
            raise ValueError(f"BERT hidden_size {hidden_size} must be divisible by num_attention_heads "
                             f"{num_attention_heads}")
        self.hidden_size = hidden_size
        self.max_positions = max_position_embeddings
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
                                         layer_norm_eps)
        self.encoder = BertStack(num_hidden_layers, hidden_size, num_attention_heads, intermediate_size,
                                 layer_norm_eps)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "BertEncoder":
        """From a BERT config.json; refuses settings this implementation does not reproduce."""
        unsupported = {key: config[key] for key, value in (("hidden_act", "gelu"),
                                                           ("position_embedding_type", "absolute"))
                       if config.get(key, value) != value}
        if unsupported:
            raise ValueError(f"BERT config has {unsupported}; this encoder implements hidden_act 'gelu' and "
                             f"position_embedding_type 'absolute' only")
        missing = [key for key in _CONFIG_KEYS[:5] if key not in config]
        if missing:
            raise ValueError(f"BERT config lacks {missing}; is it a BERT config.json?")
        return cls(**{key: config[key] for key in _CONFIG_KEYS if key in config})

    @classmethod
    def pretrained(cls, config: Mapping[str, Any], weights_path: str | Path) -> "BertEncoder":
        """The encoder of a BERT config.json with the weights of its model.safetensors. The modules are
        made on the meta device and take the file's tensors as they are: no random init, no copy."""
        with torch.device("meta"):
            encoder = cls.from_config(config)
        return encoder.load_weights(weights_path)

    def load_weights(self, path: str | Path) -> "BertEncoder":
        """Take the weights of a BERT model.safetensors (keys with or without a `bert.` prefix; pooler
        and task heads ignored). The tensors are shared with other encoders loaded from the same file
        in this process: they are read once, and a frozen encoder never writes to them."""
        state = _read_encoder_weights(Path(path))
        own = self.state_dict()
        missing = [key for key in own if key not in state]
        mismatched = [f"{key}: file {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
                      for key in own if key in state and state[key].shape != own[key].shape]
        if missing or mismatched:
            raise ValueError(f"BERT weights '{path}' do not fit config.json: missing {missing[:3]}, "
                             f"other shape {mismatched[:3]}")
        self.load_state_dict({key: state[key] for key in own}, strict=True, assign=True)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.max_positions:
            raise ValueError(f"BERT encodes at most {self.max_positions} tokens; got {input_ids.shape[1]}")
        key_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        x = self.embeddings(input_ids)  # (B, L, D)
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        return x


_weights: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}  # (path, size, mtime) -> tensors


def _read_encoder_weights(path: Path) -> dict[str, torch.Tensor]:
    """The embeddings.* and encoder.* tensors of a BERT safetensors file, read once per process."""
    from safetensors.torch import load_file

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _weights:
        state = {}
        for name, value in load_file(str(path)).items():
            name = name.removeprefix("bert.")
            if name.startswith(("embeddings.", "encoder.")) and name != "embeddings.position_ids":
                state[name] = value
        _weights[key] = state
    return _weights[key]
