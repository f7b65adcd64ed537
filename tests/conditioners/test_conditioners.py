"""Built-in conditioners: shapes of their outputs, unconditional counterparts, training dropout."""

import pytest
import torch

from latentgen import registry
from latentgen.text.hash_tokenizer import HashWordTokenizer


def test_null_conditioner_gives_nothing():
    null = registry.build("conditioner", "null")
    assert null.outputs == {} and null({}) == {} and null.unconditional({}) == {} and null.input_keys == ()


@pytest.mark.parametrize("key, option", [("vector", "vector_dim"), ("crossattn", "context_dim")])
def test_class_label_outputs(key, option):
    conditioner = registry.build("conditioner", "class_label", num_classes=10, **{option: 16})
    cond = conditioner({"label": torch.tensor([0, 3, 9])})
    expected = (3, 16) if key == "vector" else (3, 1, 16)
    assert conditioner.outputs == {key: 16} and cond[key].shape == expected
    uncond = conditioner.unconditional({"label": torch.tensor([0, 3, 9])})[key]
    assert torch.equal(uncond[0], uncond[2]) and not torch.equal(uncond[0], cond[key][0])


def test_class_label_refuses_bad_labels_and_options():
    conditioner = registry.build("conditioner", "class_label", num_classes=10, vector_dim=8)
    with pytest.raises(ValueError, match="0..9"):
        conditioner({"label": torch.tensor([10])})
    with pytest.raises(ValueError, match="integer labels"):
        conditioner({"label": torch.tensor([1.5])})
    with pytest.raises(ValueError, match="reads the input"):
        conditioner({"prompt": ["a"]})
    with pytest.raises(ValueError, match="exactly one"):
        registry.build("conditioner", "class_label", num_classes=10, vector_dim=8, context_dim=8)


def test_training_dropout_rate():
    conditioner = registry.build("conditioner", "class_label", num_classes=4, vector_dim=4, dropout=0.25)
    labels = torch.zeros(20_000, dtype=torch.long)
    out = conditioner.for_training({"label": labels}, torch.Generator().manual_seed(0))["vector"]
    null_row = conditioner.embedding.weight[4]
    dropped = (out == null_row).all(dim=1).float().mean().item()
    assert dropped == pytest.approx(0.25, abs=0.015)


def test_hash_tokenizer():
    tokenizer = HashWordTokenizer(vocab_size=4096, max_length=6)
    ids = tokenizer(["A large RED circle!", "", "one two three four five six seven"])
    assert ids.shape == (3, 6)
    assert ids[0].tolist()[:2] == [1, tokenizer.word_id("a")] and tokenizer.word_id("red") == tokenizer(["red"])[0, 1]
    assert ids[1].tolist() == [1, 2, 0, 0, 0, 0]                  # start, end, padding
    assert ids[2, -1].item() == 2 and ids[2, 1:5].tolist() == [tokenizer.word_id(w) for w in "one two three four".split()]
    assert tokenizer(["red circle"]).tolist() == tokenizer(["Red  circle"]).tolist()  # case and spaces do not matter
    assert 3 <= min(tokenizer.word_id(w) for w in ["a", "b", "zebra"]) and max(tokenizer.word_id(w) for w in ["a", "zebra"]) < 4096


def test_text_conditioner():
    text = registry.build("conditioner", "text", context_dim=32, num_layers=1, num_heads=2, max_length=8)
    cond = text({"prompt": ["a red circle", "a blue square"]})["crossattn"]
    assert cond.shape == (2, 8, 32) and text.outputs == {"crossattn": 32}
    assert not torch.allclose(cond[0], cond[1])
    uncond = text.unconditional({"prompt": ["a red circle", "a blue square"]})["crossattn"]
    torch.testing.assert_close(uncond, text({"prompt": ["", ""]})["crossattn"])
    with pytest.raises(TypeError, match="strings"):
        text({"prompt": [3]})


def test_text_conditioner_pools_the_prompt_when_asked():
    text = registry.build("conditioner", "text", context_dim=32, num_layers=1, num_heads=2, max_length=8, vector_dim=24)
    prompts = {"prompt": ["a red circle", "a small blue star left of a large red square"]}
    cond = text(prompts)
    assert text.outputs == {"crossattn": 32, "vector": 24} and cond["vector"].shape == (2, 24)
    # The mean of the prompt's own token states, padding left out: "a red circle" pads 3 of its 8 places.
    ids = text.tokenize(prompts["prompt"][:1])
    kept = ids[0] != text.tokenizer.pad_id
    assert kept.sum() == 5
    torch.testing.assert_close(cond["vector"][0], text.pool(cond["crossattn"][0, kept].mean(0)))
    uncond = text.unconditional(prompts)
    torch.testing.assert_close(uncond["vector"], text({"prompt": ["", ""]})["vector"])
    assert not torch.allclose(cond["vector"][0], cond["vector"][1])
    for bad in (0, -3, 2.5, True, "wide"):
        with pytest.raises(ValueError, match="vector_dim must be a positive integer"):
            registry.build("conditioner", "text", vector_dim=bad)


def test_the_pooled_text_conditioner_keeps_the_conditioner_contract():
    # The contract suite runs on every registered conditioner with its small defaults, so without the pooled prompt;
    # this runs it with one: dropout, determinism, bfloat16 and rebuilding from the config, with "vector" as well.
    from latentgen.testing import check_conditioner

    checked = check_conditioner(lambda: registry.build("conditioner", "text", context_dim=16, num_layers=1,
                                                       num_heads=2, max_length=8, vector_dim=12))
    assert {"shapes", "dtype bfloat16", "determinism"} <= set(checked)
