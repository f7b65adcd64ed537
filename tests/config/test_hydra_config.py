"""Hydra config groups: every option composes and instantiates, values interpolate across components,
registry names are options without YAML, and a wrong option names the alternatives."""

from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException

from latentgen import registry
from latentgen.config import compose, group_options
from latentgen.pipeline import LatentDiffusionPipeline, build_component

GROUPS = ["codec", "denoiser", "conditioner", "scheduler", "dataset", "experiment"]


def options(group):
    """Every option Hydra offers for `group` (YAML files and registry entries)."""
    return group_options(group)


# Sizes that keep each option small enough for a test, whatever it is combined with.
TINY = ["experiment=smoke"]
# Options that only make sense with a matching partner (an inpainting denoiser for the masked image).
PARTNERS = {("conditioner", "masked_image"): ["denoiser.in_channels=9", "+denoiser.concat_channels=5"],
            ("conditioner", "concat_image"): ["denoiser.in_channels=7", "+denoiser.concat_channels=3"],
            ("conditioner", "text_low_res"): ["denoiser.in_channels=7", "+denoiser.concat_channels=3"],
            ("conditioner", "fourier_numbers"): ["denoiser.vector_dim=512"]}  # (height, width) x 256
# The paper's DiT sizes (33M to 675M parameters) are composed as they are but built one narrow block deep,
# patch size kept (tests/denoisers/test_dit.py checks each preset's parameter count).
PARTNERS.update({("denoiser", name): ["denoiser.depth=1", "denoiser.hidden_size=32", "denoiser.num_heads=2"]
                 for name in ["dit"] + [f"dit_{size}{patch}" for size in ("s", "b", "l", "xl") for patch in ("", "_4", "_8")]})

# SD3's T5 (T5-XXL by default) and the zeros in its place, at a test's width; T5 reads prompts with the test
# tokenizer (tests/text/test_t5_tokenizer.py writes it).
T5_TOKENIZER = Path(__file__).parents[1] / "data" / "t5" / "tokenizer.json"
PARTNERS[("conditioner", "t5_text")] = ["+conditioner.d_model=16", "+conditioner.layers=1", "+conditioner.heads=2",
                                        "+conditioner.d_kv=8", "+conditioner.d_ff=32", "+conditioner.vocab_size=128",
                                        f"+conditioner.tokenizer={T5_TOKENIZER}", "denoiser.context_dim=16"]
PARTNERS[("experiment", "tiny_decoder")] = ["base=some-model.safetensors"]  # distils from a base's codec
PARTNERS[("codec", "taesd")] = ["codec.downsamplings=1"]  # the smoke denoiser's latent grid needs factor 2
PARTNERS[("conditioner", "zero_tokens")] = ["+conditioner.width=16", "denoiser.context_dim=16"]

# The image-folder dataset reads a folder: two small PNGs (one captioned) kept with the tests.
PARTNERS[("dataset", "image_folder")] = [f"dataset.path={Path(__file__).parents[1] / 'data' / 'image_folder'}"]
# experiment=lora trains an adapter on a `base` checkpoint (tests/adapters/test_lora_training.py runs it); here
# its config composes, with the config's own components standing in for the base's.
PARTNERS[("experiment", "lora")] = [*PARTNERS[("dataset", "image_folder")], "base=some-model.safetensors",
                                    "dataset.image_size=64"]


def test_every_group_lists_every_registered_component():
    for kind in ["codec", "denoiser", "conditioner", "scheduler", "dataset"]:
        offered = set(options(kind))
        missing = set(registry.available(kind)) - offered - {"null"}
        assert not missing, f"{kind}: registered but not an option: {missing}"
    assert "unconditional" in options("conditioner")


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(group, option):
    overrides = TINY + [f"{group}={option}"] if group != "experiment" else [f"experiment={option}"]
    overrides += PARTNERS.get((group, option), [])
    cfg = compose("train", overrides)
    if group == "experiment":
        # Experiments set real budgets; build their components but do not train.
        pipe = LatentDiffusionPipeline.from_config(cfg)
        for kind in ("codec", "denoiser", "conditioner", "scheduler"):
            assert getattr(pipe, kind).registry_name == cfg[kind]["name"], kind
        assert build_component("dataset", cfg.dataset)[0]["image"].shape[-1] == cfg.sampling.width
        return
    if group == "dataset":
        dataset = build_component("dataset", {**cfg.dataset, **({"size": 16} if "size" in cfg.dataset else {})})
        assert len(dataset) > 0 and dataset[0]["image"].shape[0] == 3
        return
    pipe = LatentDiffusionPipeline.from_config(cfg)
    assert getattr(pipe, group).registry_name == (cfg[group]["name"] if cfg.get(group) else "null")
    reads = pipe.conditioner.input_keys
    inpainting = {"image": torch.zeros(1, 3, 16, 16), "mask": torch.ones(1, 1, 16, 16)} if "mask" in reads else {}
    if "low_res" in reads:  # an image for concat_image, resized to the latent grid
        inpainting["conditioning"] = {"low_res": torch.zeros(1, 3, 8, 8)}
    images = pipe("a red circle" if "prompt" in reads else None, labels=[1] if "label" in reads else None,
                  steps=1, seed=0, **inpainting)
    assert images[0].size == (cfg.sampling.width, cfg.sampling.height)


def test_values_interpolate_across_components():
    cfg = compose("train", TINY + ["codec=identity"])
    assert cfg.denoiser.in_channels == 3 == cfg.codec.latent_channels
    cfg = compose("train", TINY + ["conditioner=class_label"])
    assert cfg.denoiser.vector_dim == cfg.conditioner.vector_dim and cfg.denoiser.context_dim is None
    cfg = compose("train", TINY + ["conditioner=text_tiny", "conditioner.context_dim=48"])
    assert cfg.denoiser.context_dim == 48
    assert compose("train", TINY + ["~conditioner"]).denoiser.context_dim is None


def test_a_runtime_registered_component_is_an_option_at_once():
    from latentgen.schedulers.ddim import DDIMScheduler

    registry.register("scheduler", "ddim_copy_for_test", DDIMScheduler)
    try:
        cfg = compose("train", TINY + ["scheduler=ddim_copy_for_test", "+scheduler.eta=0.5"])
        assert dict(cfg.scheduler) == {"_target_": "latentgen.registry.build", "kind": "scheduler",
                                       "name": "ddim_copy_for_test", "eta": 0.5}
        assert build_component("scheduler", cfg.scheduler).eta == 0.5
    finally:
        registry.unregister("scheduler", "ddim_copy_for_test")


def test_an_unknown_option_names_the_available_ones():
    with pytest.raises(MissingConfigException) as error:
        compose("train", ["scheduler=dpm_magic"])
    message = str(error.value)
    assert "scheduler/dpm_magic" in message and "ddim" in message and "ddpm" in message


def test_a_config_that_names_an_import_path_is_refused():
    from latentgen.errors import ConfigError

    with pytest.raises(ConfigError, match="through the registry"):
        build_component("scheduler", {"_target_": "latentgen.schedulers.ddim.DDIMScheduler"})
    with pytest.raises(ConfigError, match="no 'name'"):
        build_component("scheduler", {"_target_": "latentgen.registry.build", "kind": "scheduler"})
