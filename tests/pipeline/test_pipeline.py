"""The generic pipeline: assembly checks, reproducible sampling, guidance, and checkpoints."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from latentgen import registry
from latentgen.checkpoint import read_metadata
from latentgen.config import compose
from latentgen.errors import CheckpointError, ConfigError, IncompatibleComponentsError
from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.testing import fill_zero_parameters


def tiny(*overrides):
    """A toy pipeline with random weights everywhere (the UNet zero-initializes its output layers,
    which would make every output zero and every comparison below vacuous)."""
    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke", *overrides])).eval()
    fill_zero_parameters(pipe.denoiser)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return tiny()


def pixels(images):
    return np.stack([np.asarray(image) for image in images])


def test_returns_pil_images_of_the_requested_size(pipe):
    images = pipe(["a red circle", "a blue star"], num_images=2, steps=2, seed=0, height=32, width=16)
    assert len(images) == 4 and all(image.size == (16, 32) and image.mode == "RGB" for image in images)


def test_same_seed_same_images_bitwise(pipe):
    first = pixels(pipe(["a red circle"], num_images=2, steps=3, seed=7))
    second = pixels(pipe(["a red circle"], num_images=2, steps=3, seed=7))
    assert np.array_equal(first, second)
    tensors = [pipe("a red circle", steps=3, seed=7, output_type="tensor") for _ in range(2)]
    assert torch.equal(*tensors)
    generator = pipe("a red circle", steps=3, generator=torch.Generator().manual_seed(7), output_type="tensor")
    assert torch.equal(tensors[0], generator)
    assert not torch.equal(tensors[0], pipe("a red circle", steps=3, seed=8, output_type="tensor"))


def test_classifier_free_guidance_batches_cond_and_uncond(pipe):
    batch_sizes = []
    hook = pipe.denoiser.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    try:
        unguided = pipe("a red circle", steps=2, seed=0, guidance_scale=1.0, output_type="latent")
        guided = pipe("a red circle", steps=2, seed=0, guidance_scale=4.0, output_type="latent")
        negative = pipe("a red circle", steps=2, seed=0, guidance_scale=4.0, negative_prompts="blue",
                        output_type="latent")
    finally:
        hook.remove()
    assert batch_sizes == [1, 1, 2, 2, 2, 2]
    assert not torch.allclose(unguided, guided) and not torch.allclose(guided, negative)


def test_inputs_that_the_model_cannot_take(pipe):
    with pytest.raises(ValueError, match="label was given"):
        pipe(labels=[1], steps=1)
    with pytest.raises(ValueError, match="needs prompt"):
        pipe(steps=1)
    with pytest.raises(ValueError, match="multiple of 4; got 18x16"):
        pipe("a red circle", steps=1, height=18, width=16)
    with pytest.raises(ValueError, match="steps"):
        pipe("a red circle", steps=0)
    unconditional = tiny("conditioner=unconditional")
    with pytest.raises(ValueError, match="prompt was given to an unconditional model"):
        unconditional("a red circle", steps=1)
    assert len(unconditional(num_images=3, steps=1, seed=0)) == 3


def test_class_conditional_pipeline():
    pipe = tiny("conditioner=class_label", "conditioner.num_classes=5", "conditioner.vector_dim=32")
    assert len(pipe(labels=[0, 4], steps=2, seed=0)) == 2
    with pytest.raises(ValueError, match="0..4"):
        pipe(labels=[5], steps=1)


@pytest.mark.parametrize("overrides, fragments", [
    (["codec=identity", "denoiser.in_channels=4"], ["codec 'identity'", "denoiser 'unet'", "denoiser.in_channels=3"]),
    (["denoiser.out_channels=3"], ["denoiser.out_channels=4"]),
    (["denoiser.context_dim=32"], ["conditioner 'text'", "context_dim=32", "denoiser.context_dim=16"]),
    (["denoiser.in_channels=8", "+denoiser.concat_channels=4"], ["needs cond 'concat'", "denoiser.concat_channels=0"]),
    (["conditioner=unconditional", "denoiser.context_dim=16"], ["needs cond 'crossattn'", "conditioner 'null'"]),
    (["denoiser.context_dim=null"], ["would be ignored", "denoiser.context_dim=16"]),
    (["conditioner=class_label", "conditioner.vector_dim=8", "denoiser.vector_dim=16"], ["vector", "denoiser.vector_dim=8"]),
])
def test_incompatible_assemblies_are_refused_with_the_fix(overrides, fragments):
    with pytest.raises(IncompatibleComponentsError) as error:
        tiny(*overrides)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_checkpoint_round_trip(pipe, tmp_path):
    path = pipe.save(tmp_path / "model.safetensors")
    loaded = LatentDiffusionPipeline.from_checkpoint(path)
    assert np.array_equal(pixels(pipe("a red circle", steps=3, seed=1)), pixels(loaded("a red circle", steps=3, seed=1)))
    metadata = read_metadata(path)
    components = json.loads(metadata["latentgen.components"])
    assert components["denoiser"] == {"name": "unet", "distribution": "latentgen", "version": registry.resolve("denoiser", "unet").version}
    config = json.loads(metadata["latentgen.config"])
    assert config["codec"]["channel_mult"] == [1, 1] and config["codec"]["resolution"] == 16 and "${" not in metadata["latentgen.config"]


def test_checkpoint_keeps_a_changed_scale_factor(tmp_path):
    pipe = tiny()
    pipe.codec.scale_factor = pipe.codec.build_params["scale_factor"] = 0.5
    assert LatentDiffusionPipeline.from_checkpoint(pipe.save(tmp_path / "m.safetensors")).codec.scale_factor == 0.5


def test_bad_checkpoint_files(pipe, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        LatentDiffusionPipeline.from_checkpoint(tmp_path / "missing.safetensors")
    good = pipe.save(tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        LatentDiffusionPipeline.from_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty or truncated"):
        LatentDiffusionPipeline.from_checkpoint(tmp_path / "empty.safetensors")
    safetensors.torch.save_file({"weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match=r"no installed checkpoint format reads \(first keys: \['weight'\]\).*"
                                              r"latentgen \(latentgen\).*stable_diffusion \(latentgen\)"):
        LatentDiffusionPipeline.from_checkpoint(tmp_path / "foreign.safetensors")
    safetensors.torch.save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(CheckpointError, match="no installed checkpoint format reads"):
        LatentDiffusionPipeline.from_checkpoint(tmp_path / "sd.safetensors")  # original layout, no text tower
    with pytest.raises(CheckpointError, match="not a Stable Diffusion v1 or v2 checkpoint"):
        LatentDiffusionPipeline.from_checkpoint(tmp_path / "sd.safetensors", format="stable_diffusion")
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match="not a Stable Diffusion v1 or v2 checkpoint"):
        LatentDiffusionPipeline.from_checkpoint(tmp_path / "model.ckpt")


def _rewrite(path, tensors_edit=None, config_edit=None):
    tensors = safetensors.torch.load_file(str(path))
    metadata = read_metadata(path)
    if tensors_edit:
        tensors_edit(tensors)
    if config_edit:
        config = json.loads(metadata["latentgen.config"])
        config_edit(config)
        metadata["latentgen.config"] = json.dumps(config)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def test_weights_that_do_not_fit_the_config_name_the_keys(pipe, tmp_path):
    path = pipe.save(tmp_path / "m.safetensors")
    _rewrite(path, tensors_edit=lambda t: t.pop("denoiser.out.2.bias"))
    with pytest.raises(CheckpointError, match=r"denoiser weights .*1 missing, first: \['out.2.bias'\]"):
        LatentDiffusionPipeline.from_checkpoint(path)
    path = pipe.save(tmp_path / "m2.safetensors")
    _rewrite(path, config_edit=lambda c: c["denoiser"].update(model_channels=64))
    with pytest.raises(CheckpointError, match=r"of another shape, first: \['time_embed.0.weight: checkpoint \(128, 32\) vs model \(256, 64\)"):
        LatentDiffusionPipeline.from_checkpoint(path)
    path = pipe.save(tmp_path / "m3.safetensors")
    _rewrite(path, config_edit=lambda c: c["scheduler"].update(name="from_elsewhere"))
    metadata = read_metadata(path)
    components = json.loads(metadata["latentgen.components"])
    components["scheduler"] = {"name": "from_elsewhere", "distribution": "latentgen-elsewhere", "version": "2.0"}
    metadata["latentgen.components"] = json.dumps(components)
    safetensors.torch.save_file(safetensors.torch.load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(ConfigError, match="pip install latentgen-elsewhere"):
        LatentDiffusionPipeline.from_checkpoint(path)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(pipe, tmp_path, monkeypatch):
    path = pipe.save(tmp_path / "last.safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        pipe.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_saving_needs_registry_built_components(pipe, tmp_path):
    from latentgen.schedulers.ddim import DDIMScheduler

    odd = LatentDiffusionPipeline(pipe.codec, pipe.denoiser, pipe.conditioner, DDIMScheduler())
    with pytest.raises(ConfigError, match="registry.build"):
        odd.save(tmp_path / "x.safetensors")
