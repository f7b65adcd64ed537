"""The DPM-Solver family against exact Gaussian solutions, against each other where theory says they agree,
and their options and seeding."""

import math

import pytest
import torch

from latentgen import registry
from latentgen.diffusion.sigma_grids import exponential, karras
from latentgen.testing import GaussianMixture, empirical_order

GAUSSIAN = GaussianMixture.gaussian(mean=0.5, std=0.8)  # closed-form ODE solution
MIXTURE = GaussianMixture([[-1.0, 0.5], [1.2, -0.4], [0.2, 1.5]], [0.35, 0.5, 0.25], [0.3, 0.5, 0.2])
STOCHASTIC = [("dpmpp_2s_ancestral", {}), ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"solver_type": "heun"}),
              ("dpmpp_3m_sde", {})]


def build(name, **options):
    return registry.build("scheduler", name, **options)


def start(data, n, sigma, seed=0):
    return data.prior(n, sigma, torch.Generator().manual_seed(seed))


def test_dpmpp_2m_reaches_the_exact_gaussian_endpoint_in_50_steps():
    x = start(GAUSSIAN, 256, 10.0)
    exact = GAUSSIAN.ode_solution(x, 10.0, 0.0)  # closed form
    grid = exponential(50, 0.01, 10.0)
    error = (build("dpmpp_2m")(GAUSSIAN.denoise, x.clone(), grid) - exact).abs().max().item()
    first_order = (build("ddim")(GAUSSIAN.denoise, x.clone(), grid) - exact).abs().max().item()
    # measured 2.4e-3 (DDIM, first order: 7.3e-2) for |x| up to 30 at sigma = 10
    assert error < 4e-3, error
    assert error < first_order / 10, (error, first_order)


@pytest.mark.parametrize("name, options, order", [
    ("dpm2", {}, 2),
    ("dpmpp_2m", {}, 2),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 2),
    ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "midpoint"}, 2),
    ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 2),
    ("dpmpp_3m_sde", {"eta": 0.0}, 3),
])
def test_order_on_gaussian_data(name, options, order):
    """Halving the step divides the error by 2^order (Karras grid, single Gaussian, exact reference)."""
    sampler = build(name, **options)
    assert not sampler.stochastic and sampler.order == order
    x = start(GAUSSIAN, 128, 10.0)
    exact = GAUSSIAN.denoise(GAUSSIAN.ode_solution(x, 10.0, 0.02), 0.02)  # the last step is the denoiser
    steps = (16, 32, 64, 128)
    errors = [(sampler(GAUSSIAN.denoise, x.clone(), karras(n, 0.02, 10.0)) - exact).abs().max().item() for n in steps]
    assert abs(empirical_order(steps, errors) - order) < 0.25, errors


def _dpmpp_2m_by_hand(denoise, x, sigmas):
    """Lu et al. 2022b, Alg. 2, written out independently of the library's exponential weights."""
    previous, h_previous = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        if sigma_next == 0:
            return denoised
        h = math.log(sigma / sigma_next)
        estimate = denoised if previous is None else denoised + (denoised - previous) * h / (2 * h_previous)
        x = x * (sigma_next / sigma) + estimate * (1 - math.exp(-h))
        previous, h_previous = denoised, h
    return x


def test_dpmpp_2m_is_the_2m_sde_solver_at_eta_0_with_midpoint():
    x = start(MIXTURE, 64, 20.0)
    grid = karras(15, 0.01, 20.0)
    ode = build("dpmpp_2m")(MIXTURE.denoise, x.clone(), grid)
    torch.testing.assert_close(ode, _dpmpp_2m_by_hand(MIXTURE.denoise, x.clone(), grid), rtol=1e-12, atol=1e-12)
    sde = build("dpmpp_2m_sde", eta=0.0, solver_type="midpoint")(MIXTURE.denoise, x.clone(), grid)
    torch.testing.assert_close(sde, ode, rtol=1e-12, atol=1e-12)
    heun = build("dpmpp_2m_sde", eta=0.0, solver_type="heun")(MIXTURE.denoise, x.clone(), grid)
    assert (heun - ode).abs().max() > 1e-4  # a different second-order rule, not the same one


def test_3m_sde_warm_up_is_2m_sde_heun_and_then_differs():
    """Steps 1 and 2 of 3M are the first- and second-order (exactly integrated line) updates of 2M heun;
    the step to 0 returns D. With two steps above 0 they agree; with more the quadratic term shows."""
    x = start(MIXTURE, 64, 20.0)
    three, two = build("dpmpp_3m_sde", eta=0.0), build("dpmpp_2m_sde", eta=0.0, solver_type="heun")
    short = karras(3, 0.5, 20.0)
    torch.testing.assert_close(three(MIXTURE.denoise, x.clone(), short), two(MIXTURE.denoise, x.clone(), short),
                               rtol=1e-12, atol=1e-12)
    long = karras(8, 0.01, 20.0)
    assert (three(MIXTURE.denoise, x.clone(), long) - two(MIXTURE.denoise, x.clone(), long)).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_sde_variants_with_one_step_above_zero_are_ddpm(name):
    """At eta = 1 a first-order step of the SDE is DDPM's posterior draw (same mean, same noise)."""
    x = start(MIXTURE, 64, 20.0)
    grid = torch.tensor([20.0, 3.0, 0.0], dtype=torch.float64)
    ddpm = build("ddpm")(MIXTURE.denoise, x.clone(), grid, generator=torch.Generator().manual_seed(5))
    sde = build(name, eta=1.0)(MIXTURE.denoise, x.clone(), grid, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sde, ddpm, rtol=1e-10, atol=1e-10)


