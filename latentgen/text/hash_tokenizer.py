"""Word tokenizer by feature hashing (Weinberger et al. 2009): any text, no vocabulary file."""

from __future__ import annotations

import re
import zlib
from typing import Sequence

import torch

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class HashWordTokenizer:
    """Lower-cased words and punctuation, each mapped to a bucket by CRC-32 (stable across runs).

    Ids: 0 padding, 1 start, 2 end, 3..vocab_size-1 words. Collisions are rare for the small
    vocabularies of captions and are resolved by the encoder's context. Output (B, max_length).
    """

    pad_id, bos_id, eos_id = 0, 1, 2
    num_special = 3

    def __init__(self, vocab_size: int = 4096, max_length: int = 16):
        if vocab_size <= self.num_special:
            raise ValueError(f"vocab_size must exceed {self.num_special}; got {vocab_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (start and end tokens); got {max_length}")
        self.vocab_size = vocab_size
        self.max_length = max_length

    def words(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def word_id(self, word: str) -> int:
        return self.num_special + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - self.num_special)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"prompts must be strings; got {type(text).__name__} at position {row}")
            tokens = [self.word_id(w) for w in self.words(text)][: self.max_length - 2]
            sequence = [self.bos_id, *tokens, self.eos_id]
            ids[row, : len(sequence)] = torch.tensor(sequence)
        return ids
