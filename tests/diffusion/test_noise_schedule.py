"""Discrete noise schedules and sigma grids against known values and independent formulas."""

import math

import numpy as np
import pytest
import torch

from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule


@pytest.fixture(scope="module")
def sd():
    return DiscreteNoiseSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012)


def test_stable_diffusion_sigma_range(sd):
    # The range every SD sampler reports (k-diffusion's CompVisDenoiser): 0.0292 .. 14.6146.
    assert sd.sigma_min == pytest.approx(0.029168, abs=1e-5)
    assert sd.sigma_max == pytest.approx(14.614642, abs=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_matches_numpy(schedule):
    beta_start, beta_end, T = 1e-4, 0.02, 1000
    if schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T)
    elif schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T) ** 2
    else:
        beta_end = 0.999
        f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)])
    ours = DiscreteNoiseSchedule.from_betas(schedule, T, beta_start, beta_end).alphas_cumprod.numpy()
    np.testing.assert_allclose(ours, np.cumprod(1 - betas), rtol=1e-12)
    assert np.all(np.diff(ours) < 0)


def test_sigma_to_t_is_exact_on_the_grid_and_inverts_t_to_sigma(sd):
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(sd.sigma_to_t(sd.sigmas), t)
    fractional = torch.tensor([0.25, 10.5, 500.75, 998.9], dtype=torch.float64)
    torch.testing.assert_close(sd.sigma_to_t(sd.t_to_sigma(fractional)), fractional, rtol=0, atol=1e-9)


def test_leading_spacing_is_the_original_ddim_grid(sd):
    assert sd.timesteps(50, "leading").tolist() == list(range(981, 0, -20))


def test_trailing_and_linspace_spacing(sd):
    trailing = sd.timesteps(10, "trailing").tolist()
    assert trailing[0] == 999 and trailing == sorted(trailing, reverse=True) and len(set(trailing)) == 10
    assert sd.timesteps(4, "linspace").tolist() == [999, 666, 333, 0]


def test_sigma_grid_descends_to_zero(sd):
    grid = sd.sigma_grid(25)
    assert grid.shape == (26,) and grid.dtype == torch.float64
    assert grid[-1] == 0 and bool(torch.all(grid[:-1] > grid[1:]))
    assert sd.sigma_grid(1000).shape == (1001,)  # every training timestep once


@pytest.mark.parametrize("steps, spacing, message", [(0, "leading", "positive"), (1001, "leading", "exceed"),
                                                     (10, "sideways", "spacing")])
def test_bad_grids_are_refused(sd, steps, spacing, message):
    with pytest.raises(ValueError, match=message):
        sd.timesteps(steps, spacing)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="scaled_linear"):
        DiscreteNoiseSchedule.from_betas("quadratic")
