"""Deterministic samplers on rectified flow integrate in flow coordinates (latentgen/diffusion/flow_frame.py).

The flow process's own grid starts at sigma 9999 (t = 1 - 1e-4): heun, lms and plms stepped across that in the
variance-exploding form gave noise on a trained demo model. Checked against the exact ODE solution of the
Gaussian mixture of tests/schedulers/test_sampler_accuracy.py, started from that grid's first noise level.
"""

import pytest
import torch

from latentgen import LatentDiffusionPipeline, registry
from latentgen.config import compose, group_options
from latentgen.diffusion.flow_frame import uses_flow_frame
from latentgen.diffusion.sampling import sample
from latentgen.pipeline import build_component
from latentgen.testing import fill_zero_parameters
from latentgen.testing.analytic import ACCURACY_MIXTURE as MIXTURE
from latentgen.training.run import validated_config


def scheduler(option, **params):
    if params:
        return build_component("scheduler", {"name": option, **params})
    return build_component("scheduler", compose("train", ["experiment=smoke", f"scheduler={option}"]).scheduler)


def deterministic_options():
    return [option for option in group_options("scheduler") if uses_flow_frame(scheduler(option), "flow")]


@pytest.fixture(scope="module")
def problem():
    """Noise, the flow process's own grids and the exact solutions from their first noise level."""
    flow = registry.build("process", "rectified_flow")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grids = {steps: flow.sigma_grid(steps) for steps in (25, 50)}
    exact = {steps: MIXTURE.ode_solution(noise * grid[0], float(grid[0]), 0.0) for steps, grid in grids.items()}
    return noise, grids, exact


def error(sampler, problem, steps, frame):
    noise, grids, exact = problem
    return (sample(MIXTURE.denoise, sampler, grids[steps], noise, frame=frame) - exact[steps]).norm(dim=-1).max().item()


@pytest.mark.parametrize("option", deterministic_options())
@pytest.mark.parametrize("steps", [25, 50])
def test_the_flow_frame_costs_a_deterministic_sampler_little(option, steps, problem):
    """Exponential integrators (ddim, dpmpp, unipc) step in log sigma and were fine before; in flow coordinates
    they take other steps of the same ODE (measured: at most 1.27x the error)."""
    sampler = scheduler(option)
    assert error(sampler, problem, steps, "flow") <= 1.4 * error(sampler, problem, steps, "ve")


@pytest.mark.parametrize("option", ["heun", "lms", "plms"])
def test_samplers_stepping_in_sigma_are_accurate_from_the_flow_grids_pure_noise(option, problem):
    """25 steps: Euler's error is 0.19; these three had 0.5-0.9 (worse than Euler) in the variance-exploding
    form and have 0.001-0.011 in flow coordinates."""
    euler = error(scheduler("euler"), problem, 25, "flow")
    assert error(scheduler(option), problem, 25, "flow") < euler / 10


def test_which_schedulers_use_it():
    assert uses_flow_frame(scheduler("heun"), "flow")
    assert not uses_flow_frame(scheduler("heun"), "ve")
    assert not uses_flow_frame(scheduler("euler_ancestral"), "flow")  # adds noise in the x0 + sigma * noise form
    assert not uses_flow_frame(scheduler("dpmpp_3m_sde"), "flow")
    assert uses_flow_frame(scheduler("dpmpp_3m_sde", eta=0.0), "flow")  # eta 0: deterministic
    assert not uses_flow_frame(scheduler("lcm"), "flow")  # re-noises a consistency estimate
    assert not uses_flow_frame(lambda denoise, x, sigmas, **_: x, "flow")  # a bare callable declares nothing
    with pytest.raises(ValueError, match="unknown sampling frame 'vp'.*ve, flow"):
        uses_flow_frame(scheduler("heun"), "vp")


def test_the_callback_sees_the_variance_exploding_form(problem):
    noise, grids, _ = problem
    grid, seen = grids[25], {"ve": [], "flow": []}
    for frame in seen:
        sample(MIXTURE.denoise, scheduler("euler"), grid, noise, frame=frame,
               callback=lambda state, frame=frame: seen[frame].append(state))
    assert len(seen["flow"]) == len(seen["ve"]) == 25
    for ve, flow in zip(seen["ve"], seen["flow"]):
        assert torch.allclose(torch.as_tensor(flow["sigma"], dtype=torch.float64), ve["sigma"], rtol=1e-9)
        assert torch.allclose(flow["x"], ve["x"], rtol=1e-6, atol=1e-6)
        assert torch.allclose(flow["denoised"], ve["denoised"], rtol=1e-6, atol=1e-6)


def test_a_flow_pipeline_samples_with_heun_and_lms_as_with_fine_euler():
    """The pipeline hands the process's frame to the sampling loop: through it, 20 steps of heun or lms land
    within 2e-3 of 400 Euler steps (in the variance-exploding form they were 0.05-0.1 off)."""
    torch.manual_seed(0)
    pipe = LatentDiffusionPipeline.from_config(validated_config(compose("train", ["experiment=smoke",
                                                                                  "process=rectified_flow"])))
    fill_zero_parameters(pipe.denoiser, std=0.02)  # else the zero-initialised output ignores the noise level
    latents = {}
    for name, steps in (("euler", 400), ("heun", 20), ("lms", 20)):
        pipe.scheduler = scheduler(name)
        latents[name] = pipe.sample_latents(["a red circle"], steps=steps, seed=3, guidance_scale=1.0,
                                            height=32, width=32)
    assert (latents["heun"] - latents["euler"]).abs().max() < 2e-3
    assert (latents["lms"] - latents["euler"]).abs().max() < 2e-3
