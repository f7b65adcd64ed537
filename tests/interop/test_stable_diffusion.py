"""Original Stable Diffusion single-file checkpoints: golden parity, full-size layouts, variants, export,
tasks and bad files."""

import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from latentgen.errors import CheckpointError, ConfigError
from latentgen.fast_path import optimize_for_inference
from latentgen.interop.original_config import pipeline_config, standard_config
from latentgen.interop.stable_diffusion import load_pipeline, save_original
from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.testing import fill_zero_parameters


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def golden(shared_dir):
    g = shared_dir / "golden"
    return {"weights": g / "sd-tiny-weights.safetensors", "config": g / "sd-tiny-config.yaml",
            "io": safetensors.torch.load_file(str(g / "sd-tiny-io.safetensors")),
            "cases": json.loads((g / "clip-tokenizer-cases.json").read_text())}


@pytest.fixture(scope="module")
def tiny(golden):
    return load_pipeline(golden["weights"], original_config=golden["config"])


def tiny_config(golden, **unet):
    """The golden tiny architecture with a full CLIP vocabulary (the golden tower has 1000 token ids,
    too few for real prompts: even the start and end tokens are 49406 and 49407)."""
    original = yaml.safe_load(golden["config"].read_text())
    original["model"]["params"]["cond_stage_config"]["params"]["text_config"]["vocab_size"] = 49408
    original["model"]["params"]["unet_config"]["params"].update(unet)
    if unet.get("in_channels", 4) > 4:
        original["model"]["params"]["conditioning_key"] = "hybrid"
    return original


def randomized(pipe):
    """Random weights everywhere: the UNet's zero-initialized output layers would hide the conditioning."""
    fill_zero_parameters(pipe.denoiser)
    return pipe


@pytest.fixture(scope="module")
def prompted(golden, tmp_path_factory):
    """A tiny original-layout checkpoint that takes real prompts, loaded back: (pipeline, file, config)."""
    torch.manual_seed(0)
    original = tiny_config(golden)
    path = save_original(randomized(LatentDiffusionPipeline.from_config(pipeline_config(original))),
                         tmp_path_factory.mktemp("sd") / "prompted.safetensors")
    return load_pipeline(path, original_config=original), path, original


# ---- golden parity -----------------------------------------------------------------------------

def test_golden_unet_vae_clip_and_tokenizer(tiny, golden):
    io = golden["io"]
    with torch.no_grad():
        out = tiny.denoiser(io["unet.x"], io["unet.t"].float(), {"crossattn": io["unet.context"]})
        assert rel_err(out, io["unet.out"]) < 1e-4
        mean, _ = io["vae.moments"].chunk(2, dim=1)
        assert tiny.codec.scale_factor == pytest.approx(0.18215)
        assert rel_err(tiny.codec.encode(io["vae.image"]), mean * 0.18215) < 1e-4
        assert rel_err(tiny.codec.decode(io["vae.z"] * 0.18215), io["vae.decoded"]) < 1e-4
        assert rel_err(tiny.conditioner.encode_ids(io["clip.input_ids"]), io["clip.last_hidden_state"]) < 1e-4
    for case in golden["cases"]:
        assert tiny.conditioner.tokenize([case["text"]])[0].tolist() == case["input_ids"]


def test_config_as_dict_and_sampling_defaults(tiny, golden):
    pipe = load_pipeline(golden["weights"], original_config=yaml.safe_load(golden["config"].read_text()))
    assert pipe.sampling["height"] == 32 and pipe.diffusion["prediction_type"] == "eps"
    assert pipe.diffusion["noise_schedule"] == "scaled_linear"  # the LDM code's "linear" is linear in sqrt(beta)
    torch.testing.assert_close(pipe.schedule.alphas_cumprod, tiny.schedule.alphas_cumprod)


# ---- full-size layouts -------------------------------------------------------------------------

class SpecWeights:
    """The keys and shapes of ../shared/spec/*.tsv as a weights source of meta tensors: checks the whole
    mapping at full size without gigabytes of weights."""

    def __init__(self, path: Path, in_channels: int | None = None):
        self.path = path
        self.shapes = {}
        for line in path.read_text().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, shape = line.split("\t")
            self.shapes[key] = () if shape == "scalar" else tuple(int(n) for n in shape.split("x"))
        if in_channels:
            key = "model.diffusion_model.input_blocks.0.0.weight"
            self.shapes[key] = (self.shapes[key][0], in_channels, *self.shapes[key][2:])

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return self.shapes[key]

    def __contains__(self, key):
        return key in self.shapes

    def dtype(self, key):
        return torch.float32

    def tensor(self, key, dtype=None):
        return torch.empty(self.shapes[key], device="meta", dtype=dtype or torch.float32)


