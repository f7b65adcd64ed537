"""T5 v1.1's SentencePiece tokenizer (Kudo and Richardson 2018, SentencePiece; Kudo 2018, unigram language model)
as Stable Diffusion 3 / 3.5 feeds T5-XXL.

It reads either file the vocabulary ships in: the SentencePiece model (`spiece.model`, through the `sentencepiece`
package) or a Hugging Face `tokenizer.json` (through `tokenizers`). Neither package is a core dependency, so both
are imported only when such a file is opened (`pip install 'latentgen[sd3]'`). The kind is read from the
contents, not the file name, so a mislabelled file gets an error about what it really is.

The ids follow Stability AI's reference (sd3.5 `other_impls.SDTokenizer` with T5's settings): no start token,
the piece ids, end-of-sequence 1, then pad 0 up to at least `min_length` (77) tokens. A longer prompt makes a
longer row, not a cut one. Like the reference, the text is split on spaces (a newline counts as one) and each
word is tokenized on its own, so repeated and leading spaces change nothing.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from latentgen.errors import CheckpointError, ConfigError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPECIAL_PIECES = {PAD_ID: "<pad>", EOS_ID: "</s>", UNK_ID: "<unk>"}
EXPECTED = ("expected the T5 v1.1 SentencePiece model: spiece.model or tokenizer.json from google/t5-v1_1-xxl "
            "(SD3's tokenizer_3)")
GZIP_MAGIC = b"\x1f\x8b"


def _package(module: str, path: Path):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"reading the T5 tokenizer '{path}' needs the {module} package, which is not installed: "
                          f"pip install {module} (or pip install 'latentgen[sd3]')") from exc


@dataclass(frozen=True)
class _Vocabulary:
    """One opened tokenizer file: its size, the piece of an id, and words -> piece ids (no end-of-sequence)."""

    kind: str
    size: int
    piece: Callable[[int], str]
    encode_words: Callable[[list[str]], list[list[int]]]
    unk_id: int | None


def _open_sentencepiece(path: Path) -> _Vocabulary:
    sentencepiece = _package("sentencepiece", path)
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except Exception as exc:  # the library raises RuntimeError or OSError with the parser's words
        raise CheckpointError(f"T5 tokenizer '{path}' is neither a SentencePiece model nor a tokenizer.json "
                              f"(sentencepiece: {exc}); {EXPECTED}") from exc
    return _Vocabulary("SentencePiece model", processor.get_piece_size(), processor.id_to_piece,
                       lambda words: processor.encode(words) if words else [], processor.unk_id())


def _open_tokenizer_json(path: Path) -> _Vocabulary:
    try:
        spec = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"T5 tokenizer '{path}' looks like JSON but does not parse ({exc}); {EXPECTED}") from exc
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or "type" not in model:
        raise CheckpointError(f"T5 tokenizer '{path}' is a JSON file but not a Hugging Face tokenizer.json (it has no "
                              f"'model' section with a 'type'); {EXPECTED}")
    if model["type"] != "Unigram":  # CLIP's and GPT-2's are BPE, BERT's WordPiece: their pieces mean other ids
        raise CheckpointError(f"T5 tokenizer '{path}' is a {model['type']} tokenizer.json, not T5's SentencePiece "
                              f"Unigram one; {EXPECTED}")
    tokenizers = _package("tokenizers", path)
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"T5 tokenizer '{path}' cannot be read by tokenizers ({exc}); {EXPECTED}") from exc

    def encode_words(words: list[str]) -> list[list[int]]:
        # add_special_tokens=False: no end-of-sequence from the file's post-processor; T5Tokenizer.encode adds it.
        return [encoding.ids for encoding in tokenizer.encode_batch(words, add_special_tokens=False)]

    return _Vocabulary("tokenizer.json", tokenizer.get_vocab_size(with_added_tokens=True), tokenizer.id_to_token,
                       encode_words, model.get("unk_id"))


class T5Tokenizer:
    """Texts -> token ids (B, L) for T5 v1.1: the piece ids, end-of-sequence 1, pad 0 up to
    max(min_length, longest row), cut (end-of-sequence kept last) only beyond `max_length`.

    `path` is `spiece.model` or `tokenizer.json`; it is checked here, before any text: its kind, T5's special
    ids (pad 0 `<pad>`, end 1 `</s>`, unknown 2 `<unk>`) and, with `vocab_size` (the T5 embedding's rows, 32128
    for T5-XXL), that no id can fall outside the embedding.
    """

    pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID

    def __init__(self, path: str | Path, vocab_size: int | None = None):
        self.path = Path(path)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        if self.vocab_size is not None and self.vocab_size < len(SPECIAL_PIECES):
            raise ConfigError(f"T5 tokenizer '{self.path}': vocab_size must be at least {len(SPECIAL_PIECES)} (pad, "
                              f"end and unknown); got {vocab_size}")
        if not self.path.is_file():
            what = "is a folder, not a file" if self.path.is_dir() else "does not exist"
            raise CheckpointError(f"T5 tokenizer '{self.path}' {what}; check the path ({EXPECTED})")
        with self.path.open("rb") as file:
            head = file.read(64)
        if head.startswith(GZIP_MAGIC):  # CLIP's bpe_simple_vocab_16e6.txt.gz is the likeliest mix-up
            raise CheckpointError(f"T5 tokenizer '{self.path}' is a gzip file (CLIP's BPE vocabulary "
                                  f"bpe_simple_vocab_16e6.txt.gz is one), not a T5 tokenizer; {EXPECTED}")
        looks_json = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"[")
        self._vocabulary = (_open_tokenizer_json if looks_json else _open_sentencepiece)(self.path)
        self._check_vocabulary()

    def _check_vocabulary(self) -> None:
        vocabulary = self._vocabulary
        where = f"T5 tokenizer '{self.path}' ({vocabulary.kind})"
        if vocabulary.size < len(SPECIAL_PIECES):
            raise CheckpointError(f"{where} has only {vocabulary.size} pieces, fewer than T5's special ones; "
                                  f"{EXPECTED}")
        for index, piece in SPECIAL_PIECES.items():
            found = vocabulary.piece(index)
            if found != piece:
                raise CheckpointError(f"{where} has '{found}' at id {index} where T5 has '{piece}' (pad 0 <pad>, "
                                      f"end 1 </s>, unknown 2 <unk>): a tokenizer of another model; {EXPECTED}")
        if vocabulary.unk_id != UNK_ID:  # without one, text outside the vocabulary would fail at the first prompt
            what = "has no unknown id" if vocabulary.unk_id is None else f"maps unknown text to id {vocabulary.unk_id}"
            raise CheckpointError(f"{where} {what}; T5's unknown id is {UNK_ID}; {EXPECTED}")
        if self.vocab_size is not None and vocabulary.size > self.vocab_size:
            raise CheckpointError(f"{where} has {vocabulary.size} pieces but the T5 embedding has {self.vocab_size} "
                                  f"rows (vocab_size), so some ids would have no embedding: a tokenizer of a larger "
                                  f"model (mT5/UMT5?), or the wrong vocab_size; {EXPECTED}")

    def __len__(self) -> int:
        """The number of ids the file can give (32000 for spiece.model, 32100 with tokenizer.json's extra ids)."""
        return self._vocabulary.size

    @property
    def kind(self) -> str:
        return self._vocabulary.kind

    def encode(self, text: str) -> list[int]:
        """One text -> its piece ids and end-of-sequence, unpadded and uncut."""
        words = [word for word in text.replace("\n", " ").split(" ") if word]  # as the reference splits
        return [index for ids in self._vocabulary.encode_words(words) for index in ids] + [EOS_ID]

    def __call__(self, texts: Sequence[str], min_length: int = 77, max_length: int | None = None) -> torch.Tensor:
        """Texts -> LongTensor (B, L), L = max(min_length, the longest row), at most `max_length` when given."""
        if isinstance(texts, str):
            texts = [texts]
        if min_length < 0:
            raise ConfigError(f"T5 tokenizer: min_length must be 0 or more; got {min_length}")
        if max_length is not None and max_length < max(1, min_length):
            raise ConfigError(f"T5 tokenizer: max_length ({max_length}) must be at least 1 (the end-of-sequence "
                              f"token) and at least min_length ({min_length}), or None for no limit")
        rows = []
        for number, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"T5 tokenizer: text {number} is a {type(text).__name__}, not a str")
            ids = self.encode(text)
            if max_length is not None and len(ids) > max_length:
                ids = ids[:max_length - 1] + [EOS_ID]
            rows.append(ids)
        length = max([min_length, *map(len, rows)])
        tokens = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        for row, ids in enumerate(rows):
            tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens

    def __deepcopy__(self, memo: dict) -> "T5Tokenizer":
        return self  # immutable once read, and the sentencepiece processor cannot be copied

    def __reduce__(self):
        return type(self), (str(self.path), self.vocab_size)  # pickled as the file to read again

    def __repr__(self) -> str:
        return f"T5Tokenizer('{self.path}', {self.kind}, {len(self)} pieces)"
