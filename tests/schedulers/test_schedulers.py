"""Schedulers against exact solutions for Gaussian data, and the sampling contract for every registered one."""

import math

import pytest
import torch

from latentgen import registry
from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule

MEAN, STD = 0.5, 0.8  # data x0 ~ N(MEAN, STD^2)


def ideal_denoise(x, sigma):
    """E[x0 | x] for Gaussian data: the denoiser a perfectly trained model would be."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    return MEAN + STD**2 / (STD**2 + sigma**2) * (x - MEAN)


def exact_ode_endpoint(x_start, sigma_start):
    """Probability-flow ODE solution at sigma = 0: the noise level shrinks, the standardized value stays."""
    return MEAN + STD / math.sqrt(STD**2 + sigma_start**2) * (x_start - MEAN)


def geometric_grid(steps, sigma_max=10.0, sigma_min=0.002):
    sigmas = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), steps, dtype=torch.float64)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def test_ddim_is_first_order_on_the_probability_flow_ode():
    ddim = registry.build("scheduler", "ddim", eta=0.0)
    x_start = torch.randn(256, dtype=torch.float64) * math.sqrt(STD**2 + 100)
    exact = exact_ode_endpoint(x_start, 10.0)
    errors = []
    for steps in (20, 40, 80, 160):
        out = ddim(ideal_denoise, x_start.clone(), geometric_grid(steps))
        errors.append((out - exact).abs().max().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
    assert all(0.8 < order < 1.2 for order in orders), (errors, orders)


@pytest.mark.parametrize("name, options", [("ddpm", {}), ("ddim", {"eta": 1.0})])
def test_ancestral_samplers_reach_the_data_distribution(name, options):
    sampler = registry.build("scheduler", name, **options)
    schedule = DiscreteNoiseSchedule.from_betas("scaled_linear")
    # Every training timestep: the posterior steps are then DDPM's own and the result is exact in law.
    sigmas = schedule.sigma_grid(1000)
    generator = torch.Generator().manual_seed(0)
    x = MEAN + torch.randn(40_000, dtype=torch.float64, generator=generator) * math.sqrt(STD**2 + sigmas[0].item() ** 2)
    out = sampler(ideal_denoise, x, sigmas, generator=generator)
    # 40k draws: standard errors 0.004 (mean) and 0.35 % (std); tolerances are about 4 of them.
    assert out.mean().item() == pytest.approx(MEAN, abs=0.016)
    assert out.std().item() == pytest.approx(STD, rel=0.015)


def test_ddim_eta_one_is_ddpm():
    sigmas = DiscreteNoiseSchedule.from_betas().sigma_grid(30)
    x = torch.randn(64, dtype=torch.float64) * sigmas[0]
    ddpm = registry.build("scheduler", "ddpm")(ideal_denoise, x, sigmas, generator=torch.Generator().manual_seed(3))
    ddim = registry.build("scheduler", "ddim", eta=1.0)(ideal_denoise, x, sigmas, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-10, atol=1e-10)


def test_fixed_large_variance_differs_from_fixed_small():
    sigmas = DiscreteNoiseSchedule.from_betas().sigma_grid(10)
    x = torch.randn(64, dtype=torch.float64) * sigmas[0]
    small = registry.build("scheduler", "ddpm")(ideal_denoise, x, sigmas, generator=torch.Generator().manual_seed(1))
    large = registry.build("scheduler", "ddpm", variance="fixed_large")(ideal_denoise, x, sigmas,
                                                                        generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(small, large)


@pytest.mark.parametrize("name", registry.available("scheduler"))
def test_scheduler_contract(name):
    """What every registered scheduler, third-party ones included, must honour."""
    sampler = registry.build("scheduler", name)
    sigmas = DiscreteNoiseSchedule.from_betas().sigma_grid(6)
    x = torch.randn(2, 4, 8, 8) * sigmas[0].float()
    calls = []
    out = sampler(lambda x, s: ideal_denoise(x, s.float()), x, sigmas, generator=torch.Generator().manual_seed(0),
                  callback=calls.append)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert [c["i"] for c in calls] == list(range(6))
    assert set(calls[0]) >= {"x", "i", "sigma", "denoised"}
    again = sampler(lambda x, s: ideal_denoise(x, s.float()), x, sigmas, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


@pytest.mark.parametrize("sigmas, message", [
    (torch.tensor([1.0]), "at least 2"),
    (torch.tensor([1.0, 2.0, 0.0]), "descending"),
    (torch.tensor([2.0, 1.0]), "ending in 0"),
])
def test_bad_sigma_grids_are_refused(sigmas, message):
    with pytest.raises(ValueError, match=message):
        registry.build("scheduler", "ddim")(ideal_denoise, torch.zeros(2), sigmas)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="eta"):
        registry.build("scheduler", "ddim", eta=-0.5)
    with pytest.raises(ValueError, match="variance"):
        registry.build("scheduler", "ddpm", variance="learned")
