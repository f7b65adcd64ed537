"""DPM-Solver++(2M) (Lu et al. 2022b, "DPM-Solver++", Alg. 2): multistep, data prediction, in lambda = -log sigma."""

from __future__ import annotations

import math

from latentgen.contracts import Scheduler


class DPMPP2MScheduler(Scheduler):
    """Second-order multistep solver of the probability-flow ODE, one denoiser call per step.

    With lambda = -log sigma and h = lambda_next - lambda, the exact solution in the form
    x = x0 + sigma * noise is x_next = (sigma_next / sigma) x + integral of e^(lambda - lambda_next) D dlambda.
    DPM-Solver++(1) holds D constant: x_next = (sigma_next / sigma) x + (1 - e^-h) D. The 2M update
    replaces D with the linear extrapolation from the previous step's estimate, evaluated at the
    step's midpoint in lambda: D + (D - D_prev) / (2 r), r = h_prev / h (Alg. 2). The first step
    (no history yet) and the step to sigma = 0 (h infinite; it returns D itself) are first order.
    """

    order = 2

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
            estimate = denoised
            if previous is not None:
                r = h_previous / h
                estimate = denoised + (denoised - previous) * (1 / (2 * r))
            x = x * (sigma_next / sigma) - estimate * math.expm1(-h)
            previous, h_previous = denoised, h
        return x
