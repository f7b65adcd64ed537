"""Preview grids during training: when they are due, what they write (PNG and TensorBoard image), and
that taking one changes nothing about the training (global RNG untouched, train mode restored)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from latentgen.config import compose
from latentgen.pipeline import LatentDiffusionPipeline, build_component
from latentgen.training.monitor import Monitor
from latentgen.training.progress import StageLog
from test_tensorboard_events import read_events


@pytest.fixture(scope="module")
def tiny():
    cfg = compose("train", ["experiment=smoke"])
    return LatentDiffusionPipeline.from_config(cfg), build_component("dataset", cfg.dataset)


def test_previews_are_due_at_every_multiple_and_at_the_end(tmp_path):
    monitor = Monitor(tmp_path, [], tensorboard=False, sample_every=3)
    assert [step for step in range(1, 11) if monitor.due(step, 10)] == [3, 6, 9, 10]
    never = Monitor(tmp_path, [], tensorboard=False, sample_every=0)
    assert not any(never.due(step, 10) for step in range(1, 11))
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(ValueError, match="train.sample_steps must be an integer >= 1"):
        Monitor(tmp_path, [], sample_steps=0)


def test_previews_write_grids_and_leave_training_untouched(tiny, tmp_path):
    pipe, dataset = tiny
    monitor = Monitor(tmp_path, dataset, sample_every=2, sample_count=3, sample_steps=2, seed=0)
    codec_log = StageLog("stage 1: codec", 4, tmp_path, 2, events=monitor.events)
    denoiser_log = StageLog("stage 2: denoiser", 4, tmp_path, 2, events=monitor.events)
    for module in (pipe.codec, pipe.denoiser, pipe.conditioner):
        module.train()
    rng_state = torch.get_rng_state()

    reconstructions = monitor.reconstructions(pipe.codec, 2, codec_log)
    first = monitor.samples(pipe, 2, denoiser_log)
    again = monitor.samples(pipe, 4, denoiser_log)

    assert torch.equal(torch.get_rng_state(), rng_state)  # training draws the same random numbers as without
    assert pipe.codec.training and pipe.denoiser.training and pipe.conditioner.training
    assert reconstructions == tmp_path / "samples" / "stage1_step0000002.png"
    assert first.name == "stage2_step0000002.png" and again.name == "stage2_step0000004.png"
    assert Image.open(reconstructions).size[0] > 6 * 16  # originals and reconstructions side by side
    assert first.read_bytes() == again.read_bytes()  # same weights, same seed: the same picture
    report = monitor.close()
    assert report == {"tensorboard": str(tmp_path / "tensorboard")}
    images = [(event["step"], tag, image.size) for event in read_events(monitor.events.path)
              for tag, image in event["images"].items()]
    assert images == [(2, "codec/reconstructions", Image.open(reconstructions).size),
                      (2, "denoiser/samples", Image.open(first).size), (4, "denoiser/samples", Image.open(again).size)]


def test_close_reports_skipped_images(tmp_path, caplog):
    class Dataset(list):
        skipped = 2

    with caplog.at_level("WARNING", logger="latentgen.train"):
        report = Monitor(tmp_path, Dataset(), tensorboard=False).close()
    assert report == {"skipped_images": 2} and "skipped 2 unreadable image(s)" in caplog.text
