"""The few-step samplers of consistency-distilled models, lcm and tcd, and the "lcm" sigma grid.

For Gaussian data N(0, Sigma) the probability-flow ODE has a closed form: x(sigma) = (Sigma + sigma^2)^(1/2)
Sigma^(-1/2) x(0), so the consistency function (the ODE's endpoint from x at sigma) is
f(x, sigma) = Sigma^(1/2) (Sigma + sigma^2)^(-1/2) x, which is what a perfectly distilled consistency model
returns. LCM is checked against it; TCD against DDIM and against the update rule written out by hand.
"""

import math

import pytest
import torch

from latentgen import registry
from latentgen.diffusion.experts import NoiseLevelExperts
from latentgen.diffusion.guidance import ClassifierFreeGuidance
from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule
from latentgen.diffusion.prediction import DiscreteTimeDenoiser
from latentgen.diffusion.sigma_grids import GRIDS, karras, lcm_timesteps, sigma_grid
from latentgen.schedulers.discrete_timesteps import noise_schedule_of, stable_diffusion_schedule
from latentgen.schedulers.lcm import boundary_scalings

SD = DiscreteNoiseSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012)
STD = 0.8  # 1-D data N(0, STD^2)
COVARIANCE = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)  # 2-D data N(0, COVARIANCE)


def consistency_1d(x, sigma):
    """The exact consistency function of N(0, STD^2) data: the PF-ODE endpoint of x at sigma."""
    return x * (STD / math.sqrt(STD**2 + float(sigma) ** 2))


def ideal_denoise_1d(x, sigma):
    """E[x0 | x] for N(0, STD^2) data (the MMSE denoiser, not the consistency function)."""
    return x * (STD**2 / (STD**2 + float(sigma) ** 2))


def consistency_2d(x, sigma):
    """f(x, sigma) = Sigma^(1/2) (Sigma + sigma^2 I)^(-1/2) x for x (..., 2), through Sigma's eigenbasis."""
    eigenvalues, basis = torch.linalg.eigh(COVARIANCE)
    gain = basis @ torch.diag((eigenvalues / (eigenvalues + float(sigma) ** 2)).sqrt()) @ basis.T
    return x @ gain.T.to(x.dtype)


def some_denoiser(x, sigma):
    """A nonlinear stand-in for a network: any x0 estimate will do where only the update rule is compared."""
    return torch.tanh(0.7 * x) + 0.1 * torch.sin(float(sigma) * x)


def lcm(**options):
    return registry.build("scheduler", "lcm", **options)


def tcd(**options):
    return registry.build("scheduler", "tcd", **options)


class WithSchedule:
    """A denoise object exposing `noise_schedule`, as the pipeline's guidance does."""

    def __init__(self, fn, schedule):
        self.fn, self.noise_schedule = fn, schedule

    def __call__(self, x, sigma):
        return self.fn(x, sigma)


# (a) LCM with the exact consistency function of Gaussian data


