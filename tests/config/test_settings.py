"""Typed settings: a wrong type, a negative or zero count, a size the codec cannot tile or an unknown option
fails at start-up, before anything is built or trained, as one `error:` line naming the key.

The apps run in this process (their `main`, with the command line patched), which takes a fraction of a
second each; `python benchmarks/bad_settings.py` times the same commands as separate processes.
"""

from __future__ import annotations

import contextlib
import io
import sys

import pytest

from latentgen.config.settings import SampleAppSettings, TrainRunSettings
from latentgen.config.typed import parse
from latentgen.errors import ConfigError

# (app, arguments, what the one error line must name)
BAD_SETTINGS = [
    ("train", ["train.denoiser.steps=abc"], "train.denoiser.steps='abc'"),
    ("train", ["train.denoiser.steps=-5"], "train.denoiser.steps=-5"),
    ("train", ["train.denoiser.lr=-1"], "train.denoiser.lr=-1"),
    ("train", ["train.denoiser.batch_size=0"], "train.denoiser.batch_size=0"),
    ("train", ["train.denoiser.grad_accumulation=0"], "train.denoiser.grad_accumulation=0"),
    ("train", ["train.denoiser.grad_clip=-1"], "train.denoiser.grad_clip=-1"),
    ("train", ["train.codec.batch_size=abc"], "train.codec.batch_size='abc'"),
    ("train", ["train.grid_size=0"], "train.grid_size=0"),
    ("train", ["train.precision=fp8"], "train.precision='fp8'"),
    ("train", ["sampling.steps=0"], "sampling.steps=0"),
    ("train", ["diffusion.prediction_type=epsilon"], "diffusion.prediction_type='epsilon'"),
    ("train", ["+train.denoiser.lrr=1"], "train.denoiser.lrr: no such setting"),
    ("train", ["seed=abc"], "seed='abc'"),
    ("train", ["denoiser.model_channels=0"], "model_channels must be a positive integer; got 0"),
    ("train", ["sampling.height=30"], "sampling.height/width=30x16"),
    ("sample", ["num_images=0"], "num_images=0"),
    ("sample", ["steps=-1"], "steps=-1"),
    ("sample", ["guidance_scale=nan"], "guidance_scale=nan"),
    ("sample", ["dtype=int8"], "dtype='int8'"),
    ("sample", ["prompt=5"], "prompt=5"),
    ("sample", ["height=30"], "height=30"),
    ("sample", ["scheduler=ddim", "+scheduler.foo=1"], "has no parameter scheduler.foo"),
    ("eval", ["num_samples=0"], "num_samples=0"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from latentgen.config import compose
    from latentgen.pipeline import LatentDiffusionPipeline

    return LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"])).save(
        tmp_path_factory.mktemp("ckpt") / "smoke.safetensors")


def run_app(app: str, args: list[str], monkeypatch) -> tuple[int, str]:
    """Run latentgen-<app> in this process; its exit status and what it printed to stderr."""
    from latentgen.cli import eval as eval_app
    from latentgen.cli import sample, train

    main = {"train": train.main, "sample": sample.main, "eval": eval_app.main}[app]
    monkeypatch.setattr(sys, "argv", [f"latentgen-{app}", *args])
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            main()
            status = 0
        except SystemExit as exc:
            status = exc.code
    return status, stderr.getvalue()


@pytest.mark.parametrize(("app", "args", "named"), BAD_SETTINGS, ids=[" ".join(case[1]) for case in BAD_SETTINGS])
def test_a_bad_setting_fails_at_start_up_with_one_line(app, args, named, checkpoint, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    given = {"train": ["experiment=smoke"], "sample": [f"checkpoint={checkpoint}", "prompt=a red circle"],
             "eval": [f"checkpoint={checkpoint}"]}[app]
    if any(arg.startswith("prompt=") for arg in args):
        given = [arg for arg in given if not arg.startswith("prompt=")]
    status, stderr = run_app(app, [*given, *args, f"hydra.run.dir={run_dir}"], monkeypatch)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 1, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert named in lines[0], lines[0]
    # Nothing was trained or sampled: no checkpoint, no metrics, no images.
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.csv").exists()
    assert not (run_dir / "images").exists()


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

    for experiment in ("smoke", "shapes", "digits", "shapes_dit", "shapes_sr"):
        config = validated_config(compose("train", [f"experiment={experiment}"]))
        assert config["train"]["denoiser"]["steps"] >= 1
    sample = OmegaConf.to_container(compose("sample", ["checkpoint=x"]))
    assert parse(SampleAppSettings, {k: v for k, v in sample.items() if k != "scheduler"}).num_images == 4


@pytest.mark.parametrize(("args", "named"), [
    (["format=nope"], "unknown format 'nope'. Available formats: latentgen (latentgen"),
    (["format=stable_diffusion"], "not a Stable Diffusion v1 or v2 checkpoint"),
    (["original_config=v1-inference.yaml"], "checkpoint format 'latentgen' does not take the option original_config (to load); it takes device, dtype"),
])
def test_the_format_options_are_refused_by_name(args, named, checkpoint, tmp_path, monkeypatch):
    status, stderr = run_app("sample", [f"checkpoint={checkpoint}", "prompt=a red circle", *args,
                                        f"hydra.run.dir={tmp_path}"], monkeypatch)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 1 and len(lines) == 1 and named in lines[0], stderr
