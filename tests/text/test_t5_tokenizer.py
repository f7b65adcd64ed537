"""The T5 tokenizer (latentgen.text.t5_tokenizer) on small real vocabularies trained here: a SentencePiece unigram
model with T5's special ids, the same vocabulary converted to a Hugging Face tokenizer.json, and one trained by
`tokenizers` itself; and every kind of wrong file it must refuse before any text.

tests/data/t5/tokenizer.json, the tokenizer of the registry and contract suites, is what
`python tests/text/test_t5_tokenizer.py` writes: the vocabulary of `corpus()` at 120 pieces, converted.
"""

from __future__ import annotations

import copy
import gzip
import json
import pickle
import random
import sys
from pathlib import Path

import pytest
import torch

from latentgen.errors import CheckpointError, ConfigError
from latentgen.text.t5_tokenizer import T5Tokenizer

sentencepiece = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")

EXPECTED = "spiece.model or tokenizer.json"
CLIP_VOCABULARY = Path(__file__).resolve().parents[2] / "latentgen" / "text" / "bpe_simple_vocab_16e6.txt.gz"
DATA_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "t5" / "tokenizer.json"
WORDS = ("a an the of in on with and photograph painting astronaut riding horse red blue green fox snow star circle "
         "square grass sky city night river mountain cat dog highly detailed small big old portrait light").split()
SYLLABLES = "ka ri to mu sen la bo vi ne ga pho gra ph ing ed ly er st ar".split()


def corpus(count: int = 600, seed: int = 0) -> list[str]:
    """Sentences of English words and made-up ones, enough for a unigram vocabulary of a few hundred pieces."""
    rng = random.Random(seed)
    words = list(WORDS) + ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(200)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(count)]


def train_spiece(folder: Path, sentences: list[str], vocab_size: int, t5_ids: bool = True) -> Path:
    """A SentencePiece unigram model; with `t5_ids` T5's pad 0, end 1, unknown 2 and no start token, otherwise
    SentencePiece's own defaults (unknown 0, start 1, end 2)."""
    ids = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1) if t5_ids else {}
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=str(folder / "spiece"),
                                             vocab_size=vocab_size, model_type="unigram", num_threads=1,
                                             minloglevel=2, **ids)
    return folder / "spiece.model"