@pytest.mark.parametrize("spec, family, context, prediction", [
    ("sd-v1-keys.tsv", "clip", 768, "eps"), ("sd-v2-keys.tsv", "openclip", 1024, "v")])
def test_full_size_checkpoints_load_with_no_missing_or_unexpected_keys(shared_dir, spec, family, context, prediction):
    weights = SpecWeights(shared_dir / "spec" / spec)
    pipe = load_pipeline(weights, dtype=torch.bfloat16)
    assert pipe.conditioner.layout == family and pipe.denoiser.context_dim == context
    assert pipe.diffusion["prediction_type"] == prediction and pipe.sampling["height"] == (512 if context == 768 else 768)
    loaded = set(pipe.source.origin.values())
    model_keys = {k for k in weights.keys() if k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))}
    assert loaded == model_keys  # every model tensor has a place, and every place a tensor
    assert set(pipe.source.passthrough) == set(weights.keys()) - model_keys  # schedule buffers etc. pass through
    assert next(pipe.denoiser.parameters()).dtype == torch.bfloat16


def test_a_v1_inpainting_checkpoint_is_recognised(shared_dir):
    pipe = load_pipeline(SpecWeights(shared_dir / "spec" / "sd-v1-keys.tsv", in_channels=9))
    assert pipe.denoiser.concat_channels == 5 and pipe.conditioner.registry_name == "stack"
    assert set(pipe.conditioner.input_keys) == {"prompt", "mask", "masked_image_latents"}


# ---- file variants -----------------------------------------------------------------------------

def _rewrite(source, target, edit):
    tensors = safetensors.torch.load_file(str(source))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(target))
    return target


def test_a_file_written_from_scratch_has_the_released_v1_text_layout(prompted, shared_dir):
    """`cond_stage_model.transformer.text_model.*`, as released v1 files and ../shared/spec/sd-v1-keys.tsv have it
    (tools such as stable-diffusion.cpp refuse a v1 file without `text_model.`); loading reads it back."""
    pipe, path, _ = prompted
    text_keys = [key for key in safetensors.torch.load_file(str(path)) if key.startswith("cond_stage_model.")]
    assert text_keys and all(key.startswith("cond_stage_model.transformer.text_model.") for key in text_keys)
    spec = {line.split("\t")[0] for line in (shared_dir / "spec" / "sd-v1-keys.tsv").read_text().splitlines()
            if line.startswith("cond_stage_model.") and "position_ids" not in line}
    assert {key.rsplit(".layers.", 1)[0] for key in text_keys} <= {key.rsplit(".layers.", 1)[0] for key in spec}
    assert set(pipe.source.origin.values()) >= set(text_keys)


def test_round_trip_is_bit_identical(tiny, golden, tmp_path):
    out = save_original(tiny, tmp_path / "again.safetensors")
    before, after = safetensors.torch.load_file(str(golden["weights"])), safetensors.torch.load_file(str(out))
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)


