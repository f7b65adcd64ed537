"""CLIP text conditioning: tokenizer against the SD v1 tokenizer's ids, both text towers against the
original implementations' outputs, full-size key layouts against SD v1/v2 checkpoints, the contract."""

from __future__ import annotations

import copy
import json
import unicodedata

import pytest
import torch
from safetensors.torch import load_file

from latentgen import registry
from latentgen.conditioners.clip_text import CLIPTextConditioner
from latentgen.text.clip_tokenizer import CLIPTokenizer

BOS, EOS = 49406, 49407
TINY_V1 = dict(layout="clip", context_dim=32, layers=2, heads=2, intermediate_size=64, vocab_size=1000,
               hidden_act="quick_gelu")


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cond_stage(path) -> dict[str, torch.Tensor]:
    prefix = "cond_stage_model."
    return {k[len(prefix):]: v for k, v in load_file(path).items() if k.startswith(prefix)}


def spec_shapes(path) -> dict[str, tuple[int, ...]]:
    """The `cond_stage_model.` entries of a key/shape tsv, `position_ids` left out."""
    shapes = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        if key.startswith("cond_stage_model.") and not key.endswith("position_ids"):
            shapes[key] = () if shape == "scalar" else tuple(map(int, shape.split("x")))
    return shapes


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture
def clip_text_name():
    """The registry name, registered in-process unless the installed entry points already provide it."""
    if "clip_text" in registry.available("conditioner"):
        yield "clip_text"
        return
    registry.register("conditioner", "clip_text", CLIPTextConditioner)
    yield "clip_text"
    registry.unregister("conditioner", "clip_text")


@pytest.fixture
def tiny_v1(shared_dir) -> CLIPTextConditioner:
    conditioner = CLIPTextConditioner(**TINY_V1)
    conditioner.load_state_dict(cond_stage(shared_dir / "golden" / "sd-tiny-weights.safetensors"), strict=True)
    return conditioner.eval()


# --- tokenizer -------------------------------------------------------------------------------------

def test_tokenizer_matches_sd_v1_golden_cases(tokenizer, shared_dir):
    cases = json.loads((shared_dir / "golden" / "clip-tokenizer-cases.json").read_text())
    assert len(cases) >= 8
    ids = tokenizer([case["text"] for case in cases])
    assert ids.shape == (len(cases), 77) and ids.dtype == torch.long
    for row, case in zip(ids.tolist(), cases):
        assert row == case["input_ids"], f"token ids differ for {case['text']!r}"


def test_tokenizer_vocabulary_and_special_ids(tokenizer):
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.bos_id, tokenizer.eos_id) == (BOS, EOS)
    assert tokenizer.token_id("<|startoftext|>") == BOS and tokenizer.token_id("<|endoftext|>") == EOS
    assert tokenizer.token_id("!") == 0 and tokenizer.token_id("a</w>") == 320  # byte symbols, then with </w>
    assert CLIPTokenizer().vocab is tokenizer.vocab  # loaded once per process


def test_tokenizer_truncation_padding_and_str_input(tokenizer):
    long_ids = tokenizer(" ".join(f"word{i}" for i in range(100)))
    assert long_ids.shape == (1, 77) and long_ids[0, 0] == BOS and long_ids[0, -1] == EOS
    assert not ((long_ids[0, 1:-1] == EOS) | (long_ids[0, 1:-1] == BOS)).any()  # 75 real tokens, no padding

    single = tokenizer("a cat")
    assert single.shape == (1, 77) and single[0, :4].tolist() == [BOS, 320, tokenizer.token_id("cat</w>"), EOS]
    assert (single[0, 4:] == EOS).all()
    openclip_ids = CLIPTokenizer(pad_id=0)("a cat")
    assert openclip_ids[0, :4].tolist() == single[0, :4].tolist() and (openclip_ids[0, 4:] == 0).all()
    assert CLIPTokenizer(context_length=5)("one two three four")[0].tolist()[-1] == EOS
    assert tokenizer.decode(single[0]) == "a cat"
    with pytest.raises(TypeError, match="strings"):
        tokenizer(["fine", 3])


def test_tokenizer_cleaning_and_unicode_classes(tokenizer):
    # HTML entities are unescaped twice, whitespace collapsed, case folded, composed and decomposed accents agree.
    assert tokenizer.encode("Salt &amp;amp; Pepper") == tokenizer.encode("salt & pepper")
    assert tokenizer.encode(unicodedata.normalize("NFD", "café")) == tokenizer.encode("café")
    pieces = [tokenizer.vocab.decoder[i] for i in tokenizer.encode("x² foo_bar 42")]
    # "²" is a number (\p{N}), not a letter, and "_" is punctuation: both are their own pieces.
    assert pieces == ["x</w>", "Â²</w>", "foo</w>", "_</w>", "bar</w>", "4</w>", "2</w>"]
    assert len(tokenizer.encode("don't")) == 2 and tokenizer.encode("<|endoftext|>") == [EOS]


# --- golden parity -------------------------------------------------------------------------------

def test_sd_v1_text_tower_matches_original(tiny_v1, shared_dir):
    io = load_file(shared_dir / "golden" / "sd-tiny-io.safetensors")
    with torch.no_grad():
        hidden = tiny_v1.encode_ids(io["clip.input_ids"])
    assert hidden.shape == io["clip.last_hidden_state"].shape == (2, 77, 32)
    assert rel_error(hidden, io["clip.last_hidden_state"]) < 1e-4


