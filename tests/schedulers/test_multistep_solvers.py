"""LMS, PLMS and UniPC: their coefficients, exact Gaussian endpoints and orders, UniPC-1 as DDIM, options,
and model evaluations per call."""

import math

import numpy as np
import pytest
import torch

from latentgen import registry
from latentgen.diffusion.sigma_grids import karras
from latentgen.schedulers.lms import adams_bashforth_coefficients
from latentgen.schedulers.plms import ADAMS_BASHFORTH
from latentgen.schedulers.unipc import phi_weights, unipc_coefficients
from latentgen.testing import GaussianMixture, empirical_order

GAUSSIAN = GaussianMixture.gaussian(mean=0.5, std=0.8)  # closed-form ODE solution
MIXTURE = GaussianMixture([[-1.0, 0.5], [1.2, -0.4], [0.2, 1.5]], [0.35, 0.5, 0.25], [0.3, 0.5, 0.2])
SIGMA_MIN, SIGMA_MAX = 0.02, 10.0

# (name, options, declared order)
OPTIONS = [
    ("lms", {}, 4),
    ("lms", {"order": 3}, 3),
    ("lms", {"order": 2}, 2),
    ("plms", {}, 2),
    ("unipc", {"order": 1}, 2),
    ("unipc", {}, 3),
    ("unipc", {"variant": "bh1"}, 3),
    ("unipc", {"order": 3}, 4),
    ("unipc", {"order": 2, "use_corrector": False}, 2),
    ("unipc", {"order": 3, "use_corrector": False}, 3),
]


def build(name, **options):
    return registry.build("scheduler", name, **options)


def start(data, n, sigma, seed=0):
    return data.prior(n, sigma, torch.Generator().manual_seed(seed))


def gaussian_target(x):
    """The exact ODE solution at SIGMA_MIN, denoised there (what every sampler's last step returns)."""
    return GAUSSIAN.denoise(GAUSSIAN.ode_solution(x, SIGMA_MAX, SIGMA_MIN), SIGMA_MIN)


# ---- coefficients ------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_lms_coefficients_for_equal_steps_are_adams_bashforth(k):
    step = -0.3
    nodes = [2.0 - step * j for j in range(k)]  # sigma_i, sigma_{i-1}, ... spaced like the step
    weights = adams_bashforth_coefficients(nodes, 2.0, 2.0 + step)
    np.testing.assert_allclose(weights, np.array(ADAMS_BASHFORTH[k - 1]) * step, rtol=1e-13, atol=1e-15)


