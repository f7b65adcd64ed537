"""Data-parallel training: two CPU processes under torchrun (gloo) against one process on the same global batch."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from latentgen.config import compose
from latentgen.training.run import run_training, state_path
from latentgen.training.state_file import flatten, load_state

pytestmark = pytest.mark.slow  # starts the apps, torchrun or pip in subprocesses

# Both stages, tiny; stopped after the very last step so that the training state is kept.
TINY = ["experiment=smoke", "train.codec.steps=3", "train.denoiser.steps=3", "train.codec.batch_size=4",
        "train.denoiser.batch_size=4", "train.sample_every=0", "train.tensorboard=false", "train.grid_size=2",
        "train.log_every=1", "train.stop_after_steps=6", "dataset.size=16", "device=cpu"]


def trained_tensors(run_dir):
    """Raw weights, EMA weights and optimizer moments of a stopped run."""
    state, _ = load_state(state_path(run_dir))
    found, _ = flatten({key: state[key] for key in ("modules", "trainer")})
    return {key: value for key, value in found.items() if value.dtype.is_floating_point}


def losses(run_dir):
    return [(row["stage"], int(row["step"]), float(row["loss"])) for row in csv.DictReader(open(run_dir / "metrics.csv"))]


def test_two_processes_train_like_one_on_the_whole_batch(tmp_path, one_torch_thread):
    """Each process takes half of every global batch and the gradients are summed over processes.

    That is single-process training on the whole batch up to the order of float additions: a process
    sums the per-sample gradients of its half and the all_reduce adds the halves, where one process
    adds all four at once. Adam divides each gradient by its own size, which turns those last-bit
    differences into visible ones (up to a few 1e-5 here) where the true gradient is zero, e.g. a
    bias just before a one-channel-per-group GroupNorm, and in what such parameters feed. So nearly
    all elements agree to 1e-6 and none differs by more than 1e-4 (lr 1e-3), the losses agree to 1e-5.
    Stage 1 samples the codec posterior per chunk of a batch (a process's share, or a micro-batch),
    so the one-process reference splits its batches into the same two chunks (grad_accumulation=2).
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "latentgen.cli.train", *TINY, f"hydra.run.dir={tmp_path / 'two'}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    run_training(compose("train", TINY + ["train.codec.grad_accumulation=2"]), tmp_path / "one")

    two, one = trained_tensors(tmp_path / "two"), trained_tensors(tmp_path / "one")
    assert set(two) == set(one) and len(one) > 500
    elements = sum(value.numel() for value in one.values())
    apart = sum(int(((two[key] - one[key]).abs() > 1e-6).sum()) for key in one)
    assert apart < 1e-3 * elements, f"{apart} of {elements} elements differ by more than 1e-6"
    for key in one:
        assert torch.allclose(two[key], one[key], rtol=0, atol=1e-4), key
    for (stage, step, loss), (stage_, step_, loss_) in zip(losses(tmp_path / "two"), losses(tmp_path / "one"), strict=True):
        assert (stage, step) == (stage_, step_) and loss == pytest.approx(loss_, rel=1e-5)
    assert len(losses(tmp_path / "two")) == 6  # only rank 0 logged