def test_text_model_layout_ema_and_extra_tensors(golden, tmp_path):
    def edit(t):
        for key in [k for k in t if k.startswith("cond_stage_model.transformer.")]:
            t[key.replace("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.")] = t.pop(key)
        t["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        for key in [k for k in t if k.startswith("model.diffusion_model.")]:
            t["model_ema." + key[len("model."):].replace(".", "")] = t[key] * 0.5
        t["model_ema.num_updates"] = torch.tensor(7)
        t["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    path = _rewrite(golden["weights"], tmp_path / "variant.safetensors", edit)
    io = golden["io"]
    ema = load_pipeline(path, original_config=golden["config"])
    plain = load_pipeline(path, original_config=golden["config"], use_ema=False)
    key = "out.2.weight"
    torch.testing.assert_close(ema.denoiser.state_dict()[key], plain.denoiser.state_dict()[key] * 0.5)
    assert rel_err(plain.conditioner.encode_ids(io["clip.input_ids"]), io["clip.last_hidden_state"]) < 1e-4
    out = save_original(ema, tmp_path / "out.safetensors")
    before, after = safetensors.torch.load_file(str(path)), safetensors.torch.load_file(str(out))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fp16_file_loads_straight_into_bf16(prompted, tmp_path):
    _, source, original = prompted
    path = _rewrite(source, tmp_path / "half.safetensors",
                    lambda t: t.update({k: v.half() for k, v in t.items() if v.is_floating_point()}))
    pipe = load_pipeline(path, original_config=original, dtype=torch.bfloat16)
    half = safetensors.torch.load_file(str(path))["model.diffusion_model.out.2.weight"]
    got = pipe.denoiser.state_dict()["out.2.weight"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, half.to(torch.bfloat16))
    assert len(pipe("a red circle", steps=2, seed=0)) == 1
    exported = save_original(pipe, tmp_path / "back.safetensors", dtype=torch.float16)
    assert safetensors.torch.load_file(str(exported))["model.diffusion_model.out.2.weight"].dtype == torch.float16


def test_ckpt_files(tiny, golden, tmp_path):
    tensors = safetensors.torch.load_file(str(golden["weights"]))
    torch.save({"state_dict": tensors, "global_step": 470000}, tmp_path / "model.ckpt")
    pipe = LatentDiffusionPipeline.from_checkpoint(tmp_path / "model.ckpt", original_config=golden["config"])
    io = golden["io"]
    with torch.no_grad():
        torch.testing.assert_close(pipe.denoiser(io["unet.x"], io["unet.t"].float(), {"crossattn": io["unet.context"]}),
                                   tiny.denoiser(io["unet.x"], io["unet.t"].float(), {"crossattn": io["unet.context"]}))

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": tensors, "callback": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refuses to run it"):
        load_pipeline(tmp_path / "evil.ckpt", original_config=golden["config"])
    with open(tmp_path / "legacy.ckpt", "wb") as handle:  # a pre-zip pickle: not mappable, still refused
        pickle.dump({"state_dict": {}, "callback": Payload()}, handle)
    with pytest.raises(CheckpointError, match="refuses to run it"):
        load_pipeline(tmp_path / "legacy.ckpt", original_config=golden["config"])


# ---- latentgen's own format, both ways ---------------------------------------------------------

def test_latentgen_format_both_ways(prompted, tmp_path):
    pipe, _, original = prompted
    # The same weight layout as load_pipeline's, so that the sums run in the same order.
    own = optimize_for_inference(LatentDiffusionPipeline.from_checkpoint(pipe.save(tmp_path / "own.safetensors")))
    first = pipe("a red circle", steps=3, seed=1, output_type="tensor")
    assert torch.equal(first, own("a red circle", steps=3, seed=1, output_type="tensor"))
    back = load_pipeline(save_original(own, tmp_path / "sd.safetensors"), original_config=original)
    assert torch.equal(first, back("a red circle", steps=3, seed=1, output_type="tensor"))


def test_a_pipeline_without_a_clip_tower_cannot_take_the_original_layout(tmp_path):
    from latentgen.config import compose

    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"]))
    with pytest.raises(ConfigError, match="no place for the conditioner weight .* of conditioner 'text'.*format='latentgen'"):
        save_original(pipe, tmp_path / "x.safetensors")
    pipe.save(tmp_path / "x.safetensors", format="latentgen")  # the fix it names
    with pytest.raises(ConfigError, match="no place for the conditioner weight"):
        pipe.save(tmp_path / "y.safetensors", format="stable_diffusion")  # the same refusal through the format
    assert not (tmp_path / "y.safetensors").exists()


# ---- tasks -------------------------------------------------------------------------------------

def test_txt2img_with_negative_prompts_batches_and_schedulers(prompted):
    from latentgen import registry

    tiny = prompted[0]
    images = tiny(["a red circle", "a blue square"], negative_prompts="blurry", num_images=2, steps=2, seed=0)
    assert len(images) == 4 and images[0].size == (32, 32)
    tiny.scheduler = registry.build("scheduler", "ddpm")
    try:
        assert len(tiny("a red circle", steps=2, seed=0)) == 1
    finally:
        tiny.scheduler = registry.build("scheduler", "ddim")


def test_img2img_strength(prompted, golden):
    tiny = prompted[0]
    image = golden["io"]["vae.image"]  # (1, 3, 32, 32)
    known = tiny.codec.encode(image)
    light = tiny("a red circle", image=image, strength=0.05, steps=20, seed=0, output_type="latent")
    heavy = tiny("a red circle", image=image, strength=1.0, steps=20, seed=0, output_type="latent")
    assert rel_err(light, known) < rel_err(heavy, known)
    for strength in (0.0, 1.5):
        with pytest.raises(ValueError, match="strength"):
            tiny("a red circle", image=image, strength=strength, steps=2)


def test_inpainting_by_latent_blending_keeps_the_unmasked_part(prompted, golden):
    tiny = prompted[0]
    image = golden["io"]["vae.image"]
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1  # repaint the right half
    latents = tiny("a red circle", image=image, mask=mask, steps=4, seed=0, output_type="latent")
    known = tiny.codec.encode(image)
    assert torch.equal(latents[..., :8], known[..., :8])  # left half of the 16x16 latents is the original
    assert not torch.allclose(latents[..., 8:], known[..., 8:])
    with pytest.raises(ValueError, match="mask needs the image"):
        tiny("a red circle", mask=mask, steps=1)


def test_nine_channel_inpainting_model(golden, tmp_path):
    original = tiny_config(golden, in_channels=9)
    torch.manual_seed(0)
    pipe = randomized(LatentDiffusionPipeline.from_config(pipeline_config(original)))
    path = save_original(pipe, tmp_path / "inpaint.safetensors")
    loaded = load_pipeline(path, original_config=original)
    image, mask = golden["io"]["vae.image"], torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    out = loaded("a red circle", image=image, mask=mask, steps=2, seed=0, output_type="tensor")
    other = loaded("a red circle", image=-image, mask=mask, steps=2, seed=0, output_type="tensor")
    assert out.shape == (1, 3, 32, 32) and not torch.allclose(out, other)  # the masked image steers the result
    with pytest.raises(ValueError, match="inpainting model"):
        loaded("a red circle", steps=1)


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_files_name_the_problem(golden, tmp_path):
    data = golden["weights"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pipeline(tmp_path / "cut.safetensors", original_config=golden["config"])
    safetensors.torch.save_file({"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(1)},
                                str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion v1 or v2 checkpoint.*encoder.weight|decoder.bias"):
        load_pipeline(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"codec weights .* of another shape, first: \['first_stage_model.encoder.conv_in.weight: file \(32, 3, 3, 3\) vs config \(128, 3, 3, 3\)"):
        load_pipeline(golden["weights"])  # the tiny file read as a standard v1 model
    missing = _rewrite(golden["weights"], tmp_path / "missing.safetensors",
                       lambda t: t.pop("first_stage_model.decoder.conv_out.bias"))
    with pytest.raises(CheckpointError, match=r"codec weights .*1 missing, first: \['first_stage_model.decoder.conv_out.bias \(3,\)'\]"):
        load_pipeline(missing, original_config=golden["config"])
    extra = _rewrite(golden["weights"], tmp_path / "extra.safetensors",
                     lambda t: t.update({"model.diffusion_model.surprise.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"no place for, first: \['model.diffusion_model.surprise.weight \(3, 3\)'\]"):
        load_pipeline(extra, original_config=golden["config"])
    with pytest.raises(CheckpointError, match="no 'model_ema"):
        load_pipeline(golden["weights"], original_config=golden["config"], use_ema=True)


def test_unsupported_original_options_are_named():
    config = standard_config("v1")
    config["model"]["params"]["unet_config"]["params"]["use_scale_shift_norm"] = True
    with pytest.raises(ConfigError, match="use_scale_shift_norm"):
        pipeline_config(config)
    config = standard_config("v1")
    config["model"]["params"]["cond_stage_config"]["target"] = "ldm.modules.encoders.modules.BERTEmbedder"
    with pytest.raises(ConfigError, match="BERTEmbedder"):
        pipeline_config(config)


@pytest.mark.slow
def test_latentgen_sample_runs_an_original_checkpoint(prompted, tmp_path):
    import subprocess
    import sys

    _, path, original = prompted
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(original))
    result = subprocess.run([str(Path(sys.executable).parent / "latentgen-sample"), f"checkpoint={path}",
                             f"original_config={tmp_path / 'config.yaml'}", "prompt=a red circle", "num_images=2", "steps=2",
                             "dtype=bfloat16", "compile=true", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "images").iterdir())) == 2 and (tmp_path / "grid.png").is_file()


def test_v2_layout_openclip_penultimate_through_the_loader(golden, shared_dir, tmp_path):
    """The v2 path end to end: OpenCLIP keys under cond_stage_model.model.*, penultimate layer, v-prediction."""
    g = shared_dir / "golden"
    tensors = {k: v for k, v in safetensors.torch.load_file(str(golden["weights"])).items()
               if not k.startswith("cond_stage_model.")}
    openclip = safetensors.torch.load_file(str(g / "sd2-openclip-tiny-weights.safetensors"))
    safetensors.torch.save_file({**tensors, **openclip}, str(tmp_path / "v2.safetensors"))
    original = yaml.safe_load(golden["config"].read_text())
    params = original["model"]["params"]
    params["parameterization"] = "v"
    params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {
        "layer": "penultimate", "text_config": {
            "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
            "intermediate_size": openclip["cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]}}}
    pipe = load_pipeline(tmp_path / "v2.safetensors", original_config=original)
    io = safetensors.torch.load_file(str(g / "sd2-openclip-tiny-io.safetensors"))
    with torch.no_grad():
        assert rel_err(pipe.conditioner.encode_ids(io["openclip.input_ids"]), io["openclip.penultimate_ln"]) < 1e-4
    assert pipe.diffusion["prediction_type"] == "v" and pipe.conditioner.pad_id == 0
    assert len(pipe("a red circle", steps=2, seed=0)) == 1
    out = save_original(pipe, tmp_path / "v2-again.safetensors")
    again = safetensors.torch.load_file(str(out))
    source = safetensors.torch.load_file(str(tmp_path / "v2.safetensors"))
    assert again.keys() == source.keys() and all(torch.equal(again[k], source[k]) for k in source)
