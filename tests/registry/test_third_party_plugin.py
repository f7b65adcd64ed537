"""Acceptance test of the plugin design: a throwaway third-party package, pip-installed, is found
with no change to latentgen (registry, `latentgen plugins`, Hydra options, `latentgen-sample`),
and disappears again when it is uninstalled.

The package is installed into the running interpreter's environment and uninstalled in the
module fixture's teardown, whatever happens.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import latentgen
from latentgen import registry
from latentgen.errors import IncompatibleComponentsError, LatentgenError

pytestmark = pytest.mark.slow  # pip-installs a package and starts the apps

DIST = "latentgen-throwaway"
ENV_VARS = (registry.AUTOLOAD_ENV, registry.BLOCK_ENV)

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "latentgen-throwaway"
version = "0.3.1"
description = "A throwaway latentgen plugin written by the test suite."
requires-python = ">=3.10"

[tool.setuptools]
py-modules = ["latentgen_throwaway"]

[project.entry-points."latentgen.schedulers"]
throwaway_euler = "latentgen_throwaway:EulerScheduler"

[project.entry-points."latentgen.codecs"]
throwaway_pixels = "latentgen_throwaway:PixelShuffleCodec"
"""

MODULE = '''
"""A third-party latentgen plugin: an Euler sampler and a parameter-free pixel-shuffle codec."""

import torch
import torch.nn.functional as F

import latentgen


class EulerScheduler(latentgen.Scheduler):
    """Deterministic Euler steps of the probability-flow ODE in sigma space."""

    def sample(self, denoise, x, sigmas, generator, callback):
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            d = (x - denoised) / sigma
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})
            x = x + d * (sigma_next - sigma)
        return x


class PixelShuffleCodec(latentgen.Codec):
    """(B, 3, H, W) <-> (B, 12, H/2, W/2) by pixel (un)shuffling; no parameters."""

    def __init__(self):
        super().__init__()
        self.latent_channels = 12
        self.downsampling_factor = 2
        self.scale_factor = 1.0

    def encode(self, images, generator=None):
        self.check_images(images)
        return F.pixel_unshuffle(images, 2) * self.scale_factor

    def decode(self, latents):
        self.check_latents(latents)
        return F.pixel_shuffle(latents / self.scale_factor, 2)
'''


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ENV_VARS}


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory, pip_package):
    """Write, pip-install (non-editable) and finally uninstall the throwaway plugin package."""
    root = tmp_path_factory.mktemp("throwaway")
    files = {"pyproject.toml": PYPROJECT, "latentgen_throwaway.py": MODULE}
    with pip_package(root, DIST, files, modules=("latentgen_throwaway",)):
        yield {"root": root, "version": "0.3.1"}
    # Gone from the registry the moment it is uninstalled; the built-ins still work.
    assert "throwaway_euler" not in registry.available("scheduler")
    assert "throwaway_pixels" not in registry.available("codec")
    assert type(registry.build("scheduler", "ddim")).__name__ == "DDIMScheduler"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny text-to-image checkpoint, untrained (random weights)."""
    from latentgen.config import compose
    from latentgen.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"]))
    return pipe.save(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_installed_metadata(throwaway):
    assert importlib.metadata.version(DIST) == throwaway["version"]
    # Installed as a real (non-editable) copy: the module lives in site-packages, not in the tmp dir.
    import latentgen_throwaway

    assert throwaway["root"] not in Path(latentgen_throwaway.__file__).resolve().parents


def test_registry_finds_the_plugin_with_its_distribution(throwaway):
    assert "throwaway_euler" in registry.available("scheduler")
    assert "throwaway_pixels" in registry.available("codec")
    for kind, name in (("scheduler", "throwaway_euler"), ("codec", "throwaway_pixels")):
        (entry,) = registry.entries(kind)[name]
        assert (entry.distribution, entry.version) == (DIST, throwaway["version"])
    assert f"throwaway_euler ({DIST} {throwaway['version']})" in registry.describe("scheduler")


def test_plugins_command_lists_the_plugin(throwaway, tmp_path):
    result = subprocess.run([sys.executable, "-m", "latentgen.cli.main", "plugins"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=_clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("throwaway_euler", "throwaway_pixels"):
        lines = [line for line in result.stdout.splitlines() if re.match(rf"\s+{name}\s", line)]
        assert len(lines) == 1, result.stdout
        assert re.match(rf"\s+{name}\s+{DIST}\s+{re.escape(throwaway['version'])}\s", lines[0]), lines[0]
        assert lines[0].rstrip().endswith("ok"), lines[0]
    # The built-ins are still there.
    assert re.search(r"^\s+ddim\s+latentgen\s", result.stdout, re.M)


def test_build_scheduler_from_plugin(throwaway):
    scheduler = registry.build("scheduler", "throwaway_euler")
    assert isinstance(scheduler, latentgen.Scheduler)
    assert scheduler.registry_name == "throwaway_euler"
    assert (scheduler.registry_distribution, scheduler.registry_version) == (DIST, throwaway["version"])

    # An exact denoiser (the data is a single point x0) takes Euler to x0 in one step from any sigma.
    x0 = torch.randn(2, 4, 3, 3)
    sigmas = torch.tensor([10.0, 4.0, 1.0, 0.0])
    seen = []
    out = scheduler(lambda x, sigma: x0.expand_as(x), x0 + 10.0 * torch.randn(2, 4, 3, 3), sigmas,
                    callback=lambda info: seen.append(info["i"]))
    torch.testing.assert_close(out, x0)
    assert seen == [0, 1, 2]
    # Deterministic, and the step rule is x + d * (sigma_next - sigma) with d = (x - denoised) / sigma.
    x = torch.randn(1, 4, 3, 3) * 2.0
    half = scheduler(lambda x, sigma: 0.5 * x, x, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(half, x + (x - 0.5 * x) / 2.0 * (0.0 - 2.0))
    torch.testing.assert_close(scheduler(lambda x, s: 0.5 * x, x, torch.tensor([2.0, 0.0])), half)
    with pytest.raises(ValueError, match="throwaway_euler"):  # the base class still checks the grid
        scheduler(lambda x, s: x, x, torch.tensor([1.0, 2.0, 0.0]))


def test_build_codec_from_plugin_round_trips_exactly(throwaway):
    codec = registry.build("codec", "throwaway_pixels")
    assert isinstance(codec, latentgen.Codec)
    assert (codec.latent_channels, codec.downsampling_factor, codec.scale_factor) == (12, 2, 1.0)
    assert codec.registry_distribution == DIST
    assert list(codec.parameters()) == []
    images = torch.rand(2, 3, 8, 6) * 2 - 1
    latents = codec.encode(images)
    assert latents.shape == (2, 12, 4, 3)
    assert torch.equal(codec.decode(latents), images)
    assert torch.equal(codec.autoencode(images)[0], images)  # base-class default works for the plugin
    with pytest.raises(ValueError, match="throwaway_pixels"):
        codec.encode(torch.rand(1, 3, 7, 8))


def test_pipeline_refuses_plugin_codec_with_mismatched_denoiser(throwaway):
    from latentgen.pipeline import LatentDiffusionPipeline

    codec = registry.build("codec", "throwaway_pixels")
    denoiser = registry.build("denoiser", "unet", in_channels=4, out_channels=4, model_channels=32, channel_mult=[1],
                              num_res_blocks=1, attention_resolutions=[], num_head_channels=16)
    with pytest.raises(IncompatibleComponentsError) as info:
        LatentDiffusionPipeline(codec, denoiser)
    message = str(info.value)
    assert "throwaway_pixels" in message and "unet" in message
    assert "12" in message and "4" in message
    assert "denoiser.in_channels=12" in message


def test_pipeline_with_plugin_codec_and_scheduler_generates(throwaway):
    from latentgen.pipeline import LatentDiffusionPipeline

    codec = registry.build("codec", "throwaway_pixels")
    denoiser = registry.build("denoiser", "unet", in_channels=12, out_channels=12, model_channels=32,
                              channel_mult=[1], num_res_blocks=1, attention_resolutions=[], num_head_channels=16)
    pipe = LatentDiffusionPipeline(codec, denoiser, scheduler=registry.build("scheduler", "throwaway_euler"))
    images = pipe(num_images=2, steps=2, seed=0, height=8, width=8, output_type="tensor")
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    assert pipe.config["codec"] == {"name": "throwaway_pixels"}
    assert pipe.config["scheduler"] == {"name": "throwaway_euler"}


def test_latentgen_sample_uses_plugin_scheduler(throwaway, checkpoint, tmp_path):
    script = Path(sys.executable).parent / "latentgen-sample"
    assert script.exists(), script
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [str(script), f"checkpoint={checkpoint}", "prompt=a red circle", "scheduler=throwaway_euler", "steps=3",
         "num_images=1", "seed=0", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run_dir / "grid.png").is_file()
    assert (run_dir / "images" / "0000.png").is_file()
    assert not (run_dir / "images" / "0001.png").exists()
    record = json.loads((run_dir / "sample.json").read_text())
    assert record["scheduler"] == "throwaway_euler"
    assert record["captions"] == ["a red circle"]

    from PIL import Image

    with Image.open(run_dir / "images" / "0000.png") as image:
        assert image.size == (16, 16)  # experiment=smoke's image size, stored in the checkpoint


def test_hydra_option_exists_through_the_registry(throwaway):
    from latentgen.config import compose

    assert not any(p.name.startswith("throwaway") for p in (Path(latentgen.__file__).parents[1] / "conf").rglob("*"))
    cfg = compose("train", ["codec=throwaway_pixels"])
    assert dict(cfg.codec) == {"_target_": "latentgen.registry.build", "kind": "codec", "name": "throwaway_pixels"}
    cfg = compose("sample", ["checkpoint=x", "scheduler=throwaway_euler"])
    assert dict(cfg.scheduler) == {"_target_": "latentgen.registry.build", "kind": "scheduler",
                                   "name": "throwaway_euler"}


def test_hydra_smoke_experiment_with_plugin_codec_gives_bare_node(throwaway):
    """The experiment must not leak another codec's parameters into the selected one."""
    from latentgen.config import compose

    cfg = compose("train", ["experiment=smoke", "codec=throwaway_pixels"])
    assert dict(cfg.codec) == {"_target_": "latentgen.registry.build", "kind": "codec", "name": "throwaway_pixels"}
    assert cfg.denoiser.name == "unet"


def test_pipeline_from_config_with_plugin_codec_gives_clear_error(throwaway):
    from latentgen.config import compose
    from latentgen.pipeline import LatentDiffusionPipeline

    cfg = compose("train", ["experiment=smoke", "codec=throwaway_pixels"])
    with pytest.raises(LatentgenError) as info:
        LatentDiffusionPipeline.from_config(cfg)
    message = str(info.value)
    assert "throwaway_pixels" in message and "unet" in message and "denoiser.in_channels=<value>" in message
    cfg = compose("train", ["experiment=smoke", "codec=throwaway_pixels", "denoiser.in_channels=12",
                            "denoiser.out_channels=12"])
    assert LatentDiffusionPipeline.from_config(cfg).codec.latent_channels == 12  # the fix it names works
