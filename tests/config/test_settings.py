"""Typed settings: values arrive converted and checked against their schema, and the shipped configs are valid.

What the apps do with a bad setting (one `error:` line, before any work) is tested case by case in
tests/reliability/test_app_settings.py; `python benchmarks/bad_settings.py` times those commands as processes.
"""

from __future__ import annotations

import pytest

from latentgen.config.settings import SampleAppSettings, TrainRunSettings
from latentgen.config.typed import parse
from latentgen.errors import ConfigError


def test_settings_arrive_converted_and_checked():
    settings = parse(TrainRunSettings, {"train": {"denoiser": {"steps": "7", "lr": "2e-3"}}, "seed": 3})
    assert settings.train.denoiser.steps == 7 and settings.train.denoiser.lr == 0.002 and settings.seed == 3
    assert settings.train.codec.steps == 1000  # defaults fill what is not given
    with pytest.raises(ConfigError, match=r"^train.denoiser.grad_accumulation=3: must divide train.denoiser.batch_size=64"):
        parse(TrainRunSettings, {"train": {"denoiser": {"grad_accumulation": 3}}})
    with pytest.raises(ConfigError, match=r"^diffusion.beta_end=0.0001: must be larger than diffusion.beta_start"):
        parse(TrainRunSettings, {"diffusion": {"beta_end": 1e-4}})
    with pytest.raises(ConfigError, match=r"^checkpoint: not given; pass checkpoint=<path>"):
        parse(SampleAppSettings, {"checkpoint": "???"})
    with pytest.raises(ConfigError, match=r"^label=\[1, 'a'\]: must be an integer or a list of integers"):
        parse(SampleAppSettings, {"checkpoint": "x", "label": [1, "a"]})


def test_the_shipped_configs_are_valid_settings():
    from omegaconf import OmegaConf

    from latentgen.config import compose
    from latentgen.training.run import validated_config

    for experiment in ("smoke", "shapes", "shapes_single", "shapes_composed", "digits", "shapes_dit", "shapes_sr"):
        config = validated_config(compose("train", [f"experiment={experiment}"]))
        assert config["train"]["denoiser"]["steps"] >= 1
    sample = OmegaConf.to_container(compose("sample", ["checkpoint=x"]))
    assert parse(SampleAppSettings, {k: v for k, v in sample.items() if k != "scheduler"}).num_images == 4
