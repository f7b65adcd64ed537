"""The t5_text conditioner against Stability AI's reference T5 on sd35-tiny, with a tokenizer (the small T5-shaped
tests/data/t5/tokenizer.json) and without one; and zero_tokens, SD3's stand-in for a T5 that is not loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from latentgen import registry
from latentgen.errors import CheckpointError, ConfigError

PREFIX = "text_encoders.t5xxl.transformer."
TINY = dict(d_model=24, layers=2, heads=3, d_kv=8, d_ff=60)  # sd35-tiny's T5 (vocab 32128)
TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "t5" / "tokenizer.json"


@pytest.fixture(scope="module")
def golden(shared_dir):
    weights = safetensors.torch.load_file(str(shared_dir / "golden" / "sd35-tiny-weights.safetensors"))
    io = safetensors.torch.load_file(str(shared_dir / "golden" / "sd35-tiny-io.safetensors"))
    state = {"transformer." + key[len(PREFIX):]: value for key, value in weights.items() if key.startswith(PREFIX)}
    return state, io


@pytest.fixture(scope="module")
def conditioner(golden):
    pytest.importorskip("tokenizers")
    conditioner = registry.build("conditioner", "t5_text", tokenizer=str(TOKENIZER), **TINY)
    conditioner.load_state_dict(golden[0], strict=True)
    return conditioner.eval()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


def test_encode_matches_the_reference_t5(golden):
    state, io = golden
    conditioner = registry.build("conditioner", "t5_text", **TINY)  # encode needs no tokenizer
    conditioner.load_state_dict(state, strict=True)
    assert any(key.startswith("transformer.encoder.block.1.layer.1.DenseReluDense.wi_0") for key in state)
    with torch.no_grad():
        out = conditioner.encode(io["tokens.t5xxl"])
    assert set(out) == {"crossattn"} and out["crossattn"].shape == (3, 77, 24)
    assert relative_error(out["crossattn"], io["t5xxl.last_hidden_state"]) < 1e-5
    assert conditioner.outputs == {"crossattn": 24} and conditioner.input_keys == ("prompt",)


def test_forward_tokenizes_and_encodes(conditioner):
    prompts = ["a red fox in the snow", "a photograph of an astronaut riding a horse"]
    with torch.no_grad():
        cond = conditioner({"prompt": prompts})
        expected = conditioner.encode(conditioner.tokenizer(prompts))
    assert cond["crossattn"].shape == (2, 77, 24) and cond["crossattn"].dtype == torch.float32
    assert torch.equal(cond["crossattn"], expected["crossattn"])
    assert conditioner.tokenize(prompts)[:, 0].ne(0).all()  # no start token: the first piece comes first
    long = " ".join(["red fox in the snow"] * 40)
    with torch.no_grad():
        longer = conditioner({"prompt": [long, "red fox"]})["crossattn"]
    assert longer.shape[0] == 2 and longer.shape[1] > 77 and longer.shape[2] == 24


def test_unconditional_is_the_empty_prompt(conditioner):
    with torch.no_grad():
        uncond = conditioner.unconditional({"prompt": ["a red fox", "a blue star", "x"]})["crossattn"]
        empty = conditioner.encode(conditioner.tokenizer([""]))["crossattn"]
    assert uncond.shape == (3, 77, 24)
    assert all(torch.equal(row, empty[0]) for row in uncond)
    long = " ".join(["red fox in the snow"] * 40)
    with torch.no_grad():  # as long as forward's conditioning, so that guidance can pair them
        cond, uncond = conditioner({"prompt": [long]}), conditioner.unconditional({"prompt": [long]})
    assert uncond["crossattn"].shape == cond["crossattn"].shape


def test_max_length_cuts_the_prompts(golden):
    pytest.importorskip("tokenizers")
    conditioner = registry.build("conditioner", "t5_text", tokenizer=str(TOKENIZER), max_length=80, **TINY)
    tokens = conditioner.tokenize([" ".join(["red fox in the snow"] * 40)])
    assert tokens.shape == (1, 80) and tokens[0, -1] == 1


def test_without_a_tokenizer_prompts_are_refused():
    conditioner = registry.build("conditioner", "t5_text", **TINY)
    for call in (conditioner, conditioner.unconditional):
        with pytest.raises(ConfigError, match=r"pass tokenizer=<spiece.model or tokenizer.json>"):
            call({"prompt": ["a red fox"]})
    with pytest.raises(ValueError, match="'prompt'"):  # a missing input is named before the tokenizer
        conditioner({"caption": ["a red fox"]})


def test_bad_parameters_and_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="has no parameter conditioner.layer_count"):
        registry.build("conditioner", "t5_text", layer_count=2)
    for option, value in (("d_model", 0), ("heads", 2.5), ("num_buckets", 2), ("dropout", 1.5), ("min_length", -1),
                          ("max_length", 10)):
        with pytest.raises(ConfigError, match=option):
            registry.build("conditioner", "t5_text", **{**TINY, option: value})
    with pytest.raises(CheckpointError, match="does not exist"):  # the tokenizer is read when the model is built
        registry.build("conditioner", "t5_text", tokenizer=str(tmp_path / "spiece.model"), **TINY)
    pytest.importorskip("tokenizers")
    with pytest.raises(CheckpointError, match="120 pieces but the T5 embedding has 100 rows"):
        registry.build("conditioner", "t5_text", tokenizer=str(TOKENIZER), **{**TINY, "vocab_size": 100})


def test_token_ids_outside_the_vocabulary_are_refused():
    conditioner = registry.build("conditioner", "t5_text", **{**TINY, "vocab_size": 50})
    with pytest.raises(ValueError, match=r"token ids must lie in 0..49"):
        conditioner.encode(torch.tensor([[3, 50, 1]]))
    with pytest.raises(ValueError, match="integer tensor"):
        conditioner.encode(torch.zeros(1, 4))


# ---- zero_tokens ------------------------------------------------------------------------------------------------

def test_zero_tokens_gives_zeros_for_every_prompt():
    zeros = registry.build("conditioner", "zero_tokens")
    assert zeros.outputs == {"crossattn": 4096} and zeros.input_keys == ("prompt",)
    small = registry.build("conditioner", "zero_tokens", width=8, tokens=5)
    for call in (small, small.unconditional):
        out = call({"prompt": ["a red fox", "", "x"]})
        assert set(out) == {"crossattn"} and out["crossattn"].shape == (3, 5, 8)
        assert out["crossattn"].dtype == torch.float32 and not out["crossattn"].any()
    assert small({"prompt": "one"})["crossattn"].shape == (1, 5, 8)
    assert small.state_dict() == {} and not list(small.parameters())


def test_zero_tokens_follow_the_module_dtype_and_device():
    zeros = registry.build("conditioner", "zero_tokens", width=8, tokens=5).to(torch.bfloat16)
    assert zeros({"prompt": ["a"]})["crossattn"].dtype == torch.bfloat16
    zeros = zeros.to("meta")
    assert zeros.device.type == "meta" and zeros({"prompt": ["a"]})["crossattn"].device.type == "meta"


def test_zero_tokens_refuses_bad_parameters():
    for option, value in (("width", 0), ("tokens", -1), ("input_key", "")):
        with pytest.raises(ConfigError, match=option):
            registry.build("conditioner", "zero_tokens", **{option: value})
    with pytest.raises(ValueError, match="'prompt'"):
        registry.build("conditioner", "zero_tokens")({"label": [1]})
