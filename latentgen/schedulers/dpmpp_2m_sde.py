"""DPM-Solver++(2M) SDE (Lu et al. 2022b, "DPM-Solver++", SDE-DPM-Solver++(2M)): multistep data prediction, noise."""

from __future__ import annotations

import math

from latentgen.contracts import Scheduler

SOLVER_TYPES = ("midpoint", "heun")


def exponential_weights(h: float, eta: float) -> tuple[float, float, float, float]:
    """(decay, w0, w1, w2) of one step of the eta-SDE in lambda = -log sigma, step h > 0, c = 1 + eta.

    For x = x0 + sigma * noise the family of reverse SDEs that keep the marginals, written in lambda,
    is dx = -c (x - D) dlambda + (noise); its exact step is
        x_next = e^-ch x + integral_0^h c e^-c(h - u) D(u) du + sigma_next sqrt(1 - e^-2 eta h) z,
    with e^-ch = (sigma_next / sigma) e^-eta h. The weights are the moments of c e^-c(h - u) on
    [0, h]: w_k = integral u^k c e^-c(h - u) du, so a polynomial model of D integrates exactly:
    w0 = 1 - e^-ch, w1 = h psi1(ch), w2 = h^2 psi2(ch) with psi1(z) = 1 - (1 - e^-z) / z and
    psi2(z) = 1 - 2 psi1(z) / z (integration by parts; Taylor series for small z).
    """
    z = (1 + eta) * h
    if z < 1e-3:
        psi1 = z / 2 - z**2 / 6 + z**3 / 24 - z**4 / 120
        psi2 = z / 3 - z**2 / 12 + z**3 / 60 - z**4 / 360
    else:
        psi1 = 1 + math.expm1(-z) / z
        psi2 = 1 - 2 * psi1 / z
    return math.exp(-z), -math.expm1(-z), h * psi1, h**2 * psi2


def sde_noise_std(sigma_next: float, h: float, eta: float) -> float:
    """Standard deviation of the fresh noise of one eta-SDE step: sigma_next sqrt(1 - e^-2 eta h)."""
    return sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) if eta > 0 else 0.0


def check_sde_options(name: str, eta: float, s_noise: float) -> None:
    if not eta >= 0:
        raise ValueError(f"scheduler '{name}' needs eta >= 0 (0: deterministic ODE solver, 1: the reverse SDE); "
                         f"got {eta}")
    if not s_noise >= 0:
        raise ValueError(f"scheduler '{name}' needs s_noise >= 0 (scale of the added noise, 1 for the exact "
                         f"variance); got {s_noise}")


class DPMPP2MSDEScheduler(Scheduler):
    """Second-order multistep solver of the eta-SDE (`exponential_weights`), one denoiser call per step.

    D is modelled as linear in lambda through this step's and the previous step's estimates,
    D(u) = D + u (D - D_prev) / h_prev. "heun" integrates that line exactly (w1 weight);
    "midpoint" evaluates it at the step's lambda midpoint, (1 - e^-ch) (D + h / 2 (D - D_prev) / h_prev),
    which at eta = 0 is exactly DPM-Solver++(2M). eta = 1 is the reverse SDE (each first-order step is
    then DDPM's posterior draw); eta = 0 is a deterministic second-order ODE solver. The first step and
    the step to sigma = 0 (which returns D) are first order.
    """

    order = 2

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint"):
        check_sde_options("dpmpp_2m_sde", eta, s_noise)
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"scheduler 'dpmpp_2m_sde' solver_type must be one of {SOLVER_TYPES}; got {solver_type!r}")
        self.eta, self.s_noise, self.solver_type = float(eta), float(s_noise), solver_type
        self.stochastic = self.eta > 0

    def sample(self, denoise, x, sigmas, generator, callback):
        previous, h_previous = None, None
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            denoised = denoise(x, sigmas[i])
            self.report(callback, i, x, sigmas[i], denoised)
            if sigma_next == 0:
                x = denoised
                continue
            h = math.log(sigma / sigma_next)
            decay, w0, w1, _ = exponential_weights(h, self.eta)
            x = x * decay + denoised * w0
            if previous is not None:
                slope = (denoised - previous) / h_previous
                x = x + slope * (w0 * h / 2 if self.solver_type == "midpoint" else w1)
            std = sde_noise_std(sigma_next, h, self.eta) * self.s_noise
            if std > 0:
                x = x + self.noise_like(x, generator) * std
            previous, h_previous = denoised, h
        return x
