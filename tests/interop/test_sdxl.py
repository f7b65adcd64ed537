"""SDXL single files through the `sdxl` format: the tiny golden base and refiner load from their sgm YAML and
match the original end to end; the released layouts are built from the spec key for key (on the meta device);
export writes every tensor back bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentgen.errors import CheckpointError, ConfigError
from latentgen.pipeline import LatentDiffusionPipeline

MODELS = ("sdxl-tiny", "sdxl-refiner-tiny")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


@pytest.fixture(scope="module")
def golden(shared_dir):
    return shared_dir / "golden"


def load(golden, model: str, **options) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline.from_checkpoint(golden / f"{model}-weights.safetensors",
                                                   original_config=golden / f"{model}-config.yaml", **options)


@pytest.mark.parametrize("model", MODELS)
@torch.no_grad()
def test_the_tiny_golden_models_match_sgm(golden, model):
    pipe = load(golden, model)
    io = load_file(golden / f"{model}-io.safetensors")
    prompts = ["a photograph of an astronaut riding a horse",
               "A PAINTING of a Red Fox,   in the snow; highly-detailed!! 4k", ""]
    batch = {"prompt": prompts, "original_size": io["cond.original_size_as_tuple"],
             "crop_coords_top_left": io["cond.crop_coords_top_left"]}
    # the batch of ../shared/DESIGN.md: sizes and crops (B, 2), the refiner's aesthetic score (B,)
    batch.update({"target_size": io["cond.target_size_as_tuple"]} if "cond.target_size_as_tuple" in io
                 else {"aesthetic_score": io["cond.aesthetic_score"].reshape(-1)})
    cond, uncond = pipe.conditioner(batch), pipe.conditioner.unconditional(batch)
    for key in ("crossattn", "vector"):
        assert relative_error(cond[key], io[f"cond.{key}"]) < 1e-4
        # atol 1e-4: the size embeddings are cos/sin of arguments up to ~1e3 rad, whose float32 spacing alone
        # is 6e-5; another CPU's vectorized sin lands that far from the reference (measured 5.8e-5)
        assert torch.allclose(uncond[key], io[f"uncond.{key}"], atol=1e-4)
    out = pipe.denoiser(io["unet.x"], io["unet.t"], {"crossattn": io["unet.context"], "vector": io["unet.y"]})
    assert relative_error(out, io["unet.out"]) < 1e-4
    assert relative_error(pipe.schedule.sigmas.float(), io["denoiser.sigmas"]) < 1e-4  # LegacyDDPMDiscretization
    assert relative_error(pipe.codec.decode(io["vae.z"] * pipe.codec.scale_factor), io["vae.decoded"]) < 1e-4
    assert pipe.sampling["height"] == pipe.sampling["width"] == 1024


def test_base_and_refiner_are_told_apart_and_sniffed(golden):
    from latentgen.formats.dispatch import format_for
    from latentgen.interop.sdxl import infer_family
    from latentgen.interop.weights_file import WeightsFile

    for model, family in zip(MODELS, ("base", "refiner")):
        path = golden / f"{model}-weights.safetensors"
        assert format_for(path).name == "sdxl"
        assert infer_family(WeightsFile(path)) == family
    assert format_for(golden / "sd-tiny-weights.safetensors").name == "stable_diffusion"  # SD v1 stays SD v1


@pytest.mark.parametrize(("family", "spec"), [("base", "sdxl-base-keys.tsv"), ("refiner", "sdxl-refiner-keys.tsv")])
def test_the_released_layouts_equal_the_spec_key_for_key(shared_dir, family, spec):
    from latentgen.assembly import build_component
    from latentgen.interop.sdxl import SGM_LAYOUT
    from latentgen.interop.sgm_config import sgm_pipeline_config, standard_sgm_config
    from latentgen.kinds import module_parts

    expected = {}
    for line in (shared_dir / "spec" / spec).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            expected[key] = () if shape == "scalar" else tuple(int(n) for n in shape.split("x"))
    config = sgm_pipeline_config(standard_sgm_config(family))
    built = {}
    with torch.device("meta"):  # the full size without 10 GB of memory
        for kind in module_parts():
            for name, value in build_component(kind, config[kind]).state_dict().items():
                built[SGM_LAYOUT.file_key(f"{kind}.{name}")] = tuple(value.shape)
    assert sorted(set(expected) - set(built))[:5] == [] and sorted(set(built) - set(expected))[:5] == []
    assert {key: shape for key, shape in built.items() if expected[key] != shape} == {}


@torch.no_grad()
def test_export_writes_every_tensor_back_bit_for_bit(golden, tmp_path):
    source = golden / "sdxl-tiny-weights.safetensors"
    original = load_file(source)
    extra = {**original, "denoiser.sigmas": torch.linspace(0.03, 14.6, 1000)}  # a buffer some files carry
    with_buffer = tmp_path / "with_sigmas.safetensors"
    save_file(extra, with_buffer)
    pipe = LatentDiffusionPipeline.from_checkpoint(with_buffer, original_config=golden / "sdxl-tiny-config.yaml")
    written = load_file(pipe.save(tmp_path / "out.safetensors", format="sdxl"))
    assert written.keys() == extra.keys()
    assert all(torch.equal(written[key], extra[key]) for key in extra)
    again = LatentDiffusionPipeline.from_checkpoint(tmp_path / "out.safetensors")  # no YAML: the config it carries
    assert again.config["denoiser"] == pipe.config["denoiser"]


def test_bad_sdxl_inputs_are_refused_by_name(golden, tmp_path):
    with pytest.raises(CheckpointError, match=r"do not match '.*sdxl-refiner-tiny-config.yaml'"):  # base, refiner's
        LatentDiffusionPipeline.from_checkpoint(golden / "sdxl-tiny-weights.safetensors",
                                                original_config=golden / "sdxl-refiner-tiny-config.yaml")
    with pytest.raises(CheckpointError, match=r"do not match the released SDXL refiner config"):  # tiny, no YAML
        LatentDiffusionPipeline.from_checkpoint(golden / "sdxl-refiner-tiny-weights.safetensors")
    with pytest.raises(ConfigError, match=r"is a Stable Diffusion v1/v2 \(LDM\) inference YAML.*sgm YAML"):
        LatentDiffusionPipeline.from_checkpoint(golden / "sdxl-tiny-weights.safetensors",
                                                original_config=golden / "sd-tiny-config.yaml")
    with pytest.raises(ConfigError, match=r"is an SDXL \(sgm\) inference YAML.*LDM YAML"):  # and the other way
        LatentDiffusionPipeline.from_checkpoint(golden / "sd-tiny-weights.safetensors",
                                                original_config=golden / "sdxl-tiny-config.yaml")
    pipe = load(golden, "sdxl-tiny")
    with pytest.raises(ValueError, match=r"multiple of"):
        pipe("a fox", height=1002, width=1024, steps=1)
    weights = load_file(golden / "sdxl-tiny-weights.safetensors")
    weights["model.diffusion_model.out.2.weight"] = weights["model.diffusion_model.out.2.weight"].long()
    broken = tmp_path / "ints.safetensors"
    save_file(weights, broken)
    with pytest.raises(CheckpointError, match=r"not floating point"):
        LatentDiffusionPipeline.from_checkpoint(broken, original_config=golden / "sdxl-tiny-config.yaml")


@pytest.mark.parametrize("model", MODELS)
def test_generation_runs_through_the_generic_routes(golden, model):
    pipe = load(golden, model)
    # the refiner knows the least noisy fifth of the noise levels only: img2img at strength 0.2, not from noise
    start = {} if model == "sdxl-tiny" else {"image": torch.rand(1, 3, 32, 48) * 2 - 1, "strength": 0.2}
    images = pipe(["a fox", "a horse"], height=32, width=48, steps=10, seed=0, negative_prompts="blurry", **start)
    assert [image.size for image in images] == [(48, 32), (48, 32)]
    again = pipe("a fox", height=32, width=48, steps=10, seed=0, image=images[0], strength=0.2)  # img2img
    assert again[0].size == (48, 32)
    sized = pipe("a fox", height=32, width=48, steps=10, seed=0, output_type="latent",
                 conditioning={"original_size": (512, 768)}, **start)
    assert sized.shape == (1, 4, 16, 24)


@torch.no_grad()
def test_half_precision_files_load_into_the_requested_dtype(golden, tmp_path):
    reference = load(golden, "sdxl-tiny")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = reference.conditioner({"prompt": ["a fox"], "image_size": torch.tensor([[64, 64]])})
    expected = reference.denoiser(x, torch.tensor([500]), cond)
    for file_dtype in (torch.float16, torch.bfloat16):
        path = reference.save(tmp_path / f"{file_dtype}.safetensors", format="sdxl", dtype=file_dtype)
        assert {tensor.dtype for tensor in load_file(path).values()} == {file_dtype}
        for dtype in (torch.float32, torch.bfloat16):
            pipe = LatentDiffusionPipeline.from_checkpoint(path, dtype=dtype)
            assert {p.dtype for p in pipe.denoiser.parameters()} == {dtype}
            got = pipe.denoiser(x.to(dtype), torch.tensor([500]), {k: v.to(dtype) for k, v in cond.items()})
            # the file's rounding (fp16: 2^-11, bf16: 2^-8 per weight) bounds the difference
            assert relative_error(got.float(), expected) < (0.02 if torch.bfloat16 in (file_dtype, dtype) else 2e-3)
