"""The rk4 sampler: latentgen's scheduler contract, and accuracy against exact solutions."""

from __future__ import annotations

import pytest
import torch

from latentgen import registry
from latentgen.diffusion.sigma_grids import karras
from latentgen.testing import HYDRA_RULE, REGISTRY_RULE, check_scheduler, empirical_order
from latentgen.testing.analytic import ACCURACY_MIXTURE, ACCURACY_SIGMA_MAX, ACCURACY_SIGMA_MIN, accuracy_reference
from latentgen_example.rk4 import RK4Scheduler

# Kutta's tableau, written out as a generic explicit Runge-Kutta method: an independent reference.
NODES = [0.0, 0.5, 0.5, 1.0]
MATRIX = [[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]]
WEIGHTS = [1 / 6, 1 / 3, 1 / 3, 1 / 6]


def explicit_runge_kutta_step(slope, x, sigma, sigma_next):
    h = sigma_next - sigma
    stages = []
    for node, row in zip(NODES, MATRIX):
        stages.append(slope(x + h * sum((a * k for a, k in zip(row, stages)), torch.zeros_like(x)), sigma + node * h))
    return x + h * sum(w * k for w, k in zip(WEIGHTS, stages))


@pytest.fixture(scope="module")
def reference():
    """Start points at sigma 20 and the exact ODE solution at sigma 0.01, denoised there."""
    return accuracy_reference()


def grid(steps):
    return karras(steps, ACCURACY_SIGMA_MIN, ACCURACY_SIGMA_MAX)


def test_contract():
    checked = check_scheduler(lambda: registry.build("scheduler", "rk4"))
    assert {REGISTRY_RULE, HYDRA_RULE} <= set(checked)  # built through the registry and the plugin's YAML option
    assert RK4Scheduler.order == 4 and not RK4Scheduler.stochastic


def test_steps_follow_the_butcher_tableau():
    denoise = ACCURACY_MIXTURE.denoise
    x = ACCURACY_MIXTURE.prior(16, 3.0, torch.Generator().manual_seed(0))
    sigmas = torch.tensor([3.0, 1.2, 0.4, 0.0], dtype=torch.float64)
    expected = x
    for sigma, sigma_next in zip(sigmas[:-2], sigmas[1:-1]):
        expected = explicit_runge_kutta_step(lambda x, s: (x - denoise(x, s)) / s, expected, sigma, sigma_next)
    expected = denoise(expected, sigmas[-2])  # the final Euler step to sigma = 0
    steps = []
    out = RK4Scheduler()(denoise, x.clone(), sigmas, callback=lambda info: steps.append(info["i"]))
    assert (out - expected).abs().max().item() < 1e-12
    assert steps == [0, 1, 2]


def test_fourth_order_convergence_on_the_probability_flow_ode(reference):
    x, exact = reference
    steps = (10, 20, 40, 80)
    errors = [(RK4Scheduler()(ACCURACY_MIXTURE.denoise, x.clone(), grid(n)) - exact).norm(dim=-1).max().item()
              for n in steps]
    assert abs(empirical_order(steps, errors) - 4) <= 0.3, errors


def test_more_accurate_than_heun_for_the_same_denoiser_calls(reference):
    x, exact = reference
    heun = registry.build("scheduler", "heun")
    # 20 RK4 steps and 40 Heun steps both call the denoiser 4 times per RK4 step.
    rk4_error = (RK4Scheduler()(ACCURACY_MIXTURE.denoise, x.clone(), grid(20)) - exact).norm(dim=-1).max().item()
    heun_error = (heun(ACCURACY_MIXTURE.denoise, x.clone(), grid(40)) - exact).norm(dim=-1).max().item()
    assert rk4_error < heun_error / 10, (rk4_error, heun_error)
