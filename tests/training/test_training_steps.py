"""One optimizer step: gradient accumulation equals the whole batch; mixed precision keeps float32 weights."""

from __future__ import annotations

import copy

import pytest
import torch

from latentgen.config import compose
from latentgen.pipeline import LatentDiffusionPipeline, build_component
from latentgen.training.codec_stage import CodecTrainer
from latentgen.training.denoiser_stage import DenoiserTrainer
from latentgen.training.latent_cache import LatentCache
from latentgen.training.precision import Precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = {"steps": 10, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 2, "ema_decay": 0.9,
            "grad_clip": 1.0, "loss_weighting": "min_snr", "snr_gamma": 5.0}
PROMPTS = ["a small red circle", "a large blue star", "a medium green square", "a small cyan cross"]


@pytest.fixture(scope="module")
def pipe_and_cache():
    torch.manual_seed(0)
    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"]))  # text conditioner, dropout 0.1
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialized layers (e.g. attention outputs) would hide the conditioner's gradient
        for parameter in pipe.denoiser.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.02, generator=generator)
    cache = LatentCache(torch.randn(16, 4, 8, 8, generator=generator), {"prompt": PROMPTS * 4})
    return pipe, cache


def gradients_match(first, second):
    """Equal up to rounding: to 1e-5 of the largest gradient of the model. (Per tensor would not do: a
    parameter whose true gradient is zero, e.g. a bias before a GroupNorm, gets pure rounding noise.)"""
    pairs = [(a.grad, b.grad) for a, b in zip(first, second, strict=True)]
    assert all((a is None) == (b is None) for a, b in pairs)
    pairs = [(a, b) for a, b in pairs if a is not None]
    scale = max(a.abs().max() for a, _ in pairs)
    return scale > 0 and all((a - b).abs().max() <= 1e-5 * scale for a, b in pairs)


def denoiser_step(pipe_and_cache, precision="fp32", **settings):
    pipe, cache = pipe_and_cache
    pipe = copy.deepcopy(pipe)
    trainer = DenoiserTrainer(pipe, cache, {**SETTINGS, **settings}, torch.Generator().manual_seed(2),
                              Precision(precision, torch.device("cpu")))
    losses, _ = trainer.step(1)
    return trainer, losses["loss"]


def test_two_micro_batches_of_half_the_batch_equal_one_step_on_it(pipe_and_cache):
    """Noise levels, noise and the conditioning dropout are drawn for the whole batch, each micro-batch's
    loss is its part of the batch mean, so the accumulated gradients are the batch's (to float rounding).
    The gradients are compared, not the updated weights: Adam divides each gradient by its own size, which
    makes rounding noise a full step where the true gradient is zero (a bias before a GroupNorm)."""
    whole, whole_loss = denoiser_step(pipe_and_cache, grad_accumulation=1)
    halves, halves_loss = denoiser_step(pipe_and_cache, grad_accumulation=2)
    assert halves_loss == pytest.approx(whole_loss, rel=1e-6)
    assert len(whole.parameters) > 50 and any(p.grad.abs().max() > 0 for p in whole.parameters)
    assert gradients_match(whole.parameters, halves.parameters)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in halves.pipe.conditioner.parameters())
    with pytest.raises(ValueError, match="multiple of 3"):
        denoiser_step(pipe_and_cache, grad_accumulation=3)


def test_codec_micro_batches_equal_one_batch_for_a_deterministic_codec():
    """A VQ codec encodes without sampling, so stage 1's accumulated gradients are the whole batch's too."""
    config = compose("train", ["experiment=smoke", "codec=vq_tiny", "dataset.size=8"])
    torch.manual_seed(0)
    codec = build_component("codec", config["codec"])
    dataset = build_component("dataset", config["dataset"])
    settings = {**config["train"]["codec"], "batch_size": 8}
    trainers = []
    for micro_batches in (1, 2):
        trainer = CodecTrainer(copy.deepcopy(codec), dataset, {**settings, "grad_accumulation": micro_batches},
                               torch.device("cpu"), torch.Generator().manual_seed(3))
        losses, _ = trainer.step(1)
        trainers.append((trainer, losses))
    (whole, whole_losses), (halves, halves_losses) = trainers
    assert halves_losses["loss"] == pytest.approx(whole_losses["loss"], rel=1e-6)
    assert gradients_match(list(whole.codec.parameters()), list(halves.codec.parameters()))


