"""Diffusion processes as a kind: each process's equations (targets, network inputs, training distributions,
grids) against their definitions, and every scheduler on every process against the exact probability-flow ODE
of a Gaussian mixture (tests/schedulers/test_sampler_accuracy.py's problem), through the process's own
preconditioning: a network that is exact in the process's parameterisation gives every sampler the exact
denoiser, so each converges at its declared order whatever the process."""

from __future__ import annotations

import math

import pytest
import torch

from latentgen import LatentDiffusionPipeline, registry
from latentgen.config import compose, group_options
from latentgen.diffusion.prediction import ProcessDenoiser
from latentgen.diffusion.sigma_grids import karras
from latentgen.pipeline import build_component
from latentgen.processes.rectified_flow import RectifiedFlowProcess
from latentgen.testing import empirical_order
from latentgen.testing.analytic import ACCURACY_MIXTURE as MIXTURE
from latentgen.testing.analytic import ACCURACY_SIGMA_MAX as SIGMA_MAX
from latentgen.testing.analytic import ACCURACY_SIGMA_MIN as SIGMA_MIN
from latentgen.testing.analytic import accuracy_reference

# DDPM's linear betas from 5e-5 to 0.02 span sigma 0.007..157, beyond the problem's [0.01, 20]: a discrete
# network knows only its timesteps' noise levels (SD's scaled_linear schedule ends at sigma 14.6).
LINEAR = {"noise_schedule": "linear", "beta_start": 5e-5, "beta_end": 0.02}
PROCESSES = {"discrete-eps": ("discrete", LINEAR), "discrete-v": ("discrete", {**LINEAR, "prediction_type": "v"}),
             "edm": ("edm", {}), "rectified_flow": ("rectified_flow", {"shift": 3.0})}
STEPS = (40, 80, 160, 320)


def process(name):
    kind, options = PROCESSES[name]
    return registry.build("process", kind, **options)


def sigma_of_time(proc, t: torch.Tensor) -> torch.Tensor:
    """Invert the process's network_time (what an exact network has to do to know its noise level)."""
    if proc.name == "discrete":
        return proc.schedule.t_to_sigma(t)
    if proc.name == "edm":
        return (4 * t / proc.time_scale).exp()
    u = t / proc.timestep_scale
    return u / (1 - u)


def exact_denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The mixture's exact denoiser row by row (each row its own sigma)."""
    sigma = sigma.reshape(-1).expand(x.shape[0])
    if bool((sigma == sigma[0]).all()):
        return MIXTURE.denoise(x, sigma[0])
    return torch.stack([MIXTURE.denoise(row[None], level)[0] for row, level in zip(x, sigma)])


class ExactNetwork(torch.nn.Module):
    """F for the mixture, exact in `proc`'s parameterisation: F = (D*(x, sigma) - c_skip x) / c_out."""

    def __init__(self, proc):
        super().__init__()
        self.proc = proc
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))  # dtype for ProcessDenoiser

    def forward(self, scaled, t, cond):
        sigma = sigma_of_time(self.proc, t.double())
        c_skip, c_out, c_in = (c.view(-1, 1) for c in self.proc.scalings(sigma))
        x = scaled / c_in
        return (exact_denoise(x, sigma) - c_skip * x) / c_out


@pytest.mark.parametrize("name", PROCESSES)
def test_targets_inputs_and_the_denoiser_round_trip(name):
    proc = process(name)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 2, dtype=torch.float64, generator=generator), torch.randn(6, 2, dtype=torch.float64)
    sigma = proc.sample_training_sigmas(6, generator)
    x = x0 + sigma.view(-1, 1) * noise
    model = ProcessDenoiser(ExactNetwork(proc), proc)
    target = model.training_target(x0, x, sigma)
    c_skip, c_out, c_in = (c.view(-1, 1) for c in proc.scalings(sigma))
    assert torch.allclose(c_skip * x + c_out * target, x0, atol=1e-9)
    if name == "discrete-eps":
        assert torch.allclose(target, noise, atol=1e-9)
    if name == "rectified_flow":  # velocity, on the straight line x_t = (1 - t) x0 + t noise
        t = (sigma / (1 + sigma)).view(-1, 1)
        assert torch.allclose(target, noise - x0, atol=1e-9)
        assert torch.allclose(c_in * x, (1 - t) * x0 + t * noise, atol=1e-9)
        assert torch.allclose(proc.network_time(sigma), 1000 * t.view(-1), atol=1e-9)
    if name == "edm":  # unit-variance network input for unit-variance data... and EDM's own coefficients
        sd = proc.sigma_data
        assert torch.allclose(c_out.view(-1), sigma * sd / (sigma ** 2 + sd ** 2).sqrt())
        assert torch.allclose(proc.network_time(sigma), 250 * sigma.log())
    # the wrapped exact network gives the exact denoiser back
    with torch.no_grad():
        assert torch.allclose(model(x, sigma, {}), exact_denoise(x, sigma), atol=1e-9)