def test_classical_table():
    assert ADAMS_BASHFORTH == ((1,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def test_lms_coefficients_integrate_polynomials_exactly_on_uneven_nodes():
    nodes, start_, end = [1.0, 1.7, 3.1, 6.0], 1.0, 0.45
    weights = adams_bashforth_coefficients(nodes, start_, end)
    for degree in range(4):
        exact = (end ** (degree + 1) - start_ ** (degree + 1)) / (degree + 1)
        assert math.isclose(sum(w * n**degree for w, n in zip(weights, nodes)), exact, rel_tol=1e-12)
    cubic_miss = sum(w * n**4 for w, n in zip(weights, nodes)) - (end**5 - start_**5) / 5
    assert abs(cubic_miss) > 1e-3  # degree 4 is not integrated exactly: the weights are not trivially right


@pytest.mark.parametrize("h", [0.05, 0.7, 1.0, 1.3, 4.0])
def test_phi_weights_are_the_integrals(h):
    """psi_k(h) = h * int_0^1 exp(-(1 - t) h) t^k dt, series and recursion branches alike."""
    t = np.linspace(0.0, 1.0, 200_001)
    for k, value in enumerate(phi_weights(h, 4)):
        integrand = h * np.exp(-(1 - t) * h) * t**k
        quadrature = float(np.sum((integrand[1:] + integrand[:-1]) / 2) * (t[1] - t[0]))
        assert math.isclose(value, quadrature, rel_tol=1e-8), (k, value, quadrature)


def test_unipc_coefficients_match_taylor_terms():
    h, ratios = 0.4, [-0.8, -1.9, 1.0]
    psi = phi_weights(h, 4)
    c = unipc_coefficients(h, ratios, "bh2")
    for k in range(1, 4):
        assert math.isclose(sum(cm * r ** (k - 1) for cm, r in zip(c, ratios)), psi[k], rel_tol=1e-12)
    # one difference: a = 1/2 times B(h), the only place where the variant matters
    assert unipc_coefficients(h, [-1.0], "bh1") == [h / 2]
    assert math.isclose(unipc_coefficients(h, [-1.0], "bh2")[0], (1 - math.exp(-h)) / 2, rel_tol=1e-15)
    assert unipc_coefficients(h, ratios, "bh1") == c


# ---- accuracy on single-Gaussian data ----------------------------------------------------------

# max error over 256 paths from sigma = 10 with 50 Karras steps (measured; DDIM: 6.3e-2)
FIFTY_STEP_ERRORS = {("lms", ()): 3.7e-4, ("plms", ()): 1.2e-3, ("unipc", ()): 5.7e-4,
                     ("unipc", (("variant", "bh1"),)): 9.4e-4, ("unipc", (("order", 3),)): 8.1e-5,
                     ("unipc", (("order", 1),)): 6.8e-3}


@pytest.mark.parametrize("name, options", [(n, dict(o)) for n, o in FIFTY_STEP_ERRORS])
def test_fifty_steps_reach_the_exact_gaussian_endpoint(name, options):
    x = start(GAUSSIAN, 256, SIGMA_MAX)
    exact = gaussian_target(x)
    grid = karras(50, SIGMA_MIN, SIGMA_MAX)
    error = (build(name, **options)(GAUSSIAN.denoise, x.clone(), grid) - exact).abs().max().item()
    first_order = (build("ddim")(GAUSSIAN.denoise, x.clone(), grid) - exact).abs().max().item()
    assert error < 1.5 * FIFTY_STEP_ERRORS[(name, tuple(options.items()))], error
    assert error < first_order / 9, (error, first_order)


@pytest.mark.parametrize("name, options, order", OPTIONS)
def test_declared_order_on_gaussian_data(name, options, order):
    """Halving the step divides the error by 2^order (Karras grid, 16-128 steps, exact reference)."""
    sampler = build(name, **options)
    assert not sampler.stochastic and sampler.order == order
    x = start(GAUSSIAN, 128, SIGMA_MAX)
    exact = gaussian_target(x)
    steps = (16, 32, 64, 128)
    errors = [(sampler(GAUSSIAN.denoise, x.clone(), karras(n, SIGMA_MIN, SIGMA_MAX)) - exact).abs().max().item()
              for n in steps]
    assert abs(empirical_order(steps, errors) - order) < 0.3, errors


def test_lms_runge_kutta_start_keeps_fourth_order_where_euler_start_caps_it():
    """Started at sigma = 1, where the flow is curved, an Euler first step caps 4-step LMS at order 2."""
    x = start(GAUSSIAN, 128, 1.0)
    exact = GAUSSIAN.denoise(GAUSSIAN.ode_solution(x, 1.0, SIGMA_MIN), SIGMA_MIN)
    steps = (16, 32, 64, 128)

    def order(sampler):
        errors = [(sampler(GAUSSIAN.denoise, x.clone(), karras(n, SIGMA_MIN, 1.0)) - exact).abs().max().item()
                  for n in steps]
        return empirical_order(steps, errors)

    assert order(build("lms")) > 3.4  # measured 3.6
    assert order(build("lms", rk_start=False)) < 2.4  # measured 2.2


def test_plms_is_second_order_on_karras_grids_whatever_its_four_steps():
    x = start(GAUSSIAN, 128, SIGMA_MAX)
    exact = gaussian_target(x)
    steps = (64, 128, 256, 512)
    errors = [(build("plms")(GAUSSIAN.denoise, x.clone(), karras(n, SIGMA_MIN, SIGMA_MAX)) - exact).abs().max().item()
              for n in steps]
    assert abs(empirical_order(steps, errors) - 2) < 0.15, errors


# ---- identities --------------------------------------------------------------------------------

def test_unipc_order_1_without_corrector_is_ddim():
    """A first-order exponential step in data prediction is exactly Euler's step in sigma here."""
    x = start(MIXTURE, 64, 20.0)
    grid = karras(15, 0.01, 20.0)
    unip = build("unipc", order=1, use_corrector=False)(MIXTURE.denoise, x.clone(), grid)
    ddim = build("ddim", eta=0.0)(MIXTURE.denoise, x.clone(), grid)
    torch.testing.assert_close(unip, ddim, rtol=1e-12, atol=1e-12)
    corrected = build("unipc", order=1)(MIXTURE.denoise, x.clone(), grid)
    assert (corrected - ddim).abs().max() > 1e-3  # the corrector does act


def test_lms_order_1_is_ddim():
    x = start(MIXTURE, 64, 20.0)
    grid = karras(15, 0.01, 20.0)
    torch.testing.assert_close(build("lms", order=1)(MIXTURE.denoise, x.clone(), grid),
                               build("ddim")(MIXTURE.denoise, x.clone(), grid), rtol=1e-12, atol=1e-12)


def test_step_to_zero_returns_the_denoiser_output():
    x = start(MIXTURE, 8, 20.0)
    grid = torch.tensor([20.0, 0.0], dtype=torch.float64)
    for name, options, _ in OPTIONS:
        out = build(name, **options)(MIXTURE.denoise, x.clone(), grid)
        torch.testing.assert_close(out, MIXTURE.denoise(x, grid[0]), rtol=0, atol=0)


def test_float32_stays_float32_and_close_to_float64():
    x = start(MIXTURE, 16, 20.0)
    grid = karras(20, 0.01, 20.0)
    for name, options, _ in OPTIONS:
        sampler = build(name, **options)
        out32 = sampler(MIXTURE.denoise, x.float(), grid)
        assert out32.dtype == torch.float32
        assert (out32.double() - sampler(MIXTURE.denoise, x.clone(), grid)).abs().max() < 1e-4, name


# ---- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options, words", [
    ("lms", {"order": 5}, ["'lms'", "order", "(1, 2, 3, 4)", "5"]),
    ("lms", {"order": 0}, ["'lms'", "order"]),
    ("lms", {"order": True}, ["'lms'", "order"]),
    ("lms", {"rk_start": "yes"}, ["'lms'", "rk_start"]),
    ("unipc", {"order": 4}, ["'unipc'", "order", "(1, 2, 3)", "4"]),
    ("unipc", {"variant": "bh3"}, ["'unipc'", "variant", "bh1", "bh2", "bh3"]),
    ("unipc", {"use_corrector": 1}, ["'unipc'", "use_corrector"]),
])
def test_invalid_options_are_refused_by_name(name, options, words):
    with pytest.raises(ValueError) as info:
        build(name, **options)
    assert all(word in str(info.value) for word in words), str(info.value)


# ---- model evaluations -------------------------------------------------------------------------

def evaluations(sampler, steps):
    calls, reports = [], []

    def denoise(x, sigma):
        calls.append(float(sigma))
        return MIXTURE.denoise(x, sigma)

    sampler(denoise, start(MIXTURE, 4, 20.0), karras(steps, 0.01, 20.0), callback=reports.append)
    assert [r["i"] for r in reports] == list(range(steps))
    return len(calls)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("corrector", [True, False])
def test_unipc_evaluates_the_model_once_per_step(order, corrector):
    assert evaluations(build("unipc", order=order, use_corrector=corrector), 12) == 12


def test_plms_evaluates_twice_on_its_first_step_only():
    assert evaluations(build("plms"), 12) == 13
    assert evaluations(build("plms"), 1) == 1  # a single step is the step to 0


@pytest.mark.parametrize("order, extra", [(1, 0), (2, 0), (3, 1), (4, 4)])
def test_lms_evaluations(order, extra):
    assert evaluations(build("lms", order=order), 12) == 12 + extra
    assert evaluations(build("lms", order=order, rk_start=False), 12) == 12