def test_lcm_in_one_step_lands_on_the_exact_probability_flow_endpoint():
    grid = sigma_grid(SD, 1, "lcm")  # [sigma(999), 0]
    sigma_max = float(grid[0])
    x = torch.randn(256, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * math.sqrt(
        STD**2 + sigma_max**2)
    out = lcm()(consistency_1d, x.clone(), grid, generator=torch.Generator().manual_seed(1))
    exact = x * (STD / math.sqrt(STD**2 + sigma_max**2))  # the closed-form ODE solution at sigma 0
    # At t = 999, c_skip = 0.25 / 9990^2 = 2.5e-9 and 1 - c_out = 1.3e-9: the boundary scalings move the
    # result by ~1e-8 of |x0| at most; a missing or misplaced c_skip / noise would be far larger.
    torch.testing.assert_close(out, exact, rtol=2e-8, atol=0)
    # An independent reference: the PF-ODE integrated numerically (Heun, second order, 1000 Karras steps) with
    # the MMSE denoiser. Its own error is about 5e-5 relative at 400 steps, so about 8e-6 at 1000.
    ode = registry.build("scheduler", "heun")(ideal_denoise_1d, x.clone(), karras(1000, 1e-4, sigma_max))
    torch.testing.assert_close(out, ode, rtol=3e-5, atol=1e-6)


def test_lcm_in_one_step_is_exact_for_correlated_2d_data():
    grid = sigma_grid(SD, 1, "lcm")
    x = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * float(grid[0])
    out = lcm()(consistency_2d, x.clone(), grid)
    # c_skip * x_vp (2.5e-9 times |x_vp| < 4) is not along f(x) in 2-D: an absolute 1e-8 besides rtol
    torch.testing.assert_close(out, consistency_2d(x, grid[0]), rtol=2e-8, atol=1e-8)


@pytest.mark.parametrize("steps", [2, 4])
def test_lcm_multistep_keeps_the_data_covariance(steps):
    """With the exact consistency function each step gives x0 ~ N(0, Sigma) and re-noising gives exactly the
    marginal at the next sigma, so the output's covariance is Sigma (up to c_skip < 1e-7 on this grid).

    n = 40 000: the standard error of a covariance entry is sqrt((S_ii S_jj + S_ij^2) / n) <= 0.0063 here
    and of a mean sqrt(S_ii / n) <= 0.005; the tolerances are 4 of them. Re-noising by sigma_next with the
    wrong law (VP's sqrt(1 - abar), none at all) shrinks the covariance by 10-60 %, well outside them.
    """
    n = 40_000
    grid = sigma_grid(SD, steps, "lcm")
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(n, 2, dtype=torch.float64, generator=generator)
    x = start @ torch.linalg.cholesky(COVARIANCE + float(grid[0]) ** 2 * torch.eye(2, dtype=torch.float64)).T
    out = lcm()(consistency_2d, x, grid, generator=generator)
    variance = COVARIANCE.diagonal()
    covariance_error = 4 * ((variance[:, None] * variance[None, :] + COVARIANCE**2) / n).sqrt()
    assert torch.all(out.mean(0).abs() < 4 * (variance / n).sqrt()), out.mean(0)
    assert torch.all((torch.cov(out.T) - COVARIANCE).abs() < covariance_error), torch.cov(out.T)


def test_lcm_multistep_keeps_the_1d_variance():
    n = 40_000
    grid = sigma_grid(SD, 4, "lcm")
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(n, dtype=torch.float64, generator=generator) * math.sqrt(STD**2 + float(grid[0]) ** 2)
    out = lcm()(consistency_1d, x, grid, generator=generator)
    # The sample variance's relative standard error is sqrt(2 / n) = 0.7 %; 4 of them is 2.8 %.
    assert out.var().item() == pytest.approx(STD**2, rel=4 * math.sqrt(2 / n))


def test_lcm_adds_no_noise_after_the_last_step():
    grid = sigma_grid(SD, 4, "lcm")
    x = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * float(grid[0])
    seen = []
    out = lcm()(consistency_1d, x, grid, generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert torch.equal(out, seen[-1]["denoised"])  # the last consistency estimate is the sample


# (b) TCD against DDIM and against its update rule


@pytest.mark.parametrize("grid", [SD.sigma_grid(10), sigma_grid(SD, 4, "lcm"), karras(7, 0.05, 12.0),
                                  SD.sigma_grid(6, "trailing")], ids=["leading", "lcm", "karras", "trailing"])
def test_tcd_with_gamma_zero_is_ddim_bit_for_bit(grid):
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(6)) * float(grid[0])
    ddim = registry.build("scheduler", "ddim", eta=0.0)(some_denoiser, x.clone(), grid)
    ours = tcd(gamma=0.0)(some_denoiser, x.clone(), grid, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours, ddim)
    assert not tcd(gamma=0.0).stochastic


def tcd_by_hand(denoise, x, grid, schedule, gamma, generator):
    """TCD's step written out: DDIM to the sigma of floor((1 - gamma) * t_next), noise up to sigma_next."""
    timesteps = schedule.sigma_to_t(grid).round().long()  # the grids below lie on integer timesteps
    for i in range(len(grid) - 1):
        sigma, sigma_next = float(grid[i]), float(grid[i + 1])
        x0 = denoise(x, grid[i])
        eps = (x - x0) / sigma
        if sigma_next == 0:
            return x0
        sigma_mid = float(schedule.sigmas[math.floor((1 - gamma) * int(timesteps[i + 1]))])
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.dtype)
        x = x0 + sigma_mid * eps + math.sqrt(sigma_next**2 - sigma_mid**2) * z
    return x


