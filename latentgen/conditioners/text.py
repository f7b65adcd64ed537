"""A small trainable text conditioner: hashed word tokens and a transformer encoder."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from latentgen.contracts import Conditioner
from latentgen.text.hash_tokenizer import HashWordTokenizer
from latentgen.text.transformer_encoder import TransformerTextEncoder


class TextConditioner(Conditioner):
    """Prompts (list[str]) -> "crossattn" (B, max_length, context_dim); the empty prompt is unconditional.

    Needs no download: the tokenizer hashes words, the encoder is trained with the denoiser. With
    `vector_dim`, also "vector" (B, vector_dim): the mean of the prompt's token states (padding left out),
    projected, which the denoiser adds to its time embedding (as SDXL and SD3 add their pooled text): every
    block then hears the prompt, not only the cross-attention layers.
    """

    def __init__(self, context_dim: int = 64, num_layers: int = 2, num_heads: int = 4, vocab_size: int = 4096,
                 max_length: int = 16, dropout: float = 0.1, input_key: str = "prompt",
                 vector_dim: int | None = None):
        super().__init__()
        self.context_dim = int(context_dim)
        self.dropout = float(dropout)
        self.input_keys = (input_key,)
        self.tokenizer = HashWordTokenizer(vocab_size, max_length)
        self.encoder = TransformerTextEncoder(vocab_size, max_length, context_dim, num_layers, num_heads)
        bad_width = isinstance(vector_dim, bool) or not isinstance(vector_dim, int) or vector_dim < 1
        if vector_dim is not None and bad_width:
            raise ValueError(f"text conditioner vector_dim must be a positive integer (the pooled prompt's width) or "
                             f"null (no pooled prompt); got {vector_dim!r}")
        self.vector_dim = vector_dim
        self.pool = None if vector_dim is None else nn.Linear(self.context_dim, self.vector_dim)

    @property
    def outputs(self) -> dict[str, int]:
        widths = {"crossattn": self.context_dim}
        if self.vector_dim is not None:
            widths["vector"] = self.vector_dim
        return widths

    def tokenize(self, prompts: Sequence[str]):
        return self.tokenizer(prompts).to(self.device)

    def _prompts(self, batch) -> list[str]:
        self.check_inputs(batch)
        prompts = batch[self.input_keys[0]]
        if isinstance(prompts, str):
            prompts = [prompts]
        return list(prompts)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenize(prompts)
        states = self.encoder(ids)  # (B, L, D)
        out = {"crossattn": states}
        if self.pool is not None:
            kept = (ids != self.tokenizer.pad_id).unsqueeze(-1).to(states.dtype)  # (B, L, 1)
            out["vector"] = self.pool((states * kept).sum(1) / kept.sum(1))
        return out

    def forward(self, batch):
        return self._encode(self._prompts(batch))

    def unconditional(self, batch):
        return self._encode([""] * len(self._prompts(batch)))