@pytest.mark.parametrize("layer, key", [("penultimate", "openclip.penultimate_ln"), ("last", "openclip.last_ln")])
def test_sd_v2_openclip_tower_matches_original(layer, key, shared_dir):
    weights = cond_stage(shared_dir / "golden" / "sd2-openclip-tiny-weights.safetensors")
    mlp_width = weights["model.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    conditioner = CLIPTextConditioner(layout="openclip", context_dim=32, layers=3, heads=2, intermediate_size=mlp_width,
                                      hidden_act="gelu", layer=layer)
    conditioner.load_state_dict(weights, strict=True)
    io = load_file(shared_dir / "golden" / "sd2-openclip-tiny-io.safetensors")
    with torch.no_grad():
        hidden = conditioner.eval().encode_ids(io["openclip.input_ids"])
    assert rel_error(hidden, io[key]) < 1e-4
    other = "openclip.last_ln" if layer == "penultimate" else "openclip.penultimate_ln"
    assert rel_error(hidden, io[other]) > 1e-2  # the two layers really differ


# --- full-size layouts ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec, params", [
    ("sd-v1-keys.tsv", {}),
    ("sd-v2-keys.tsv", dict(layout="openclip", context_dim=1024, layers=24, heads=16, layer="penultimate",
                            hidden_act="gelu")),
])
def test_full_size_keys_and_shapes_match_checkpoints(spec, params, shared_dir):
    """The tower's weights, placed by the original format's key map, are the released files' text tower
    (v1: `cond_stage_model.transformer.text_model.*`, v2: `cond_stage_model.model.*`)."""
    from latentgen.interop.stable_diffusion import ORIGINAL_LAYOUT

    expected = spec_shapes(shared_dir / "spec" / spec)
    assert len(expected) > 100
    with torch.device("meta"):
        conditioner = CLIPTextConditioner(**params)
    actual = {ORIGINAL_LAYOUT.file_key(f"conditioner.{key}"): tuple(value.shape)
              for key, value in conditioner.state_dict().items()}
    assert sorted(set(actual) ^ set(expected)) == []
    assert actual == expected


# --- contract ------------------------------------------------------------------------------------

@pytest.fixture
def tiny_full_vocab(clip_text_name) -> CLIPTextConditioner:
    return registry.build("conditioner", clip_text_name, context_dim=32, layers=2, heads=2, intermediate_size=64).eval()


def test_contract_outputs_and_shapes(tiny_full_vocab):
    conditioner = tiny_full_vocab
    batch = {"prompt": ["a red circle", "a blue square", ""]}
    assert conditioner.outputs == {"crossattn": 32} and conditioner.input_keys == ("prompt",)
    assert conditioner.dropout == pytest.approx(0.1)
    with torch.no_grad():
        cond = conditioner(batch)["crossattn"]
        uncond = conditioner.unconditional(batch)["crossattn"]
        empty = conditioner.encode_ids(conditioner.tokenize([""]))
        mixed = conditioner.for_training(batch, torch.Generator().manual_seed(0))["crossattn"]
    assert set(conditioner(batch)) == {"crossattn"} and cond.shape == uncond.shape == mixed.shape == (3, 77, 32)
    torch.testing.assert_close(uncond, empty.expand(3, -1, -1))
    torch.testing.assert_close(cond[2], uncond[0])
    assert rel_error(cond[0], cond[1]) > 1e-3
    ids = conditioner.tokenize(["a red circle"])
    assert ids.shape == (1, 77) and ids.dtype == torch.long and ids.device == conditioner.device
    with pytest.raises(ValueError, match="reads the input"):
        conditioner({"label": torch.tensor([1])})


def test_openclip_layout_pads_with_zero_and_no_position_ids():
    conditioner = CLIPTextConditioner(layout="openclip", context_dim=32, layers=2, heads=2)
    ids = conditioner.tokenize(["a"])
    assert ids[0, :3].tolist() == [BOS, 320, EOS] and (ids[0, 3:] == 0).all()
    assert all("position_ids" not in key for key in CLIPTextConditioner(**TINY_V1).state_dict())
    clone = copy.deepcopy(conditioner)
    assert clone.tokenizer.vocab is conditioner.tokenizer.vocab  # copies share the vocabulary


@pytest.mark.parametrize("params, message", [
    (dict(layout="sdxl"), "clip, openclip"),
    (dict(layer="middle"), "last, penultimate"),
    (dict(hidden_act="relu"), "quick_gelu, gelu"),
    (dict(context_dim=30, heads=4), "divisible"),
    (dict(layers=1, layer="penultimate"), "at least 2"),
    (dict(max_length=1), "max_length"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_parameters_name_the_conditioner(params, message):
    with pytest.raises(ValueError, match="CLIPTextConditioner") as error:
        CLIPTextConditioner(**{**dict(context_dim=32, layers=2, heads=2), **params})
    assert message in str(error.value)


def test_out_of_vocabulary_ids_are_refused(tiny_v1):
    with pytest.raises(ValueError, match=r"0\.\.999"):
        tiny_v1.encode_ids(tiny_v1.tokenize(["a cat"]))  # real CLIP ids exceed the tiny vocabulary


def test_bfloat16_close_to_float32(tiny_v1, shared_dir):
    ids = load_file(shared_dir / "golden" / "sd-tiny-io.safetensors")["clip.input_ids"]
    with torch.no_grad():
        reference = tiny_v1.encode_ids(ids)
        low = copy.deepcopy(tiny_v1).to(torch.bfloat16).encode_ids(ids)
    assert low.dtype == torch.bfloat16
    assert 0 < rel_error(low, reference) < 2e-2