@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.3])
def test_tcd_follows_its_update_rule(gamma):
    grid = sigma_grid(SD, 4, "lcm")
    x = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * float(grid[0])
    ours = tcd(gamma=gamma)(some_denoiser, x.clone(), grid, generator=torch.Generator().manual_seed(8))
    by_hand = tcd_by_hand(some_denoiser, x.clone(), grid, SD, gamma, torch.Generator().manual_seed(8))
    torch.testing.assert_close(ours, by_hand, rtol=1e-12, atol=1e-12)


def test_tcd_gamma_one_is_lcm_renoising_when_timestep_zero_is_clean():
    """gamma = 1 goes to timestep 0 and re-noises from there. Where timestep 0 is (almost) noise-free and LCM's
    c_skip is negligible, that is LCM's step exactly: x0 + sigma_next * z with the same z. (On Stable
    Diffusion's schedule timestep 0 has sigma 0.029: see test_tcd_follows_its_update_rule for that case.)"""
    alphas_cumprod = SD.alphas_cumprod.clone()
    alphas_cumprod[0] = 1 / (1 + 1e-16)  # sigma at timestep 0: 1e-8
    schedule = DiscreteNoiseSchedule(alphas_cumprod)
    denoise = WithSchedule(some_denoiser, schedule)
    grid = sigma_grid(schedule, 4, "lcm")
    x = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * float(grid[0])
    ours = tcd(gamma=1.0)(denoise, x.clone(), grid, generator=torch.Generator().manual_seed(10))
    theirs = lcm()(denoise, x.clone(), grid, generator=torch.Generator().manual_seed(10))
    # Differences: sigma(0) * eps ~ 1e-8 and c_skip ~ 4e-8 at t = 259; the noise alone is of size 0.7.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    unlike = lcm()(denoise, x.clone(), grid, generator=torch.Generator().manual_seed(11))
    assert (ours - unlike).abs().max() > 0.1


def test_tcd_mid_sigma_is_never_above_the_next_sigma():
    sampler = tcd(gamma=0.3)
    # below timestep 0's sigma (0.029) the floor would give a larger sigma: it stays at sigma_next (no noise)
    for sigma_next in (0.01, 0.029, 0.5, 3.0, 14.0, 20.0):
        sigma_next = torch.tensor(sigma_next, dtype=torch.float64)
        assert float(sampler.mid_sigma(SD, sigma_next)) <= float(sigma_next)
    assert float(sampler.mid_sigma(SD, torch.tensor(0.0, dtype=torch.float64))) == 0.0
    # on the grid: t_next = 259 -> floor(0.7 * 259) = 181
    assert float(sampler.mid_sigma(SD, SD.sigmas[259])) == float(SD.sigmas[181])


# (c) the lcm grid


def test_lcm_grid_on_stable_diffusion():
    assert "lcm" in GRIDS
    assert lcm_timesteps(SD, 4).tolist() == [999, 759, 499, 259]
    grid = sigma_grid(SD, 4, "lcm")
    assert torch.equal(grid, torch.cat([SD.sigmas[[999, 759, 499, 259]], torch.zeros(1, dtype=torch.float64)]))
    torch.testing.assert_close(SD.sigma_to_t(grid[:-1]), torch.tensor([999.0, 759, 499, 259], dtype=torch.float64))
    # diffusers' LCMScheduler.set_timesteps for these step counts (origin 50): floor(linspace(0, 50, n, endpoint=False))
    assert lcm_timesteps(SD, 1).tolist() == [999]
    assert lcm_timesteps(SD, 2).tolist() == [999, 499]
    assert lcm_timesteps(SD, 8).tolist() == [999, 879, 759, 639, 499, 379, 259, 139]
    assert lcm_timesteps(SD, 50).tolist() == list(range(999, 0, -20))
    assert lcm_timesteps(SD, 3, origin_steps=25).tolist() == [999, 679, 359]  # skip 40: 39, 79, ..., 999


