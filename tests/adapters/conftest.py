"""Pipelines and files the adapter tests share: the golden sd-tiny and sdxl-tiny models from ../shared, and the
smoke experiment's pipeline with a random denoiser."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from latentgen import LatentDiffusionPipeline


@pytest.fixture(scope="module")
def smoke() -> LatentDiffusionPipeline:
    """`experiment=smoke`'s pipeline, its denoiser's parameters drawn from N(0, 0.1): the untrained UNet's
    zero-initialised outputs would hide what an adapter changes. One per test module."""
    from latentgen.config import compose

    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"])).eval()
    torch.manual_seed(0)
    for parameter in pipe.denoiser.parameters():
        parameter.data.normal_(0, 0.1)
    return pipe


@pytest.fixture(scope="module")
def golden(shared_dir):
    return shared_dir / "golden"


@pytest.fixture
def sd_tiny(golden) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline.from_checkpoint(golden / "sd-tiny-weights.safetensors",
                                                   original_config=golden / "sd-tiny-config.yaml")


@pytest.fixture
def sdxl_tiny(golden) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline.from_checkpoint(golden / "sdxl-tiny-weights.safetensors",
                                                   original_config=golden / "sdxl-tiny-config.yaml")


@pytest.fixture(scope="module")
def lora_io(golden):
    return safetensors.torch.load_file(str(golden / "lora-tiny-io.safetensors"))


@pytest.fixture(scope="module")
def control_io(golden):
    return safetensors.torch.load_file(str(golden / "controlnet-tiny-io.safetensors"))


@pytest.fixture
def sd_tiny_sampler(golden) -> LatentDiffusionPipeline:
    """The sd-tiny architecture with random weights and the full CLIP vocabulary (the golden text tower has
    1000 ids, too few to tokenize a real prompt), for sampling end to end."""
    from latentgen.interop.original_config import pipeline_config, read_original_config

    original = read_original_config(golden / "sd-tiny-config.yaml")
    original["model"]["params"]["cond_stage_config"]["params"]["text_config"]["vocab_size"] = 49408
    torch.manual_seed(0)
    pipe = LatentDiffusionPipeline.from_config(pipeline_config(original))
    with torch.no_grad():  # the zero-initialised output convs would make every sample the same
        for parameter in pipe.denoiser.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    return pipe
