"""The eps/v/x0 wrapper against the closed-form ideal denoiser of Gaussian data."""

import pytest
import torch

from latentgen.config import group_options
from latentgen.contracts import Denoiser
from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule
from latentgen.diffusion.prediction import DiscreteTimeDenoiser

MEAN, STD = 0.3, 0.7  # data x0 ~ N(MEAN, STD^2) per element


def ideal_x0(x, sigma):
    """E[x0 | x0 + sigma * n = x] for Gaussian data."""
    return MEAN + STD**2 / (STD**2 + sigma**2) * (x - MEAN)


class IdealNetwork(Denoiser):
    """Outputs exactly what a perfectly trained eps / v / x0 network would, from its VP input."""

    def __init__(self, schedule, prediction_type):
        super().__init__()
        self.in_channels = self.out_channels = 1
        self.schedule, self.prediction_type = schedule, prediction_type

    def forward(self, x_vp, t, cond):
        sigma = self.schedule.t_to_sigma(t.double()).view(-1, 1, 1, 1)
        alpha, sigma_vp = (1 + sigma**2).rsqrt(), sigma * (1 + sigma**2).rsqrt()
        x = x_vp.double() / alpha  # back to x = x0 + sigma * n
        x0 = ideal_x0(x, sigma)
        eps = (x - x0) / sigma
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma_vp * x0}[self.prediction_type].float()


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_wrapper_recovers_the_ideal_denoiser(prediction_type):
    schedule = DiscreteNoiseSchedule.from_betas("scaled_linear")
    model = DiscreteTimeDenoiser(IdealNetwork(schedule, prediction_type), schedule, prediction_type)
    for sigma in (0.05, 1.0, 14.0):
        x = torch.randn(4, 1, 3, 3, dtype=torch.float64) * (STD**2 + sigma**2) ** 0.5 + MEAN
        got = model(x.float(), torch.tensor(sigma), {}).double()
        torch.testing.assert_close(got, ideal_x0(x, sigma), rtol=1e-4, atol=1e-4 * max(1, sigma))


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_training_target_inverts_the_preconditioning(prediction_type):
    schedule = DiscreteNoiseSchedule.from_betas("linear", 1000, 1e-4, 0.02)
    model = DiscreteTimeDenoiser(IdealNetwork(schedule, prediction_type), schedule, prediction_type)
    x0, noise = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    sigma = schedule.sigmas[torch.tensor([5, 300, 990])]
    x = x0 + noise * sigma.view(-1, 1, 1, 1).float()
    target = model.training_target(x0, x, sigma)
    c_skip, c_out, _, _ = model._coefficients(x, sigma)
    torch.testing.assert_close(c_skip.float() * x + c_out.float() * target, x0, rtol=1e-4, atol=1e-4)
    if prediction_type == "eps":
        torch.testing.assert_close(target, noise, rtol=1e-3, atol=1e-3)


def test_unknown_prediction_type_is_refused():
    schedule = DiscreteNoiseSchedule.from_betas()
    with pytest.raises(ValueError, match="prediction_type"):
        DiscreteTimeDenoiser(IdealNetwork(schedule, "eps"), schedule, "score")


@pytest.mark.parametrize("option", group_options("scheduler"))
def test_every_sampler_gives_the_same_result_for_eps_v_and_x0_networks(option):
    """The wrapper makes the three parameterizations the same denoiser, so a sampler cannot tell them apart."""
    from latentgen.config import compose
    from latentgen.pipeline import build_component

    schedule = DiscreteNoiseSchedule.from_betas("scaled_linear")
    sigmas = schedule.sigma_grid(8)
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0)) * sigmas[0].float()
    results = []
    for prediction_type in ("eps", "v", "x0"):
        model = DiscreteTimeDenoiser(IdealNetwork(schedule, prediction_type), schedule, prediction_type)
        sampler = build_component("scheduler", compose("train", ["experiment=smoke", f"scheduler={option}"]).scheduler)
        results.append(sampler(lambda x, s: model(x, s, {}), x.clone(), sigmas, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(results[1], results[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(results[2], results[0], rtol=1e-3, atol=1e-3)