def test_codec_crops_are_random_windows_drawn_for_the_whole_batch():
    """With crop_size, stage 1 trains on a random crop_size window of each image. The windows come from the
    step's seed for the global batch, so two micro-batches see the same crops, and get the same gradients,
    as one batch."""
    config = compose("train", ["experiment=smoke", "codec=vq_tiny", "dataset.size=8"])
    torch.manual_seed(0)
    codec = build_component("codec", config["codec"])
    dataset = build_component("dataset", config["dataset"])
    settings = {**config["train"]["codec"], "batch_size": 8, "crop_size": 8}
    runs = []
    for micro_batches in (1, 2):
        trainer = CodecTrainer(copy.deepcopy(codec), dataset, {**settings, "grad_accumulation": micro_batches},
                               torch.device("cpu"), torch.Generator().manual_seed(3))
        seen, autoencode = [], trainer.codec.autoencode
        trainer.codec.autoencode = lambda images, **kw: (seen.append(images), autoencode(images, **kw))[1]
        trainer.step(1)
        runs.append((trainer, torch.cat(seen)))
    (whole, crops), (halves, halves_crops) = runs
    assert crops.shape == (8, 3, 8, 8) and torch.equal(crops, halves_crops)
    assert gradients_match(list(whole.codec.parameters()), list(halves.codec.parameters()))
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    windows = images.unfold(2, 8, 1).unfold(3, 8, 1)  # (N, C, 9, 9, 8, 8): every 8x8 window
    found = [(crop[:, None, None] == windows).flatten(4).all(4).all(1).nonzero()[0].tolist() for crop in crops]
    assert len({tuple(place[1:]) for place in found}) > 1  # the offsets vary from image to image


@pytest.mark.parametrize(("overrides", "message"), [
    ({"crop_size": 7}, "crop_size=7 is not a multiple of the codec's downsampling factor 2"),
    ({"crop_size": 32}, "crop_size=32 is larger than the dataset's 16x16 images"),
    ({"crop_size": 16, "disc_weight": 0.5, "disc_layers": 3}, "too small for the discriminator's 3 layers, which need "
                                                                "crops of at least 24 pixels"),
])
def test_codec_crops_that_cannot_be_trained_on_are_refused(overrides, message):
    config = compose("train", ["experiment=smoke", "dataset.size=8"])
    codec = build_component("codec", config["codec"])
    dataset = build_component("dataset", config["dataset"])
    with pytest.raises(ValueError, match=message):
        CodecTrainer(codec, dataset, {**config["train"]["codec"], **overrides}, torch.device("cpu"),
                     torch.Generator().manual_seed(0))


def test_bf16_autocast_trains_float32_weights_close_to_fp32(pipe_and_cache):
    full, full_loss = denoiser_step(pipe_and_cache)
    mixed, mixed_loss = denoiser_step(pipe_and_cache, precision="bf16")
    assert all(p.dtype == torch.float32 for p in mixed.parameters)
    assert all(p.dtype == torch.float32 for p in mixed.averages["denoiser"].average.parameters())
    assert mixed_loss == pytest.approx(full_loss, rel=2e-2)  # bf16 keeps ~3 significant digits
    assert mixed.state_dict()["precision"] == {"name": "bf16", "scaler": None}


def test_fp16_needs_cuda_and_unknown_precisions_are_refused():
    with pytest.raises(ValueError, match="use train.precision=bf16"):
        Precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"choose one of \['fp32', 'bf16', 'fp16'\]"):
        Precision("fp8", torch.device("cpu"))
