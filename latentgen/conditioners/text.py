"""A small trainable text conditioner: hashed word tokens and a transformer encoder."""

from __future__ import annotations

from typing import Sequence

from latentgen.contracts import Conditioner
from latentgen.text.hash_tokenizer import HashWordTokenizer
from latentgen.text.transformer_encoder import TransformerTextEncoder


class TextConditioner(Conditioner):
    """Prompts (list[str]) -> "crossattn" (B, max_length, context_dim); the empty prompt is unconditional.

    Needs no download: the tokenizer hashes words, the encoder is trained with the denoiser.
    """

    def __init__(self, context_dim: int = 64, num_layers: int = 2, num_heads: int = 4, vocab_size: int = 4096,
                 max_length: int = 16, dropout: float = 0.1, input_key: str = "prompt"):
        super().__init__()
        self.context_dim = int(context_dim)
        self.dropout = float(dropout)
        self.input_keys = (input_key,)
        self.tokenizer = HashWordTokenizer(vocab_size, max_length)
        self.encoder = TransformerTextEncoder(vocab_size, max_length, context_dim, num_layers, num_heads)

    @property
    def outputs(self) -> dict[str, int]:
        return {"crossattn": self.context_dim}

    def tokenize(self, prompts: Sequence[str]):
        return self.tokenizer(prompts).to(self.device)

    def _prompts(self, batch) -> list[str]:
        self.check_inputs(batch)
        prompts = batch[self.input_keys[0]]
        if isinstance(prompts, str):
            prompts = [prompts]
        return list(prompts)

    def forward(self, batch):
        return {"crossattn": self.encoder(self.tokenize(self._prompts(batch)))}

    def unconditional(self, batch):
        return {"crossattn": self.encoder(self.tokenize([""] * len(self._prompts(batch))))}