def test_2s_ancestral_at_eta_0_is_a_2s_step():
    """One step sigma -> sigma_next by hand: data-prediction step to the lambda midpoint, then the whole step
    with the denoiser found there; then the step to 0 returns the denoiser."""
    x = start(MIXTURE, 32, 5.0)
    s, t = 5.0, 1.0
    m = math.sqrt(s * t)
    x_mid = (m / s) * x + (1 - m / s) * MIXTURE.denoise(x, s)
    x_t = (t / s) * x + (1 - t / s) * MIXTURE.denoise(x_mid, m)
    expected = MIXTURE.denoise(x_t, t)
    grid = torch.tensor([s, t, 0.0], dtype=torch.float64)
    torch.testing.assert_close(build("dpmpp_2s_ancestral", eta=0.0)(MIXTURE.denoise, x, grid), expected,
                               rtol=1e-12, atol=1e-12)


def test_dpm2_single_step_is_the_geometric_midpoint_rule():
    x = start(MIXTURE, 32, 5.0)
    s, t = 5.0, 1.0
    m = math.sqrt(s * t)
    x_mid = x + (m - s) * (x - MIXTURE.denoise(x, s)) / s
    x_t = x + (t - s) * (x_mid - MIXTURE.denoise(x_mid, m)) / m
    grid = torch.tensor([s, t, 0.0], dtype=torch.float64)
    torch.testing.assert_close(build("dpm2")(MIXTURE.denoise, x, grid), MIXTURE.denoise(x_t, t),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, options", STOCHASTIC + [("dpmpp_2m_sde", {"eta": 0.5}), ("dpmpp_3m_sde", {"eta": 0.5})])
def test_stochastic_samplers_reach_the_gaussian(name, options):
    """Any eta keeps the marginals: 20k draws from N(0.5, 0.8^2) within about 4 standard errors."""
    sampler = build(name, **options)
    assert sampler.stochastic
    generator = torch.Generator().manual_seed(0)
    x = start(GAUSSIAN, 20_000, 20.0, seed=1)
    out = sampler(GAUSSIAN.denoise, x, karras(100, 0.01, 20.0), generator=generator)
    assert out.mean().item() == pytest.approx(0.5, abs=0.025)
    assert out.std().item() == pytest.approx(0.8, rel=0.02)


def test_s_noise_scales_the_injected_noise():
    x = start(GAUSSIAN, 20_000, 20.0, seed=1)
    grid = karras(50, 0.01, 20.0)
    stds = [build("dpmpp_2m_sde", s_noise=s_noise)(GAUSSIAN.denoise, x.clone(), grid,
                                                   generator=torch.Generator().manual_seed(0)).std().item()
            for s_noise in (0.0, 1.0, 1.5)]
    assert stds[0] < 0.7 < stds[1] < 0.85 < stds[2], stds  # no noise collapses toward the mean


@pytest.mark.parametrize("name, options", STOCHASTIC)
def test_seeded_reproducibility(name, options):
    x = start(MIXTURE, 16, 20.0)
    grid = karras(10, 0.01, 20.0)

    def run(seed):
        return build(name, **options)(MIXTURE.denoise, x.clone(), grid, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


@pytest.mark.parametrize("name, options", [
    ("dpm2", {}), ("dpmpp_2m", {}), ("dpmpp_2s_ancestral", {"eta": 0.0}), ("dpmpp_2m_sde", {"eta": 0.0}),
    ("dpmpp_3m_sde", {"eta": 0.0}),
])
def test_deterministic_options_ignore_the_generator(name, options):
    sampler = build(name, **options)
    assert not sampler.stochastic
    x = start(MIXTURE, 16, 20.0)
    grid = karras(10, 0.01, 20.0)
    first = sampler(MIXTURE.denoise, x.clone(), grid, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, sampler(MIXTURE.denoise, x.clone(), grid, generator=torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("name, options, words", [
    ("dpmpp_2s_ancestral", {"eta": -0.1}, ["dpmpp_2s_ancestral", "eta >= 0"]),
    ("dpmpp_2s_ancestral", {"s_noise": -1.0}, ["dpmpp_2s_ancestral", "s_noise >= 0"]),
    ("dpmpp_2m_sde", {"eta": -1.0}, ["dpmpp_2m_sde", "eta >= 0"]),
    ("dpmpp_2m_sde", {"s_noise": -1.0}, ["dpmpp_2m_sde", "s_noise >= 0"]),
    ("dpmpp_2m_sde", {"solver_type": "euler"}, ["dpmpp_2m_sde", "midpoint", "heun", "euler"]),
    ("dpmpp_3m_sde", {"eta": float("nan")}, ["dpmpp_3m_sde", "eta >= 0"]),
])
def test_option_validation(name, options, words):
    with pytest.raises(ValueError) as info:
        build(name, **options)
    assert all(word in str(info.value) for word in words), str(info.value)


@pytest.mark.parametrize("name, options", [("dpmpp_2s_ancestral", {}), ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {}),
                                           ("dpmpp_2s_ancestral", {"eta": 0.0})])
def test_stochastic_flag_follows_eta(name, options):
    assert build(name, **options).stochastic == (options.get("eta", 1.0) > 0)


@pytest.mark.parametrize("name", ["dpm2", "dpmpp_2m", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_float32_single_step_and_callback(name):
    sampler = build(name)
    x = start(MIXTURE, 8, 20.0).float()
    calls = []
    out = sampler(MIXTURE.denoise, x, torch.tensor([20.0, 0.0], dtype=torch.float64),
                  generator=torch.Generator().manual_seed(0), callback=calls.append)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert [c["i"] for c in calls] == [0]
    torch.testing.assert_close(out, MIXTURE.denoise(x, 20.0))  # one step to 0 returns the denoiser
