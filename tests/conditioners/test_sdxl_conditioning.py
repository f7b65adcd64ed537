"""SDXL's conditioning stack and UNets against the original implementation (sgm) on the tiny golden models:
two text towers side by side, the pooled OpenCLIP embedding and the Fourier-embedded sizes, crops and scores
as one vector, and the unconditional branch as sgm's sampling makes it (zeros for the base, "" for the refiner)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from latentgen import registry
from latentgen.conditioners.fourier_numbers import fourier_features

PROMPTS = ["a photograph of an astronaut riding a horse", "A PAINTING of a Red Fox,   in the snow; highly-detailed!! 4k",
           ""]
TEXT = dict(layer="penultimate", final_norm=False, heads=2, layers=3)
BASE = [dict(name="clip_text", layout="clip", context_dim=8, intermediate_size=32, zero_unconditional=True, **TEXT),
        dict(name="clip_text", layout="openclip", context_dim=16, pooled=True, projection_dim=24,
             zero_unconditional=True, **TEXT),
        dict(name="fourier_numbers", input_key="original_size"),
        dict(name="fourier_numbers", input_key="crop_coords_top_left", default=[0, 0]),
        dict(name="fourier_numbers", input_key="target_size")]
REFINER = [dict(name="clip_text", layout="openclip", context_dim=16, pooled=True, projection_dim=24, **TEXT),
           dict(name="fourier_numbers", input_key="original_size"),
           dict(name="fourier_numbers", input_key="crop_coords_top_left", default=[0, 0]),
           dict(name="fourier_numbers", input_key="aesthetic_score", count=1, default=[6.0], unconditional=[2.5])]
UNETS = {"sdxl-tiny": dict(channel_mult=[1, 1, 2], transformer_depth=[1, 1, 2], context_dim=24, vector_dim=1560),
         "sdxl-refiner-tiny": dict(channel_mult=[1, 1, 2, 2], transformer_depth=2, context_dim=[16, 16],
                                   vector_dim=1304)}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


@pytest.fixture(scope="module")
def golden(shared_dir):
    def load(model: str) -> tuple[dict, dict]:
        return (load_file(shared_dir / "golden" / f"{model}-weights.safetensors"),
                load_file(shared_dir / "golden" / f"{model}-io.safetensors"))
    return load


def stack(members: list[dict], weights: dict) -> torch.nn.Module:
    """The conditioner stack with the file's `conditioner.embedders.N.*` weights in its members."""
    conditioner = registry.build("conditioner", "stack", conditioners=members)
    state = {}
    for key, value in weights.items():
        found = re.match(r"conditioner\.embedders\.(\d+)\.(transformer\.text_model\.|model\.)(.*)", key)
        if found:
            state[f"conditioners.{found[1]}.{found[2].replace('text_model.', '')}{found[3]}"] = value
    conditioner.load_state_dict(state, strict=True)
    return conditioner.eval()


@torch.no_grad()
def test_base_text_towers_and_conditioning_match_sgm(golden):
    weights, io = golden("sdxl-tiny")
    conditioner = stack(BASE, weights)
    clip, openclip = conditioner.conditioners[0], conditioner.conditioners[1]
    assert torch.equal(clip.tokenize(PROMPTS), io["clip.input_ids"])
    assert torch.equal(openclip.tokenize(PROMPTS), io["openclip.input_ids"])
    assert relative_error(clip.encode(io["clip.input_ids"])["crossattn"], io["clip.hidden"]) < 1e-4
    towers = openclip.encode(io["openclip.input_ids"])
    assert relative_error(towers["crossattn"], io["openclip.penultimate"]) < 1e-4
    assert relative_error(towers["vector"], io["openclip.pooled"]) < 1e-4
    batch = {"prompt": PROMPTS, "original_size": io["cond.original_size_as_tuple"],
             "crop_coords_top_left": io["cond.crop_coords_top_left"], "target_size": io["cond.target_size_as_tuple"]}
    cond, uncond = conditioner(batch), conditioner.unconditional(batch)
    assert conditioner.outputs == {"crossattn": 24, "vector": 1560}
    for key in ("crossattn", "vector"):
        assert relative_error(cond[key], io[f"cond.{key}"]) < 1e-4
    assert torch.equal(uncond["crossattn"], torch.zeros_like(uncond["crossattn"]))  # sgm zeroes the text
    assert relative_error(uncond["vector"], io["uncond.vector"]) < 1e-4  # ... but keeps the sizes