def test_training_distributions():
    generator = torch.Generator().manual_seed(0)
    edm = process("edm").sample_training_sigmas(200_000, generator).log()
    assert abs(float(edm.mean()) + 1.2) < 0.01 and abs(float(edm.std()) - 1.2) < 0.01  # ln sigma ~ N(-1.2, 1.2^2)
    for shift in (1.0, 3.0):
        sigma = RectifiedFlowProcess(shift=shift).sample_training_sigmas(200_000, generator)
        t = sigma / (1 + sigma)
        median = shift * 0.5 / (1 + (shift - 1) * 0.5)  # the logit-normal's median, shifted
        assert abs(float(t.median()) - median) < 0.005
    assert float(registry.build("process", "discrete").sample_training_sigmas(10_000, generator).max()) <= 14.62


def test_flow_grid_is_shifted_linear_in_t_and_grows_with_the_resolution():
    proc = RectifiedFlowProcess(shift=3.0, shift_base_tokens=64 * 64)
    grid = proc.sigma_grid(4)
    t = grid[:-1] / (1 + grid[:-1])
    plain = torch.linspace(1.0, 1e-3, 4, dtype=torch.float64)
    assert torch.allclose(t, (3 * plain / (1 + 2 * plain)).clamp(max=1 - 1e-4)) and grid[-1] == 0
    bigger = proc.sigma_grid(4, latent_size=(128, 128))  # 4x the tokens: shift 6 (sqrt 4 = 2)
    t_big = bigger[1:-1] / (1 + bigger[1:-1])
    assert torch.allclose(t_big, 6 * plain[1:] / (1 + 5 * plain[1:]))
    assert bool((grid[:-1] > grid[1:]).all())


def deterministic_options():
    return [option for option in group_options("scheduler") if not _scheduler(option).stochastic]


def _scheduler(option):
    return build_component("scheduler", compose("train", ["experiment=smoke", f"scheduler={option}"]).scheduler)


@pytest.fixture(scope="module")
def reference():
    return accuracy_reference()


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("option", deterministic_options())
def test_every_deterministic_scheduler_keeps_its_order_on_every_process(name, option, reference):
    proc = process(name)
    model = ProcessDenoiser(ExactNetwork(proc), proc)
    sampler = _scheduler(option)
    x, exact = reference
    errors = []
    for steps in STEPS:
        out = sampler(lambda x_, sigma: model(x_, sigma, {}), x.clone(), karras(steps, SIGMA_MIN, SIGMA_MAX))
        errors.append((out - exact).norm(dim=-1).max().item())
    order = empirical_order(STEPS, errors)
    assert abs(order - sampler.order) <= 0.3, f"{option} on {name}: errors {errors}, order {order:.2f}"


@pytest.mark.parametrize("option", ["euler", "heun", "dpmpp_2m"])
def test_on_the_flow_grid_too(option, reference):
    """Steps evenly spaced in t between the same end points (rectified flow's own grid, unshifted)."""
    proc = process("rectified_flow")
    model = ProcessDenoiser(ExactNetwork(proc), proc)
    sampler = _scheduler(option)
    x, exact = reference
    t_max, t_min = SIGMA_MAX / (1 + SIGMA_MAX), SIGMA_MIN / (1 + SIGMA_MIN)
    errors = []
    for steps in STEPS:
        t = torch.linspace(t_max, t_min, steps, dtype=torch.float64)
        grid = torch.cat([t / (1 - t), torch.zeros(1, dtype=torch.float64)])
        out = sampler(lambda x_, sigma: model(x_, sigma, {}), x.clone(), grid)
        errors.append((out - exact).norm(dim=-1).max().item())
    assert abs(empirical_order(STEPS, errors) - sampler.order) <= 0.3, errors


@pytest.mark.parametrize("name", ["edm", "rectified_flow"])
def test_a_pipeline_trains_saves_and_reloads_with_each_process(name, tmp_path):
    from latentgen.training.run import run_training

    run = run_training(compose("train", ["experiment=smoke", f"process={name}", "train.codec.steps=2",
                                         "train.denoiser.steps=3", "train.sample_every=0", "train.tensorboard=false",
                                         "train.grid_size=2", "dataset.size=16", "device=cpu"]), tmp_path / name)
    pipe = LatentDiffusionPipeline.from_checkpoint(run)
    assert pipe.process.name == name and pipe.config["process"]["name"] == name
    assert pipe(["a red circle"], steps=2, seed=0, output_type="tensor").isfinite().all()


def test_a_checkpoint_without_a_process_is_the_discrete_one_of_its_diffusion_settings():
    config = {**compose("train", ["experiment=smoke"])}
    config = {key: value for key, value in config.items() if key != "process"}
    pipe = LatentDiffusionPipeline.from_config({**config, "diffusion": {"prediction_type": "v"}})
    assert pipe.process.name == "discrete" and pipe.process.prediction_type == "v"
    assert pipe.schedule is pipe.process.schedule and math.isclose(pipe.process.sigma_max, 14.6146, rel_tol=1e-4)