def test_lcm_grid_refuses_more_steps_than_it_was_distilled_on():
    with pytest.raises(ValueError, match=r"origin_steps=50.*steps=51"):
        sigma_grid(SD, 51, "lcm")
    with pytest.raises(ValueError, match="origin_steps"):
        sigma_grid(SD, 4, "lcm", origin_steps=0)
    with pytest.raises(ValueError, match="origin_steps"):
        lcm_timesteps(SD, 4, origin_steps=2000)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sigma_grid(SD, 0, "lcm")


# (d) boundary scalings


def test_boundary_scalings_follow_the_formula():
    # t = 1, scaling 10: tau = 10, c_skip = 0.25 / 100.25, c_out = 10 / sqrt(100.25)
    c_skip, c_out = boundary_scalings(1)
    assert c_skip == pytest.approx(0.0024937655860349127, rel=1e-14)
    assert c_out == pytest.approx(0.9987523388778446, rel=1e-14)
    assert boundary_scalings(259) == pytest.approx((0.25 / (2590**2 + 0.25), 2590 / math.sqrt(2590**2 + 0.25)))
    assert boundary_scalings(1, timestep_scaling=1.0, sigma_data=1.0) == pytest.approx((0.5, math.sqrt(0.5)))
    assert boundary_scalings(0) == (1.0, 0.0)
    assert lcm(timestep_scaling=2.0, sigma_data=0.25).scalings(3) == boundary_scalings(3, 2.0, 0.25)


def test_boundary_scalings_matter_at_the_first_timesteps():
    x = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    # at t = 0 the consistency function is the identity on the VP sample: the denoiser's output is ignored
    sigma_0 = SD.sigmas[0]
    grid = torch.stack([sigma_0, torch.zeros((), dtype=torch.float64)])
    out = lcm()(some_denoiser, x.clone(), grid)
    torch.testing.assert_close(out, x / math.sqrt(1 + float(sigma_0) ** 2), rtol=1e-12, atol=0)
    assert not torch.allclose(out, some_denoiser(x, sigma_0))
    # at t = 1 both terms count
    grid = torch.stack([SD.sigmas[1], torch.zeros((), dtype=torch.float64)])
    c_skip, c_out = boundary_scalings(1)
    expected = c_skip * x / math.sqrt(1 + float(SD.sigmas[1]) ** 2) + c_out * some_denoiser(x, SD.sigmas[1])
    torch.testing.assert_close(lcm()(some_denoiser, x.clone(), grid), expected, rtol=1e-12, atol=1e-12)
    # timestep_scaling 1 at t = 1: c_skip = 0.25 / 1.25 = 0.2
    c_skip, c_out = boundary_scalings(1, timestep_scaling=1.0)
    assert c_skip == pytest.approx(0.2)
    expected = c_skip * x / math.sqrt(1 + float(SD.sigmas[1]) ** 2) + c_out * some_denoiser(x, SD.sigmas[1])
    torch.testing.assert_close(lcm(timestep_scaling=1.0)(some_denoiser, x.clone(), grid), expected, rtol=1e-12,
                               atol=1e-12)


# (e) options


@pytest.mark.parametrize("name, options, message", [
    ("lcm", dict(timestep_scaling=0), "timestep_scaling > 0"),
    ("lcm", dict(timestep_scaling=-10.0), "timestep_scaling=-10.0"),
    ("lcm", dict(timestep_scaling=float("nan")), "timestep_scaling"),
    ("lcm", dict(sigma_data=0.0), "sigma_data > 0"),
    ("lcm", dict(sigma_data="0.5"), "sigma_data"),
    ("tcd", dict(gamma=-0.1), r"gamma in \[0, 1\].*gamma=-0.1"),
    ("tcd", dict(gamma=1.5), "gamma=1.5"),
    ("tcd", dict(gamma=float("nan")), "gamma"),
])
def test_bad_options_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message) as caught:
        registry.build("scheduler", name, **options)
    assert f"scheduler '{name}'" in str(caught.value)


def test_declared_capabilities():
    assert lcm().stochastic and lcm().order == 1
    assert tcd().gamma == 0.3 and tcd().stochastic
    assert tcd(gamma=1).stochastic and not tcd(gamma=0).stochastic


