"""What stage 2 minimizes and keeps: min-SNR-gamma loss weights, the loss itself, the EMA warm-up, the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentgen.config import compose
from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.training.denoiser_stage import denoising_loss
from latentgen.training.ema import EMA
from latentgen.training.loss_weighting import loss_weights
from latentgen.training.lr_schedule import warmup_cosine

SIGMAS = torch.tensor([0.01, 0.2, 0.4472, 1.0, 3.0, 14.6, 4096.0], dtype=torch.float64)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_min_snr_weights_are_the_papers(prediction_type):
    """Hang et al. 2023: min(SNR, gamma) on the x0 loss, i.e. min(SNR, gamma) / SNR for eps and
    min(SNR, gamma) / (SNR + 1) for v, with SNR = alpha^2 / sigma_vp^2 = 1 / sigma^2."""
    gamma = 5.0
    weights = loss_weights(SIGMAS, prediction_type, "min_snr", gamma)
    for sigma, weight in zip(SIGMAS.tolist(), weights.tolist()):
        snr = 1 / sigma**2
        expected = {"eps": min(snr, gamma) / snr, "v": min(snr, gamma) / (snr + 1), "x0": min(snr, gamma)}[prediction_type]
        assert weight == pytest.approx(expected, rel=1e-6)
    assert torch.equal(loss_weights(SIGMAS, prediction_type), torch.ones(len(SIGMAS)))


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_weighted_target_error_is_min_snr_times_the_x0_error(prediction_type):
    """Whatever the network predicts, weight * |F - target|^2 = min(SNR, gamma) * |x0_hat - x0|^2 per
    sample, with x0_hat what the sampler's wrapper makes of F: one weighting, three parameterizations."""
    pipe = LatentDiffusionPipeline.from_config({**compose("train", ["experiment=smoke"]),
                                                "diffusion": {"prediction_type": prediction_type}})
    generator = torch.Generator().manual_seed(0)
    sigma = SIGMAS[1:6]
    x0 = torch.randn(5, 4, 8, 8, generator=generator, dtype=torch.float64)
    x = x0 + torch.randn(x0.shape, generator=generator, dtype=torch.float64) * sigma.view(-1, 1, 1, 1)
    output = torch.randn(x0.shape, generator=generator, dtype=torch.float64)  # any network output
    c_skip, c_out, _, _ = pipe.model._coefficients(x, sigma)
    x0_hat = c_skip * x + c_out * output
    target = pipe.model.training_target(x0, x, sigma)
    weighted = loss_weights(sigma, prediction_type, "min_snr", 5.0).double() * (output - target).square().mean((1, 2, 3))
    expected = (1 / sigma**2).clamp(max=5.0) * (x0_hat - x0).square().mean((1, 2, 3))
    assert torch.allclose(weighted, expected, rtol=1e-5)


def test_the_unweighted_loss_is_the_plain_mse():
    """With uniform weights the per-sample sum / B is the MSE over the batch (the loss before weighting existed)."""
    torch.manual_seed(0)
    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"]))
    latents, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    sigma = pipe.schedule.sigmas[torch.tensor([3, 100, 250, 500, 750, 999])]
    cond = pipe.conditioner({"prompt": ["a red circle"] * 6})
    loss = denoising_loss(pipe, latents, sigma, noise, cond, torch.ones(6)) / 6
    x = latents + noise * sigma.view(-1, 1, 1, 1).float()
    output, _, _ = pipe.model.network_output(x, sigma, cond)
    assert loss.item() == pytest.approx(F.mse_loss(output, pipe.model.training_target(latents, x, sigma)).item(), rel=1e-6)


def test_ema_warms_up_then_decays_at_the_set_rate():
    """average_n = d_n * average_(n-1) + (1 - d_n) * w_n with d_n = min(decay, (1 + n) / (10 + n))."""
    module = nn.Linear(1, 1, bias=False)
    ema = EMA(module, decay=0.9)
    expected = module.weight.item()
    for n in range(1, 41):
        with torch.no_grad():
            module.weight.fill_(math.sin(n))
        ema.update(module)
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * math.sin(n)
        assert ema.average.weight.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert (1 + 40) / (10 + 40) < 0.9 <= (1 + 81) / (10 + 81)  # still warming up at 40, done by 81
    copy = EMA(nn.Linear(1, 1, bias=False), decay=0.9)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 40 and torch.equal(copy.average.weight, ema.average.weight)


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_zero():
    assert [warmup_cosine(step, 110, 10) for step in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert warmup_cosine(60, 110, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(110, 110, 10) == pytest.approx(0.0, abs=1e-12)
