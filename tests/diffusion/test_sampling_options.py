"""Sigma grids, zero-terminal-SNR schedules, guidance rescale, img2img on any grid, and sampling callbacks."""

import math

import pytest
import torch

from latentgen.callbacks import PreviewWriter, chain
from latentgen.config import compose
from latentgen.diffusion.guidance import ClassifierFreeGuidance
from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule
from latentgen.diffusion.sigma_grids import exponential, karras, sigma_grid
from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.testing import fill_zero_parameters


def test_karras_grid_follows_its_formula():
    grid = karras(5, 0.1, 10.0, rho=7.0)
    assert grid[0].item() == pytest.approx(10.0) and grid[-2].item() == pytest.approx(0.1) and grid[-1] == 0
    roots = grid[:-1] ** (1 / 7)
    assert torch.allclose(roots.diff(), roots.diff()[0].expand(4))  # evenly spaced in sigma^(1/rho)


def test_exponential_grid_is_even_in_log_sigma():
    grid = exponential(6, 0.01, 100.0)
    assert torch.allclose(grid[:-1].log().diff(), torch.full((5,), -math.log(100) / 5 * 2, dtype=torch.float64))


def test_grid_names_and_errors():
    schedule = DiscreteNoiseSchedule.from_betas()
    assert torch.equal(sigma_grid(schedule, 10, "discrete", "trailing"), schedule.sigma_grid(10, "trailing"))
    assert sigma_grid(schedule, 10, "karras")[0].item() == pytest.approx(schedule.sigma_max)
    with pytest.raises(ValueError, match="unknown sigma grid"):
        sigma_grid(schedule, 10, "cosine")
    with pytest.raises(ValueError, match="positive integer"):
        sigma_grid(schedule, 0, "karras")


def test_zero_terminal_snr_rescale():
    schedule = DiscreteNoiseSchedule.from_betas()
    rescaled = schedule.rescaled_to_zero_terminal_snr()
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(schedule.alphas_cumprod[0].item(), rel=1e-12)
    assert rescaled.alphas_cumprod[-1].item() == 2.0**-24 and rescaled.sigma_max == pytest.approx(4096, rel=1e-6)
    # Before the clamp the last SNR is exactly 0: the second-to-last level is already far noisier than before.
    assert rescaled.sigmas[-2] > 5 * schedule.sigmas[-2]
    assert torch.all(rescaled.alphas_cumprod.diff() < 0)


def _model(x, sigma, cond):
    """A toy conditional x0 predictor: the cond shifts and scales the estimate."""
    return x * 0.5 + cond["vector"][:, :, None, None]


def test_guidance_rescale_matches_the_conditional_spread():
    x, sigma = torch.randn(3, 2, 4, 4), torch.tensor(2.0)
    cond, uncond = {"vector": torch.randn(3, 2) * 3}, {"vector": torch.zeros(3, 2)}
    plain = ClassifierFreeGuidance(_model, cond, uncond, 7.5)(x, sigma)
    assert torch.allclose(ClassifierFreeGuidance(_model, cond, uncond, 7.5, rescale=0.0)(x, sigma), plain)
    full = ClassifierFreeGuidance(_model, cond, uncond, 7.5, rescale=1.0)(x, sigma)
    eps_full, eps_cond = (x - full) / sigma, (x - _model(x, sigma, cond)) / sigma
    torch.testing.assert_close(eps_full.std(dim=(1, 2, 3)), eps_cond.std(dim=(1, 2, 3)))
    half = ClassifierFreeGuidance(_model, cond, uncond, 7.5, rescale=0.5)(x, sigma)
    torch.testing.assert_close(half, (plain + full) / 2)
    with pytest.raises(ValueError, match="guidance_rescale"):
        ClassifierFreeGuidance(_model, cond, uncond, 7.5, rescale=1.5)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke", "scheduler=heun"]))
    fill_zero_parameters(pipe.denoiser)
    return pipe


def test_pipeline_grids_and_img2img_slicing(pipe):
    seen = []
    pipe("a red circle", steps=6, grid="karras", seed=0, callback=lambda info: seen.append(float(info["sigma"])))
    expected = karras(6, pipe.schedule.sigma_min, pipe.schedule.sigma_max)[:-1].tolist()
    assert seen == pytest.approx(expected)
    seen.clear()
    image = torch.zeros(1, 3, 16, 16)
    pipe("a red circle", image=image, strength=0.5, steps=6, grid="exponential", seed=0,
         callback=lambda info: seen.append(float(info["sigma"])))
    assert seen == pytest.approx(exponential(6, pipe.schedule.sigma_min, pipe.schedule.sigma_max)[3:-1].tolist())
    with pytest.raises(ValueError, match="grid=.spiral.: must be one of discrete, karras, exponential"):
        pipe("a red circle", steps=2, grid="spiral")


def test_zero_terminal_snr_pipeline_samples():
    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke", "diffusion.prediction_type=v",
                                                                 "diffusion.zero_terminal_snr=true"]))
    assert pipe.schedule.sigma_max == pytest.approx(4096, rel=1e-6)
    out = pipe("a red circle", steps=3, grid="discrete", spacing="trailing", seed=0, output_type="tensor")
    assert torch.isfinite(out).all()


def test_preview_callback_writes_decoded_estimates(pipe, tmp_path):
    writer = PreviewWriter(pipe.codec, tmp_path, every=2)
    steps = []
    pipe("a red circle", steps=5, seed=0, callback=chain([writer, lambda info: steps.append(info["i"])]))
    assert steps == [0, 1, 2, 3, 4] and [p.name for p in writer.written] == ["step_0000.png", "step_0002.png", "step_0004.png"]
    assert chain([None, None]) is None