# (f) reproducibility and the noise_schedule protocol


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_seeded_runs_reproduce_and_seeds_differ(name):
    grid = sigma_grid(SD, 4, "lcm")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(13)) * float(grid[0])
    sampler = registry.build("scheduler", name)
    torch.manual_seed(0)
    first = sampler(some_denoiser, x.clone(), grid, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)  # the global RNG plays no part
    second = sampler(some_denoiser, x.clone(), grid, generator=torch.Generator().manual_seed(1))
    other = sampler(some_denoiser, x.clone(), grid, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_guidance_and_experts_expose_the_model_schedule():
    schedule = DiscreteNoiseSchedule.from_betas("linear", 1000, 1e-4, 0.02)
    model = DiscreteTimeDenoiser(None, schedule)
    guided = ClassifierFreeGuidance(model, {}, None, 1.0)
    assert guided.noise_schedule is schedule
    assert ClassifierFreeGuidance(lambda x, s, c: x, {}, None, 1.0).noise_schedule is None
    refiner = ClassifierFreeGuidance(DiscreteTimeDenoiser(None, SD), {}, None, 1.0)
    assert NoiseLevelExperts(guided, refiner, 1.0).noise_schedule is schedule
    assert NoiseLevelExperts(some_denoiser, refiner, 1.0).noise_schedule is None
    assert noise_schedule_of(guided) is schedule
    assert noise_schedule_of(some_denoiser) is stable_diffusion_schedule()
    torch.testing.assert_close(stable_diffusion_schedule().alphas_cumprod, SD.alphas_cumprod, rtol=0, atol=0)
    with pytest.raises(TypeError, match="noise_schedule must be a DiscreteNoiseSchedule"):
        noise_schedule_of(WithSchedule(some_denoiser, "scaled_linear"))


def test_samplers_use_the_schedule_the_denoiser_exposes():
    """The same function with and without a (non-SD) schedule attached: the timesteps, and so TCD's mid
    sigma and LCM's scalings, come from the attached one."""
    linear = DiscreteNoiseSchedule.from_betas("linear", 1000, 1e-4, 0.02)
    grid = sigma_grid(linear, 4, "lcm")
    x = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(14)) * float(grid[0])
    attached = WithSchedule(some_denoiser, linear)
    ours = tcd(gamma=0.5)(attached, x.clone(), grid, generator=torch.Generator().manual_seed(15))
    by_hand = tcd_by_hand(some_denoiser, x.clone(), grid, linear, 0.5, torch.Generator().manual_seed(15))
    torch.testing.assert_close(ours, by_hand, rtol=1e-12, atol=1e-12)
    plain = tcd(gamma=0.5)(some_denoiser, x.clone(), grid, generator=torch.Generator().manual_seed(15))
    assert not torch.allclose(ours, plain)
    # LCM at linear's timestep 1 (sigma 0.015): c_skip(1) = 0.0025 there; SD's schedule would call that sigma
    # timestep 0 (its smallest sigma is 0.029), where the consistency function ignores the denoiser
    sigma_1 = linear.sigmas[1]
    start = torch.stack([sigma_1, torch.zeros((), dtype=torch.float64)])
    c_skip, c_out = boundary_scalings(1)
    expected = c_skip * x / math.sqrt(1 + float(sigma_1) ** 2) + c_out * some_denoiser(x, sigma_1)
    torch.testing.assert_close(lcm()(attached, x.clone(), start), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lcm()(some_denoiser, x.clone(), start), x / math.sqrt(1 + float(sigma_1) ** 2),
                               rtol=1e-12, atol=0)


def test_the_pipeline_hands_its_schedule_to_the_sampler():
    from latentgen.config import compose
    from latentgen.pipeline import LatentDiffusionPipeline
    from latentgen.schedulers.tcd import TCDScheduler

    seen = []

    class Recording(TCDScheduler):
        def sample(self, denoise, x, sigmas, generator, callback):
            seen.append(noise_schedule_of(denoise))
            return super().sample(denoise, x, sigmas, generator, callback)

    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"]))
    pipe.scheduler = Recording()
    for scale in (1.0, 3.0):  # one pass, and guided
        out = pipe("a red circle", steps=3, guidance_scale=scale, seed=0, output_type="latent", num_images=1)
        assert torch.isfinite(out).all()
    assert len(seen) == 2 and all(schedule is pipe.schedule for schedule in seen)