def convert_to_json(model: Path, path: Path) -> Path:
    """The SentencePiece model's pieces and scores as a tokenizer.json laid out like T5's on the Hub: Unigram,
    the special pieces as added tokens, a Metaspace pre-tokenizer and a post-processor appending </s>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=processor.unk_id()))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.add_special_tokens([AddedToken(processor.id_to_piece(i), special=True) for i in range(3)])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.save(str(path))
    return path


def write_t5_tokenizers(folder: Path, sentences: list[str], vocab_size: int) -> tuple[Path, Path]:
    model = train_spiece(folder, sentences, vocab_size)
    return model, convert_to_json(model, folder / "tokenizer.json")


def direct_ids(path: Path, text: str) -> list[int]:
    """What the file's own library gives for `text`, word by word as SD3's reference tokenizes."""
    words = [word for word in text.replace("\n", " ").split(" ") if word]
    if path.suffix == ".model":
        return [i for ids in sentencepiece.SentencePieceProcessor(model_file=str(path)).encode(words) for i in ids]
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    return [i for word in words for i in tokenizer.encode(word, add_special_tokens=False).ids]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("t5_tokenizers")
    model, converted = write_t5_tokenizers(folder, corpus(), vocab_size=200)
    trainer = tokenizers.trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"],
                                                 unk_token="<unk>", show_progress=False)
    trained = tokenizers.Tokenizer(tokenizers.models.Unigram())
    trained.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    trained.train_from_iterator(corpus(seed=1), trainer)
    (folder / "trained").mkdir()
    trained.save(str(folder / "trained" / "tokenizer.json"))
    return {"model": model, "json": converted, "trained": folder / "trained" / "tokenizer.json"}


TEXTS = ["a photograph of an astronaut riding a horse", "A PAINTING of a Red Fox,   in the snow; highly-detailed!! 4k",
         "", "  leading and trailing  ", "two\nlines", "Zebra xylophone QQQ ü ß 東京"]


@pytest.mark.parametrize("kind", ["model", "json", "trained"])
def test_piece_ids_then_end_then_padding_to_77(files, kind):
    tokenizer = T5Tokenizer(files[kind], vocab_size=32128)
    tokens = tokenizer(TEXTS)
    assert tokens.dtype == torch.long and tokens.shape == (len(TEXTS), 77)
    for row, text in zip(tokens.tolist(), TEXTS):
        ids = direct_ids(files[kind], text)
        assert row == ids + [1] + [0] * (77 - len(ids) - 1), text
    assert tokens[2].tolist() == [1] + [0] * 76  # the empty prompt: end of sequence only


def test_the_model_and_its_tokenizer_json_give_the_same_ids(files):
    from_model, from_json = T5Tokenizer(files["model"]), T5Tokenizer(files["json"])
    assert (from_model.kind, from_json.kind) == ("SentencePiece model", "tokenizer.json")
    texts = TEXTS + corpus(50, seed=2)
    assert torch.equal(from_model(texts), from_json(texts))
    # The json's post-processor appends </s>; T5Tokenizer must not end with two.
    assert from_json.encode("red fox").count(1) == 1


def test_spaces_and_newlines_split_words_as_the_reference_does(files):
    tokenizer = T5Tokenizer(files["model"])
    assert tokenizer.encode("  red   fox\nin snow ") == tokenizer.encode("red fox in snow")
    assert tokenizer(["red fox"]).equal(tokenizer("red fox"))  # one string is one text


def test_longer_prompts_make_longer_rows_and_pad_the_others(files):
    tokenizer = T5Tokenizer(files["json"])
    long = " ".join(corpus(30, seed=3))
    tokens = tokenizer([long, "red fox"])
    assert tokens.shape[1] == len(direct_ids(files["json"], long)) + 1 > 77
    short = direct_ids(files["json"], "red fox") + [1]
    assert tokens[0, -1] == 1 and tokens[1].tolist() == short + [0] * (tokens.shape[1] - len(short))
    assert tokenizer(["red fox"], min_length=0).shape == (1, len(direct_ids(files["json"], "red fox")) + 1)


def test_max_length_cuts_and_keeps_the_end_token_last(files):
    tokenizer = T5Tokenizer(files["model"])
    long = " ".join(corpus(30, seed=3))
    tokens = tokenizer([long, "red fox"], min_length=10, max_length=20)
    assert tokens.shape == (2, 20)
    assert tokens[0].tolist() == direct_ids(files["model"], long)[:19] + [1]
    short = len(direct_ids(files["model"], "red fox")) + 1
    assert tokenizer(["red fox"], min_length=0, max_length=20).shape == (1, short)  # not padded to the cap
    with pytest.raises(ConfigError, match="max_length"):
        tokenizer(["red"], min_length=77, max_length=20)


def test_copies_and_pickles_tokenize_alike(files):
    for kind in ("model", "json"):
        tokenizer = T5Tokenizer(files[kind], vocab_size=1000)
        assert copy.deepcopy(tokenizer) is tokenizer  # read-only: shared, not copied
        again = pickle.loads(pickle.dumps(tokenizer))
        assert again.vocab_size == 1000 and torch.equal(again(TEXTS), tokenizer(TEXTS))


def test_the_data_tokenizer_of_the_suites_is_t5_shaped():
    tokenizer = T5Tokenizer(DATA_TOKENIZER, vocab_size=120)
    assert (len(tokenizer), tokenizer.kind) == (120, "tokenizer.json")
    first, second = tokenizer(["a red circle", "a blue star on grass"])  # the contract suite's prompts
    assert not torch.equal(first, second) and first.max() < 120


# ---- wrong files: each refused by name, with what is expected ----------------------------------------------

def _refused(path: Path, match: str, vocab_size: int | None = None) -> str:
    with pytest.raises(CheckpointError) as info:
        T5Tokenizer(path, vocab_size=vocab_size)
    message = str(info.value)
    assert str(path) in message and EXPECTED in message and "t5-v1_1-xxl" in message, message
    assert match in message, message
    return message


def test_a_missing_file_or_a_folder(tmp_path):
    _refused(tmp_path / "spiece.model", "does not exist")
    _refused(tmp_path, "is a folder")


def test_clips_bpe_vocabulary(tmp_path):
    _refused(CLIP_VOCABULARY, "gzip")
    unpacked = tmp_path / "bpe_simple_vocab_16e6.txt"
    unpacked.write_bytes(gzip.decompress(CLIP_VOCABULARY.read_bytes())[:100_000])
    _refused(unpacked, "neither a SentencePiece model nor a tokenizer.json")


def test_random_bytes_and_an_empty_file(tmp_path):
    (tmp_path / "spiece.model").write_bytes(random.Random(0).randbytes(4096))
    _refused(tmp_path / "spiece.model", "neither a SentencePiece model nor a tokenizer.json")
    (tmp_path / "empty.model").write_bytes(b"")
    _refused(tmp_path / "empty.model", "neither a SentencePiece model nor a tokenizer.json")


def test_json_that_is_not_a_unigram_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, trainers

    for model, trainer in ((models.BPE(unk_token="<unk>"), trainers.BpeTrainer),
                           (models.WordPiece(unk_token="<unk>"), trainers.WordPieceTrainer)):
        tokenizer = Tokenizer(model)
        tokenizer.train_from_iterator(corpus(50), trainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"],
                                                          show_progress=False))
        path = tmp_path / f"{type(model).__name__}.json"
        tokenizer.save(str(path))
        _refused(path, f"is a {type(model).__name__} tokenizer.json, not T5's SentencePiece Unigram one")
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 4096, "model_type": "t5"}))
    _refused(tmp_path / "config.json", "not a Hugging Face tokenizer.json")
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    _refused(tmp_path / "list.json", "not a Hugging Face tokenizer.json")
    (tmp_path / "broken.json").write_text('{"model": {"type": "Unigram", ')
    _refused(tmp_path / "broken.json", "does not parse")
    (tmp_path / "odd.json").write_text('{"model": {"type": "Unigram", "vocab": "nothing"}}')
    _refused(tmp_path / "odd.json", "cannot be read by tokenizers")


def test_another_models_special_ids(tmp_path, files):
    own_ids = train_spiece(tmp_path, corpus(), vocab_size=100, t5_ids=False)  # unknown 0, start 1, end 2
    _refused(own_ids, "'<unk>' at id 0 where T5 has '<pad>'")
    spec = json.loads(files["trained"].read_text())
    spec["model"]["vocab"][0], spec["model"]["vocab"][1] = spec["model"]["vocab"][1], spec["model"]["vocab"][0]
    (tmp_path / "swapped.json").write_text(json.dumps(spec))
    _refused(tmp_path / "swapped.json", "'</s>' at id 0 where T5 has '<pad>'")
    spec = json.loads(files["trained"].read_text())
    spec["model"]["unk_id"] = 1
    (tmp_path / "unk.json").write_text(json.dumps(spec))
    _refused(tmp_path / "unk.json", "unknown text to id 1")
    del spec["model"]["unk_id"]
    (tmp_path / "no_unk.json").write_text(json.dumps(spec))
    _refused(tmp_path / "no_unk.json", "has no unknown id")


def test_more_pieces_than_embedding_rows(files):
    for kind in ("model", "json"):
        _refused(files[kind], "200 pieces but the T5 embedding has 150 rows", vocab_size=150)
    assert len(T5Tokenizer(files["model"], vocab_size=200)) == 200


def test_missing_packages_name_the_install(files, monkeypatch):
    for module, kind in (("sentencepiece", "model"), ("tokenizers", "json")):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # import fails as if not installed
            with pytest.raises(ConfigError) as info:
                T5Tokenizer(files[kind])
        assert f"pip install {module}" in str(info.value) and "latentgen[sd3]" in str(info.value)
        assert str(files[kind]) in str(info.value)


def test_vocab_size_below_the_special_ids(files):
    with pytest.raises(ConfigError, match="vocab_size must be at least 3"):
        T5Tokenizer(files["model"], vocab_size=2)


if __name__ == "__main__":  # writes tests/data/t5/tokenizer.json again
    import tempfile

    DATA_TOKENIZER.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        convert_to_json(train_spiece(Path(tmp), corpus(), vocab_size=120), DATA_TOKENIZER)
    print(f"wrote {DATA_TOKENIZER}")
