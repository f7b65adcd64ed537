"""BERT's WordPiece tokenizer (Devlin et al. 2019; Wu et al. 2016, "Google's NMT system"), reading a vocab.txt.

Text is cleaned, split on whitespace and punctuation (CJK ideographs stand alone), lower-cased with
accents stripped (for uncased vocabularies), and each word is cut into the longest vocabulary pieces
from the left, continuation pieces carrying a "##" prefix; a word that cannot be cut is [UNK].
The special tokens written literally in a prompt ("[SEP]") are kept as themselves.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Sequence

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100  # longer "words" (URLs, hashes) become [UNK] instead of costing quadratic time
_SPECIAL = re.compile("(" + "|".join(re.escape(token) for token in SPECIAL_TOKENS) + ")")


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char: str) -> bool:
    # All non-alphanumeric ASCII counts (BERT splits "$" and "^" too), plus Unicode's P* categories.
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(code: int) -> bool:
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0x2A700 <= code <= 0x2B73F or 0x2B740 <= code <= 0x2B81F or 0x2B820 <= code <= 0x2CEAF
            or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F)


class WordPieceTokenizer:
    """Prompts -> BERT token ids: [CLS] pieces [SEP], truncated and padded with [PAD] to `max_length`."""

    def __init__(self, vocab_path: str | Path, lowercase: bool = True):
        tokens = Path(vocab_path).read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {token: index for index, token in enumerate(tokens)}
        missing = [token for token in SPECIAL_TOKENS if token not in self.vocab]
        if missing:
            raise ValueError(f"WordPiece vocabulary '{vocab_path}' lacks the special tokens {missing}; "
                             f"it is not a BERT vocab.txt")
        self.lowercase = lowercase
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]

    def __len__(self) -> int:
        return len(self.vocab)

    # ---- text -> words ----------------------------------------------------------------------------

    def _normalize(self, text: str) -> str:
        chars = []
        for char in text:
            code = ord(char)
            if code == 0 or code == 0xFFFD or _is_control(char):
                continue
            if _is_whitespace(char):
                chars.append(" ")
            elif _is_cjk(code):
                chars.append(f" {char} ")
            else:
                chars.append(char)
        text = "".join(chars)
        if self.lowercase:
            text = unicodedata.normalize("NFD", text.lower())
            text = "".join(char for char in text if unicodedata.category(char) != "Mn")
        return text

    def words(self, text: str) -> list[str]:
        """The words and punctuation marks WordPiece then cuts (BERT's "basic tokenizer")."""
        words = []
        for chunk in self._normalize(text).split():
            word = ""
            for char in chunk:
                if _is_punctuation(char):
                    words += [word, char] if word else [char]
                    word = ""
                else:
                    word += char
            if word:
                words.append(word)
        return words

    # ---- words -> pieces --------------------------------------------------------------------------

    def _pieces(self, word: str) -> list[int]:
        if len(word) > MAX_WORD_CHARS:
            return [self.unk_id]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):  # longest match first
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk_id]
        return pieces

    def encode(self, text: str) -> list[int]:
        """The ids of `text` without [CLS]/[SEP] or any length limit."""
        ids = []
        for part in _SPECIAL.split(text):
            if part in self.vocab and part in SPECIAL_TOKENS:
                ids.append(self.vocab[part])
            else:
                for word in self.words(part):
                    ids += self._pieces(word)
        return ids

    def __call__(self, prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids (B, max_length) long, attention_mask (B, max_length) bool): [CLS] ids [SEP] then
        [PAD]; a prompt longer than max_length - 2 pieces is cut, keeping [SEP] last."""
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP] (at least 2); got {max_length}")
        ids = torch.full((len(prompts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), max_length), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings; item {row} is {type(prompt).__name__}: {prompt!r}")
            tokens = [self.cls_id, *self.encode(prompt)[: max_length - 2], self.sep_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = True
        return ids, mask
