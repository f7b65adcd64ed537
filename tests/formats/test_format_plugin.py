"""Acceptance test of the extension points: a throwaway third-party package, pip-installed, adds a checkpoint
format of its own file layout (a NumPy .npz archive) and a scheduler written to DESIGN.md's `__call__`
contract; with no change to latentgen they load, sample and save through `from_checkpoint`, `pipe.save`
and `latentgen-sample`.

The package is installed into the running interpreter's environment and uninstalled in the module
fixture's teardown, whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentgen import registry
from latentgen.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.slow  # pip-installs a package

DIST = "latentgen-npz"

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "latentgen-npz"
version = "0.2.0"
requires-python = ">=3.10"

[tool.setuptools]
py-modules = ["latentgen_npz"]

[project.entry-points."latentgen.formats"]
npz_pipeline = "latentgen_npz:NpzFormat"

[project.entry-points."latentgen.schedulers"]
call_euler = "latentgen_npz:CallEuler"
"""

MODULE = '''
"""A third-party latentgen plugin: pipelines as NumPy .npz archives, and an Euler sampler in k-diffusion's style."""

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

import latentgen
from latentgen import LatentDiffusionPipeline

CONFIG = "__latentgen_config__"


class NpzFormat(latentgen.CheckpointFormat):
    """A pipeline as a NumPy .npz archive: one float32 array per weight and its config as JSON."""

    suffixes = (".npz",)

    def sniff(self, path):
        if path.suffix != ".npz" or not path.is_file() or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return CONFIG + ".npy" in archive.namelist()

    def load(self, path, device=None, dtype=None):
        with np.load(path, allow_pickle=False) as arrays:
            config = json.loads(bytes(arrays[CONFIG]).decode())
            pipe = LatentDiffusionPipeline.from_config(config)
            for name in ("codec", "denoiser", "conditioner"):
                module = getattr(pipe, name)
                state = {key: torch.from_numpy(arrays[f"{name}/{key}"]) for key in module.state_dict()}
                module.load_state_dict(state, strict=True)
        return pipe.to(device=device, dtype=dtype).eval()

    def save(self, pipeline, path):
        arrays = {f"{name}/{key}": value.detach().float().cpu().numpy()
                  for name in ("codec", "denoiser", "conditioner")
                  for key, value in getattr(pipeline, name).state_dict().items()}
        arrays[CONFIG] = np.frombuffer(json.dumps(pipeline.config).encode(), dtype=np.uint8)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path


class CallEuler(latentgen.Scheduler):
    """Euler steps of the probability-flow ODE, written as k-diffusion's sample(model, x, sigmas) callable."""

    def __call__(self, denoise, x, sigmas, *, generator=None, callback=None):
        for i in range(len(sigmas) - 1):
            denoised = denoise(x, sigmas[i])
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x
'''

ENV_VARS = (registry.AUTOLOAD_ENV, registry.BLOCK_ENV)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory, pip_package):
    """Write, pip-install (non-editable) and finally uninstall the throwaway package."""
    files = {"pyproject.toml": PYPROJECT, "latentgen_npz.py": MODULE}
    with pip_package(tmp_path_factory.mktemp("npz"), DIST, files, modules=("latentgen_npz",)) as root:
        yield root
    assert "npz_pipeline" not in registry.available("format")


@pytest.fixture(scope="module")
def smoke():
    from latentgen.config import compose
    from latentgen.pipeline import LatentDiffusionPipeline

    torch.manual_seed(0)
    return LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"]))


def _sample(pipe) -> torch.Tensor:
    return pipe(["a red circle", "a blue star"], steps=3, seed=0, output_type="tensor")


def test_the_format_saves_loads_and_samples_through_the_pipeline(plugin, smoke, tmp_path):
    from latentgen.pipeline import LatentDiffusionPipeline

    (entry,) = registry.entries("format")["npz_pipeline"]
    assert (entry.distribution, entry.version) == (DIST, "0.2.0")
    path = smoke.save(tmp_path / "model.npz", format="npz_pipeline")
    assert path == tmp_path / "model.npz" and path.is_file()
    loaded = LatentDiffusionPipeline.from_checkpoint(path)  # found by sniffing: no format= needed
    assert torch.equal(_sample(loaded), _sample(smoke))
    # Saved again in latentgen's own format, it is still the same model.
    again = LatentDiffusionPipeline.from_checkpoint(loaded.save(tmp_path / "model.safetensors"))
    assert torch.equal(_sample(again), _sample(smoke))
    with pytest.raises(ConfigError, match="'npz_pipeline' does not take the option original_config"):
        LatentDiffusionPipeline.from_checkpoint(path, original_config="x.yaml")


def test_the_format_honours_the_format_contract(plugin, smoke):
    from latentgen.testing import check_format

    checked = check_format(lambda: registry.build("format", "npz_pipeline"), pipeline=lambda: smoke)
    assert "save, sniff and load round trip" in checked and "sniff refuses other files" in checked


def test_two_formats_claiming_a_file_is_an_error_that_names_both(plugin, smoke, tmp_path):
    from latentgen.formats.native import LatentgenFormat
    from latentgen.pipeline import LatentDiffusionPipeline

    class Greedy(LatentgenFormat):
        """Claims every file latentgen's own format claims."""

    path = smoke.save(tmp_path / "m.safetensors")
    registry.register("format", "greedy", Greedy, distribution="latentgen-greedy")
    try:
        with pytest.raises(CheckpointError, match=r"claimed by 2 checkpoint formats: .*'greedy'.*'latentgen'|"
                                                  r"claimed by 2 checkpoint formats: .*'latentgen'.*'greedy'") as info:
            LatentDiffusionPipeline.from_checkpoint(path)
        assert "format=" in str(info.value)
        assert torch.equal(_sample(LatentDiffusionPipeline.from_checkpoint(path, format="latentgen")), _sample(smoke))
    finally:
        registry.unregister("format", "greedy")


def test_a_call_style_scheduler_samples_and_passes_the_contract(plugin, smoke):
    from latentgen.testing import HYDRA_RULE, check_scheduler

    scheduler = registry.build("scheduler", "call_euler")
    assert type(scheduler).sample is registry.base_class("scheduler").sample  # only __call__ is implemented
    checked = check_scheduler(lambda: registry.build("scheduler", "call_euler"))
    assert HYDRA_RULE in checked and "bad sigma grids are refused" in checked  # the base class checks its grid
    euler = registry.build("scheduler", "euler")
    smoke.scheduler, before = scheduler, smoke.scheduler
    try:
        ours = _sample(smoke)
        smoke.scheduler = euler
        torch.testing.assert_close(ours, _sample(smoke), rtol=1e-5, atol=1e-5)  # the same Euler method
    finally:
        smoke.scheduler = before


def test_latentgen_sample_reads_the_plugin_file_with_the_plugin_scheduler(plugin, smoke, tmp_path):
    path = smoke.save(tmp_path / "model.npz", format="npz_pipeline")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "latentgen-sample"), f"checkpoint={path}", "prompt=a red circle",
         "scheduler=call_euler", "steps=3", "num_images=2", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((run_dir / "sample.json").read_text())
    assert record["scheduler"] == "call_euler" and len(record["images"]) == 2
    assert all(Path(image).is_file() for image in record["images"])
