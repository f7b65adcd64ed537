"""The contract every scheduler must honour, as a function a plugin author calls in a test."""

from __future__ import annotations

from typing import Callable

import torch

from latentgen.contracts import Scheduler
from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule
from latentgen.testing.analytic import GaussianMixture


def check_scheduler(scheduler: Scheduler | Callable[[], Scheduler]) -> None:
    """Raise AssertionError, naming the scheduler and the failed property, unless it:

    keeps the shape and dtype of x (float32 and float64); is deterministic for a seeded generator;
    gives finite output on a 1-step and a short grid (including the first grid step from a large
    sigma); calls the callback once per step with x, i, sigma and denoised; refuses a grid that
    does not descend to 0; and, if deterministic, does not touch the generator.
    """
    make = scheduler if callable(scheduler) and not isinstance(scheduler, Scheduler) else (lambda: scheduler)
    sampler = make()
    assert isinstance(sampler, Scheduler), f"{type(sampler).__name__} is not a latentgen.Scheduler"
    name = sampler.name
    data = GaussianMixture([[-1.0, 0.5], [1.0, -0.5]], [0.3, 0.5])
    schedule = DiscreteNoiseSchedule.from_betas("scaled_linear")

    def denoise(x, sigma):  # x (B, 2, 3, 3): the mixture lives in the channel dim
        flat = x.movedim(1, -1)
        return data.denoise(flat, sigma).movedim(-1, 1)

    for steps in (1, 2, 7):
        sigmas = schedule.sigma_grid(steps)
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(1)).to(dtype) * float(sigmas[0])
            calls: list[dict] = []
            out = make()(denoise, x.clone(), sigmas, generator=torch.Generator().manual_seed(0), callback=calls.append)
            assert out.shape == x.shape and out.dtype == dtype, \
                f"scheduler '{name}' changed shape/dtype {tuple(x.shape)}/{dtype} -> {tuple(out.shape)}/{out.dtype}"
            assert torch.isfinite(out).all(), f"scheduler '{name}' produced non-finite values with {steps} step(s)"
            assert [c.get("i") for c in calls] == list(range(steps)), \
                f"scheduler '{name}' called the callback with i={[c.get('i') for c in calls]} for {steps} steps"
            assert all({"x", "i", "sigma", "denoised"} <= set(c) for c in calls), \
                f"scheduler '{name}' callback dicts lack some of x, i, sigma, denoised"
            again = make()(denoise, x.clone(), sigmas, generator=torch.Generator().manual_seed(0))
            assert torch.equal(out, again), f"scheduler '{name}' is not reproducible with a seeded generator"
    sigmas = schedule.sigma_grid(4)
    x = torch.randn(3, 2, 3, 3) * float(sigmas[0])
    if not sampler.stochastic:
        first = make()(denoise, x.clone(), sigmas, generator=torch.Generator().manual_seed(0))
        second = make()(denoise, x.clone(), sigmas, generator=torch.Generator().manual_seed(99))
        assert torch.equal(first, second), f"scheduler '{name}' declares stochastic=False but depends on the generator"
    for bad in (torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0, 0.0])):
        try:
            make()(denoise, x, bad)
        except ValueError:
            continue
        raise AssertionError(f"scheduler '{name}' accepted the invalid sigma grid {bad.tolist()}")
