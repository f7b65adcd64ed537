"""Textual inversion: a trigger word expands to the file's vectors (checked against the text tower run on an
embedding table grown by hand), every file layout, SDXL's pairs, exact detach, and files refused unread."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from latentgen import registry
from latentgen.errors import AdapterError

SDXL_BATCH = {"prompt": ["a cat in my-style", "a dog"], "original_size": torch.tensor([[64, 64]] * 2),
              "crop_coords_top_left": torch.zeros(2, 2), "target_size": torch.tensor([[64, 64]] * 2)}


def embedding(path, **options):
    return registry.build("adapter", "embedding", path=path, **options)


def test_a1111_pt_expands_the_trigger_word(sd_tiny_sampler, tmp_path):
    pipe, tower = sd_tiny_sampler, sd_tiny_sampler.conditioner
    vectors = torch.randn(3, 32)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "x", "step": 5},
               tmp_path / "my-style.pt")
    plain_ids = tower.tokenize(["a cat in my-style"])
    with torch.no_grad():
        before = tower.encode_ids(plain_ids)
    adapter = pipe.attach(embedding(tmp_path / "my-style.pt"))
    assert adapter.token == "my-style"
    ids = tower.tokenize(["a cat in MY-STYLE", "my-styles stay words"])
    assert ids[0, :7].tolist() == [49406, 320, 2368, 530, 49408, 49409, 49410]  # BOS a cat in <3 new ids> ...
    assert ids[0, 7] == 49407 and (ids[1] < 49408).all()  # EOS; a longer word is not the trigger
    # the reference: the same tower with its embedding table grown by hand
    reference = tower.transformer.embeddings.token_embedding
    grown = torch.nn.Embedding(49411, 32)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([adapter._added[0]._added_weights[0].detach(), vectors]))
        mine = tower.encode_ids(ids)
        tower.transformer.embeddings.token_embedding = grown
        expected = tower.encode_ids(ids)
        tower.transformer.embeddings.token_embedding = reference
    assert torch.allclose(mine, expected, atol=1e-6)
    pipe.detach(adapter)
    assert torch.equal(tower.tokenize(["a cat in my-style"]), plain_ids)
    with torch.no_grad():
        assert torch.equal(tower.encode_ids(plain_ids), before)
    assert tower.transformer.embeddings.token_embedding.weight.shape[0] == 49408


def test_sdxl_pair_reaches_both_towers_and_the_pooled_vector(sdxl_tiny, tmp_path):
    path = tmp_path / "my-style.safetensors"
    safetensors.torch.save_file({"clip_l": torch.randn(2, 8), "clip_g": torch.randn(2, 16)}, str(path))
    with torch.no_grad():
        before = sdxl_tiny.conditioner(SDXL_BATCH)
    adapter = sdxl_tiny.attach(embedding(path))
    first, second = (tower for tower in sdxl_tiny.conditioner.conditioners[:2])
    assert first.tokenizer.added == {"my-style": [49408, 49409]} == second.tokenizer.added
    with torch.no_grad():
        after = sdxl_tiny.conditioner(SDXL_BATCH)
    for key in ("crossattn", "vector"):
        assert not torch.allclose(after[key][0], before[key][0])  # the prompt with the trigger word changed
        assert torch.equal(after[key][1], before[key][1])  # the other did not
    sdxl_tiny.detach(adapter)
    with torch.no_grad():
        assert all(torch.equal(value, before[key]) for key, value in sdxl_tiny.conditioner(SDXL_BATCH).items())


def test_diffusers_layout_brings_its_own_token_and_two_embeddings_stack(sd_tiny_sampler, tmp_path):
    torch.save({"<cat-toy>": torch.randn(32)}, tmp_path / "learned_embeds.bin")
    safetensors.torch.save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "other.safetensors"))
    first = sd_tiny_sampler.attach(embedding(tmp_path / "learned_embeds.bin"))
    second = sd_tiny_sampler.attach(embedding(tmp_path / "other.safetensors", token="zzstyle"))
    assert first.token == "<cat-toy>"
    ids = sd_tiny_sampler.conditioner.tokenize(["a <cat-toy> in zzstyle"])[0]
    assert 49408 in ids.tolist() and 49409 in ids.tolist()
    sd_tiny_sampler.detach(first)  # the later one is removed and added again: its word keeps working
    assert sd_tiny_sampler.conditioner.tokenizer.added == {"zzstyle": [49408]}
    with pytest.raises(AdapterError, match="already added"):
        sd_tiny_sampler.attach(embedding(tmp_path / "other.safetensors", token="zzstyle"))
    assert sd_tiny_sampler.adapters == [second]


def test_a_pickle_that_needs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(AdapterError, match="needs code to unpickle.*does not run code from files"):
        embedding(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize(("content", "match"), [
    ({}, "holds no vectors"),
    ({"string_to_param": {}}, "string_to_param is empty"),
    ({"a": torch.randn(2, 8), "b": torch.randn(2, 8)}, "is not a textual-inversion embedding"),
    ({"emb_params": torch.full((1, 32), float("inf"))}, "not finite"),
], ids=["empty", "empty-params", "foreign", "inf"])
def test_bad_files(tmp_path, content, match):
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(AdapterError, match=match):
        embedding(tmp_path / "bad.pt")
    with pytest.raises(AdapterError, match="does not exist"):
        embedding(tmp_path / "missing.pt")


def test_an_embedding_for_another_width_is_refused_naming_both(sdxl_tiny, sd_tiny_sampler, tmp_path):
    safetensors.torch.save_file({"emb_params": torch.randn(2, 768)}, str(tmp_path / "v1.safetensors"))
    with pytest.raises(AdapterError, match=r"vectors \{'': \(2, 768\)\}, none for this pipeline's 32-wide .*768: SD v1"):
        sd_tiny_sampler.attach(embedding(tmp_path / "v1.safetensors"))
    safetensors.torch.save_file({"emb_params": torch.randn(2, 8)}, str(tmp_path / "l-only.safetensors"))
    with pytest.raises(AdapterError, match="none for this pipeline's 16-wide text tower"):
        sdxl_tiny.attach(embedding(tmp_path / "l-only.safetensors"))  # SDXL needs clip_l and clip_g
    assert sdxl_tiny.adapters == [] and sdxl_tiny.conditioner.conditioners[0].tokenizer.added == {}
