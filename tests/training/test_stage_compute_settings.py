"""Per-stage settings of how a stage computes: train.<stage>.channels_last (the same training in oneDNN's NHWC weight
layout, a checkpoint that does not depend on it, a stopped run that resumes bitwise) and train.<stage>.precision."""

from __future__ import annotations

import csv

import pytest
import torch

from latentgen.checkpoint import load_tensors
from latentgen.config import compose
from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.training.run import run_training, state_path
from latentgen.training.state_file import flatten, load_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["experiment=smoke", "train.codec.steps=2", "train.denoiser.steps=3", "train.codec.batch_size=4",
        "train.denoiser.batch_size=4", "train.checkpoint_every=2", "train.sample_every=0", "train.tensorboard=false",
        "train.grid_size=2", "train.log_every=1", "dataset.size=16", "device=cpu"]


def train(run_dir, *overrides, resume=False):
    return run_training(compose("train", [*TINY, *overrides]), run_dir, resume=resume)


def state_tensors(run_dir):
    state, _ = load_state(state_path(run_dir))
    tensors, _ = flatten({key: value for key, value in state.items() if key not in ("summary", "seconds")})
    return tensors


def losses(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        return torch.tensor([float(row["loss"]) for row in csv.DictReader(handle)])


def test_channels_last_trains_what_the_default_layout_trains(tmp_path):
    default = train(tmp_path / "default")
    nhwc = train(tmp_path / "nhwc", "train.codec.channels_last=true", "train.denoiser.channels_last=true")
    # Another summation order in every conv: each stage's losses agree to rounding...
    assert torch.allclose(losses(tmp_path / "nhwc"), losses(tmp_path / "default"), rtol=1e-4)
    expected, got = load_tensors(default), load_tensors(nhwc)
    assert expected.keys() == got.keys()
    convs = [name for name, tensor in got.items() if tensor.ndim == 4]
    assert convs, "the smoke pipeline has conv weights, the tensors the layout changes"
    for name, tensor in got.items():
        assert tensor.is_contiguous(), f"{name} was written in the training layout"
        # ...and so do the weights, but for Adam's first steps on a gradient that is ~0 (a bias): there it moves
        # by about lr (1e-3) either way, so a weight may differ by a few lr after 5 steps.
        assert torch.allclose(tensor, expected[name], rtol=1e-3, atol=5e-3), name
    loaded = LatentDiffusionPipeline.from_checkpoint(nhwc)  # an ordinary checkpoint
    assert all(p.is_contiguous() for p in loaded.denoiser.parameters())


def test_a_stopped_channels_last_run_resumes_bitwise(tmp_path):
    total = 5  # both stages' steps; each run stops after its last step so that its training state is kept
    train(tmp_path / "whole", "train.codec.channels_last=true", "train.denoiser.channels_last=true", f"train.stop_after_steps={total}")
    train(tmp_path / "parts", "train.codec.channels_last=true", "train.denoiser.channels_last=true", "train.stop_after_steps=3")
    train(tmp_path / "parts", "train.codec.channels_last=true", "train.denoiser.channels_last=true", f"train.stop_after_steps={total - 3}", resume=True)
    whole, parts = state_tensors(tmp_path / "whole"), state_tensors(tmp_path / "parts")
    assert whole.keys() == parts.keys()
    for name in whole:
        assert torch.equal(whole[name], parts[name]), name


def test_a_stage_takes_its_own_precision_and_a_bad_one_fails_before_training(tmp_path):
    from latentgen.training.distributed import ProcessGroup
    from latentgen.training.run import TrainingRun, validated_config

    config = validated_config(compose("train", [*TINY, "train.codec.precision=bf16"]))
    run = TrainingRun(config, tmp_path / "run", torch.device("cpu"), ProcessGroup())
    assert run.precisions["codec"].dtype == torch.bfloat16 and run.precisions["denoiser"].dtype is None
    with pytest.raises(ValueError, match=r"train\.denoiser\.precision=fp16 needs a CUDA device"):
        train(tmp_path / "fp16", "train.denoiser.precision=fp16")
    assert not (tmp_path / "fp16" / "checkpoints").exists()  # refused before stage 1 wrote anything
