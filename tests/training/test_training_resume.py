"""Exact resume: a run stopped inside stage 1 or stage 2 and resumed ends bitwise where an uninterrupted run ends."""

from __future__ import annotations

import csv

import pytest
import torch

from latentgen.config import compose
from latentgen.errors import ConfigError
from latentgen.training.run import run_training, state_path
from latentgen.training.state_file import flatten, load_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 2 codec steps then 3 denoiser steps; every run stops after the last one so its training state is kept.
TINY = ["experiment=smoke", "train.codec.steps=2", "train.denoiser.steps=3", "train.codec.batch_size=4",
        "train.denoiser.batch_size=4", "train.checkpoint_every=2", "train.sample_every=0", "train.tensorboard=false",
        "train.grid_size=2", "train.log_every=1", "dataset.size=16", "device=cpu"]
TOTAL = 5


def train(run_dir, stop_after, resume=False, *overrides):
    run_training(compose("train", [*TINY, f"train.stop_after_steps={stop_after}", *overrides]), run_dir, resume=resume)


def state_tensors(run_dir):
    """Every tensor of the training state (weights, EMA, optimizer, RNG states) and everything else in it
    that does not depend on the run's directory or its wall-clock time."""
    state, _ = load_state(state_path(run_dir))
    tensors, structure = flatten({key: value for key, value in state.items() if key not in ("summary", "seconds")})
    return tensors, structure


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_torch_thread):
    """The training state at the end of an uninterrupted run with the given overrides (each run once)."""
    states = {}

    def state(*overrides):
        if overrides not in states:
            run_dir = tmp_path_factory.mktemp("uninterrupted")
            train(run_dir, TOTAL, False, *overrides)
            states[overrides] = state_tensors(run_dir)
        return states[overrides]

    return state


DISCRIMINATOR = ("train.codec.disc_weight=0.5", "train.codec.disc_layers=2", "train.codec.disc_channels=8")


@pytest.mark.parametrize("where, first_part, stopped_at, model", [
    ("inside stage 2", TOTAL - 2, ("denoiser", 1), ()),
    ("inside stage 1", 1, ("codec", 1), ()),
    ("inside stage 1, with a discriminator and its optimizer", 1, ("codec", 1), DISCRIMINATOR),
])
def test_a_stopped_run_resumes_to_bitwise_the_same_state(tmp_path, uninterrupted, where, first_part, stopped_at, model):
    # Inside stage 2 the latents come from a cache file, written by the first part and read by the second.
    cache = (f"train.denoiser.latent_cache={tmp_path / 'latents.safetensors'}",) if where == "inside stage 2" else ()
    train(tmp_path, first_part, False, *model, *cache)
    stopped, _ = load_state(state_path(tmp_path))
    assert (stopped["stage"], stopped["step"]) == stopped_at
    saved = flatten(stopped)[0]
    for part in ("adversarial/discriminator/", "adversarial/optimizer/state/"):  # its weights and Adam moments
        assert any(part in key for key in saved) == bool(model)
    assert (tmp_path / "latents.safetensors").exists() == bool(cache)
    train(tmp_path, TOTAL - first_part, True, *model, *cache)

    tensors, structure = state_tensors(tmp_path)
    expected_tensors, expected_structure = uninterrupted(*model)
    assert structure == expected_structure  # stage, step, data position, counters, scalars of the optimizers
    assert set(tensors) == set(expected_tensors) and len(tensors) > 500
    unequal = [key for key in tensors if not torch.equal(tensors[key], expected_tensors[key])]
    assert not unequal, unequal[:5]
    # Each step is logged once, although the first part may have logged beyond its last saved state.
    rows = [(row["stage"], int(row["step"])) for row in csv.DictReader(open(tmp_path / "metrics.csv"))]
    assert rows == [("stage 1: codec", 1), ("stage 1: codec", 2)] + [("stage 2: denoiser", s) for s in (1, 2, 3)]


def test_resume_refuses_another_config_and_a_run_without_state(tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(tmp_path, 1, True)
    train(tmp_path, 1)
    with pytest.raises(ConfigError, match=r"train.denoiser.lr: 0.001 -> 0.002"):
        train(tmp_path, 1, True, "train.denoiser.lr=2e-3")
    with pytest.raises(ConfigError, match="holds an unfinished run.*resume=true"):
        train(tmp_path, 1)  # a new run would overwrite the state
