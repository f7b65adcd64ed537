"""DPM-Solver++(2M) (Lu et al. 2022b, "DPM-Solver++", Alg. 2): multistep, data prediction, in lambda = -log sigma."""

from __future__ import annotations

from latentgen.schedulers.dpmpp_2m_sde import DPMPP2MSDEScheduler


class DPMPP2MScheduler(DPMPP2MSDEScheduler):
    """Second-order multistep solver of the probability-flow ODE, one denoiser call per step.

    With lambda = -log sigma and h = lambda_next - lambda, the exact step in the form
    x = x0 + sigma * noise is x_next = (sigma_next / sigma) x + integral of e^(lambda - lambda_next) D dlambda.
    DPM-Solver++(1) holds D constant; 2M evaluates the line through this and the previous estimate at
    the step's lambda midpoint, D + (D - D_prev) / (2 r), r = h_prev / h. That is the eta-SDE solver
    of `dpmpp_2m_sde` at eta = 0 with its "midpoint" rule, so this class is that solver, fixed there.
    """

    def __init__(self):
        super().__init__(eta=0.0, s_noise=1.0, solver_type="midpoint")