@torch.no_grad()
def test_refiner_conditioning_encodes_the_empty_prompt_and_the_negative_score(golden):
    weights, io = golden("sdxl-refiner-tiny")
    conditioner = stack(REFINER, weights)
    batch = {"prompt": PROMPTS, "original_size": io["cond.original_size_as_tuple"],
             "crop_coords_top_left": io["cond.crop_coords_top_left"], "aesthetic_score": io["cond.aesthetic_score"]}
    cond, uncond = conditioner(batch), conditioner.unconditional(batch)
    for key in ("crossattn", "vector"):
        assert relative_error(cond[key], io[f"cond.{key}"]) < 1e-4
        assert relative_error(uncond[key], io[f"uncond.{key}"]) < 1e-4


@pytest.mark.parametrize("model", list(UNETS))
@torch.no_grad()
def test_sdxl_unets_match_sgm(golden, model):
    weights, io = golden(model)
    unet = registry.build("denoiser", "unet", model_channels=32, attention_resolutions=[4, 2], num_res_blocks=2,
                          num_head_channels=16, use_linear_in_transformer=True, **UNETS[model])
    unet.load_state_dict({key.removeprefix("model.diffusion_model."): value for key, value in weights.items()
                          if key.startswith("model.diffusion_model.")}, strict=True)
    out = unet(io["unet.x"], io["unet.t"], {"crossattn": io["unet.context"], "vector": io["unet.y"]})
    assert relative_error(out, io["unet.out"]) < 1e-4


def test_fourier_features_are_sinusoids_of_each_number():
    numbers = torch.tensor([[1024.0, 768.0], [0.0, 3.0]])
    features = fourier_features(numbers, 256)
    assert features.shape == (2, 512)
    frequencies = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * torch.arange(128) / 128)
    expected = torch.cat([torch.cos(3.0 * frequencies), torch.sin(3.0 * frequencies)])  # float64 reference
    assert torch.allclose(features[1, 256:].double(), expected, atol=1e-6)
    assert torch.equal(features[1, :128], torch.ones(128)) and torch.equal(features[1, 128:256], torch.zeros(128))
    with pytest.raises(Exception, match=r"default needs 2 numbers"):
        registry.build("conditioner", "fourier_numbers", input_key="crop_coords_top_left", default=[0])
    with pytest.raises(Exception, match=r"context_dim as a list must repeat one width"):
        registry.build("denoiser", "unet", model_channels=32, num_head_channels=16, context_dim=[16, 24])


def test_the_pipeline_fills_the_size_and_takes_numbers_through_conditioning():
    from latentgen.config import compose
    from latentgen.config.containers import to_plain
    from latentgen.pipeline import LatentDiffusionPipeline

    config = to_plain(compose("train", ["experiment=smoke"]))
    text = config["conditioner"]
    config["conditioner"] = {"name": "stack", "conditioners": [
        {key: value for key, value in text.items() if key not in ("_target_", "kind")},
        {"name": "fourier_numbers", "input_key": "original_size"}]}
    config["denoiser"]["vector_dim"] = 512
    pipe = LatentDiffusionPipeline.from_config(config)
    with torch.no_grad():  # an untrained UNet's zero-initialised layers would ignore the vector altogether
        for parameter in pipe.denoiser.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))

    def latents(**options):
        return pipe("a red circle", steps=1, seed=0, output_type="latent", **options)

    default = latents()  # original size = the requested 16 x 16
    assert torch.equal(default, latents(conditioning={"original_size": (16, 16)}))
    assert not torch.equal(default, latents(conditioning={"original_size": [64, 48]}))
    with pytest.raises(ValueError, match=r"'original_size' needs 2 number\(s\) per item"):
        latents(conditioning={"original_size": [64, 48, 2]})
    with pytest.raises(ValueError, match=r"conditioning\['original_size'\] holds NaN"):
        latents(conditioning={"original_size": [float("nan"), 48]})


@torch.no_grad()
def test_sdxl_autoencoder_matches_sgm(golden):
    weights, io = golden("sdxl-tiny")
    codec = registry.build("codec", "kl", latent_channels=4, channels=32, channel_mult=[1, 2], num_res_blocks=1,
                           attn_resolutions=[], z_channels=4, scale_factor=0.13025)
    codec.load_state_dict({key.removeprefix("first_stage_model."): value for key, value in weights.items()
                           if key.startswith("first_stage_model.")}, strict=True)
    assert relative_error(codec.quant_conv(codec.encoder(io["vae.image"])), io["vae.moments"]) < 1e-4
    assert relative_error(codec.decode(io["vae.z"] * 0.13025), io["vae.decoded"]) < 1e-4  # decode takes scaled z
