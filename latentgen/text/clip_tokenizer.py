"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, CLIP; Sennrich et al. 2016, BPE), standard library only.

Reads OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT licensed, shipped in this package). The vocabulary
(49408 entries) is: the 256 byte symbols, the same with the end-of-word marker `</w>`, one entry per
merge (in merge order), then `<|startoftext|>` (49406) and `<|endoftext|>` (49407).

Text cleaning differs from the original in one respect: the original runs `ftfy.fix_text` first,
which this module does not (ftfy is not a dependency). We apply Unicode NFC normalization (which
ftfy also does) and HTML unescaping, so plain, composed or decomposed text tokenizes identically;
what ftfy would additionally change and we do not: mojibake repair ("cafÃ©" -> "café"), curly quotes
to straight ones, Latin ligatures ("ﬁ" -> "fi"), full-width to half-width characters, and removal of
control characters and terminal escapes. Such text gets different (still valid) token ids here.
The `regex` module's `\\p{L}` / `\\p{N}` classes are emulated with `re` (see `_WORD`).
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

DEFAULT_VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # the file's lines 1..48894 (line 0 is a version header)
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"

# One word piece per match. `regex` would write letters as [\p{L}]+, numbers as [\p{N}] and the
# rest as [^\s\p{L}\p{N}]+. In `re`, \w is letters, all numerics and "_": group 2 takes letters
# (plus the non-decimal numerics No/Nl such as "²", split off again in `_pieces`), group 3 one
# decimal digit, group 4 a run of anything that is neither whitespace, letter nor number.
_WORD = re.compile(
    r"(<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|([^\W\d_]+)|(\d)|((?:[^\s\w]|_)+)",
    re.IGNORECASE,
)
_WHITESPACE = re.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """Each byte -> a printable character: printable Latin-1 bytes map to themselves, the other 68
    bytes to code points 256.. in byte order, so that BPE never sees whitespace or control bytes.

    The order of the items (the printable bytes first, then the others) is the order of the first
    512 vocabulary entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    others = (byte for byte in range(256) if byte not in table)
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """NFC, HTML entities unescaped (twice, for doubly escaped text), whitespace collapsed, stripped, lower-cased."""
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip().lower()


def _pieces(text: str) -> list[str]:
    """Split cleaned text into the word pieces that BPE encodes one by one."""
    pieces = []
    for match in _WORD.finditer(text):
        piece = match.group()
        if match.lastindex == 2 and not piece.isalpha():  # letters with a No/Nl numeric inside
            for is_letter, chars in itertools.groupby(piece, key=str.isalpha):
                pieces.extend(["".join(chars)] if is_letter else list(chars))
        else:
            pieces.append(piece)
    return pieces


@dataclass
class BPEVocabulary:
    """Token <-> id tables and merge ranks of one vocabulary file; `bpe(word)` caches per word."""

    encoder: dict[str, int]
    merge_ranks: dict[tuple[str, str], int]
    decoder: dict[int, str] = field(init=False, repr=False)
    bpe: Callable[[str], tuple[str, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.decoder = {index: token for token, index in self.encoder.items()}
        self.bpe = functools.lru_cache(maxsize=1 << 16)(self._merge)

    def _merge(self, word: str) -> tuple[str, ...]:
        """The BPE symbols of one byte-encoded word: repeatedly join the adjacent pair of lowest rank."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        ranks = self.merge_ranks
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: ranks.get(pair, NUM_MERGES + 1))
            if best not in ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)


@functools.lru_cache(maxsize=None)
def load_vocabulary(path: str) -> BPEVocabulary:
    """Read a CLIP BPE file once per process (keyed by its resolved path)."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != NUM_MERGES or any(len(merge) != 2 for merge in merges):
        raise ValueError(f"CLIP tokenizer: {path} is not a CLIP BPE merges file (expected {NUM_MERGES} merge lines)")
    byte_symbols = list(bytes_to_unicode().values())
    tokens = [*byte_symbols, *(symbol + END_OF_WORD for symbol in byte_symbols), *("".join(m) for m in merges),
              BOS_TOKEN, EOS_TOKEN]
    return BPEVocabulary(encoder={token: index for index, token in enumerate(tokens)},
                         merge_ranks={merge: rank for rank, merge in enumerate(merges)})


class CLIPTokenizer:
    """Prompts -> LongTensor (B, context_length): BOS, at most context_length - 2 BPE tokens, EOS, padding.

    `pad_id` is 49407 (= EOS) for Stable Diffusion v1's tokenizer and 0 for OpenCLIP / SD v2.
    Prompts longer than the context are truncated; the last id before padding is always EOS.
    """

    def __init__(self, vocab_path: str | Path | None = None, context_length: int = 77, pad_id: int = 49407):
        if context_length < 2:
            raise ValueError(f"CLIP tokenizer: context_length must be at least 2 (BOS and EOS); got {context_length}")
        self.vocab_path = str((Path(vocab_path) if vocab_path is not None else DEFAULT_VOCAB_PATH).resolve())
        self.vocab = load_vocabulary(self.vocab_path)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {symbol: byte for byte, symbol in self.byte_encoder.items()}
        self.context_length = int(context_length)
        self.pad_id = int(pad_id)
        self.bos_id = self.vocab.encoder[BOS_TOKEN]  # 49406
        self.eos_id = self.vocab.encoder[EOS_TOKEN]  # 49407
        # Words added by textual-inversion embeddings: each stands for ids beyond the vocabulary.
        self.added: dict[str, list[int]] = {}

    def __getstate__(self) -> dict:
        # Copies and pickles share the process-wide vocabulary instead of carrying its tables.
        return {"vocab_path": self.vocab_path, "context_length": self.context_length, "pad_id": self.pad_id}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vocab_path"], state["context_length"], state["pad_id"])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab.encoder)

    def token_id(self, token: str) -> int:
        """The id of one vocabulary entry, e.g. "cat</w>"."""
        return self.vocab.encoder[token]

    def encode(self, text: str) -> list[int]:
        """The BPE ids of `text` after cleaning, without BOS, EOS or truncation; an added word (matched whole,
        ignoring case) gives its own ids."""
        if self.added:
            words = "|".join(re.escape(word.lower()) for word in sorted(self.added, key=len, reverse=True))
            parts = re.split(rf"(?<![\w<>])({words})(?![\w<>])", clean_text(text))
            added = {word.lower(): ids for word, ids in self.added.items()}
            return [i for index, part in enumerate(parts)
                    for i in (added[part] if index % 2 else self._encode_plain(part))]
        return self._encode_plain(text)

    def _encode_plain(self, text: str) -> list[int]:
        ids = []
        for piece in _pieces(clean_text(text)):
            if piece in (BOS_TOKEN, EOS_TOKEN):
                ids.append(self.vocab.encoder[piece])
                continue
            word = "".join(self.byte_encoder[byte] for byte in piece.encode("utf-8"))
            ids.extend(self.vocab.encoder[symbol] for symbol in self.vocab.bpe(word))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text (special tokens kept, padding after EOS dropped); word ends become spaces."""
        tokens = []
        for index in (int(i) for i in ids):
            tokens.append(self.vocab.decoder[index])
            if index == self.eos_id:
                break
        raw = bytes(self.byte_decoder[c] for c in "".join(t for t in tokens if t not in (BOS_TOKEN, EOS_TOKEN)))
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"CLIP tokenizer: prompts must be strings; got {type(text).__name__} at position {row}")
            sequence = [self.bos_id, *self.encode(text)[: self.context_length - 2], self.eos_id]
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        return ids  # (B, context_length)
