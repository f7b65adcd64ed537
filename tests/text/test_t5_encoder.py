"""The native T5 v1.1 encoder against Stability AI's reference (../shared/golden/sd35-tiny-*), and its
relative-position buckets against the rule written out by hand."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from latentgen.text.t5_encoder import T5Encoder, relative_position_bucket

PREFIX = "text_encoders.t5xxl.transformer."


@pytest.fixture(scope="module")
def golden(shared_dir):
    weights = safetensors.torch.load_file(str(shared_dir / "golden" / "sd35-tiny-weights.safetensors"))
    io = safetensors.torch.load_file(str(shared_dir / "golden" / "sd35-tiny-io.safetensors"))
    return {key[len(PREFIX):]: value for key, value in weights.items() if key.startswith(PREFIX)}, io


def test_matches_the_reference_t5_encoder(golden):
    state, io = golden
    encoder = T5Encoder(vocab_size=32128, d_model=24, d_ff=60, num_layers=2, num_heads=3, d_kv=8)
    encoder.load_state_dict(state, strict=True)  # the released key layout, shared and embed_tokens both present
    assert encoder.shared.weight is encoder.encoder.embed_tokens.weight
    with torch.no_grad():
        out = encoder(io["tokens.t5xxl"])
    expected = io["t5xxl.last_hidden_state"]
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5


def test_buckets_follow_the_t5_rule():
    relative = torch.arange(-200, 201)
    buckets = relative_position_bucket(relative)
    # exact for |distance| < 8, keys after the query in the upper 16 buckets
    assert buckets[200 + 0] == 0 and buckets[200 + 3] == 16 + 3 and buckets[200 - 3] == 3
    # logarithmic from 8 up to 128, the last bucket of each half from there on
    assert buckets[200 + 8] == 16 + 8 and buckets[200 + 127] == 16 + 15 and buckets[200 + 200] == 16 + 15
    assert buckets[200 - 200] == 15
    expected = 8 + int(torch.log(torch.tensor(20.0) / 8) / torch.log(torch.tensor(16.0)) * 8)
    assert buckets[200 - 20] == expected and buckets[200 + 20] == 16 + expected
    assert bool((buckets[201:] >= buckets[200:-1]).all())  # monotone in the distance after the query
