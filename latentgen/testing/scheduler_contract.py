"""The contract every scheduler must honour, as a function a plugin author calls in a test."""

from __future__ import annotations

from typing import Callable

import torch

from latentgen.contracts import Scheduler
from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule
from latentgen.testing.analytic import GaussianMixture
from latentgen.testing.shared_rules import Subject, check_rebuilds, close, describe_difference

# A bfloat16 run follows the float32 one within this, relative to the sample's largest magnitude.
BFLOAT16_RELATIVE_ERROR = 0.1


def check_scheduler(scheduler: Scheduler | Callable[[], Scheduler]) -> list[str]:
    """Raise AssertionError, naming the scheduler and the broken rule, unless it:

    declares `stochastic` (bool) and `order` (positive int); keeps the shape and dtype of x (float32,
    float64, and bfloat16 close to float32); is reproducible with a seeded generator whatever the global
    RNG; gives finite output on a 1-step and a short grid (including the first grid step from a large
    sigma); calls the callback once per step with x, i, sigma and denoised; refuses a grid that does not
    descend to 0; if deterministic, does not touch the generator; and, if built by the registry, rebuilds
    to identical samples through the registry and its Hydra option. (A scheduler holds no weights, so it
    has no state dict to round-trip; its configuration is its build parameters.)

    `scheduler` is an instance (copied, never changed) or a factory of fresh instances. Returns the rules
    checked.
    """
    subject = Subject("scheduler", scheduler)
    sampler = subject.first
    checked: list[str] = []
    data = GaussianMixture([[-1.0, 0.5], [1.0, -0.5]], [0.3, 0.5])
    schedule = DiscreteNoiseSchedule.from_betas("scaled_linear")

    def denoise(x, sigma):  # x (B, 2, 3, 3): the mixture lives in the channel dim
        flat = x.movedim(1, -1)
        return data.denoise(flat, sigma).movedim(-1, 1)

    rule = "declared capabilities"
    subject.require(isinstance(sampler.stochastic, bool), rule, f"`stochastic` must be a bool; got {sampler.stochastic!r}")
    subject.require(isinstance(sampler.order, int) and not isinstance(sampler.order, bool) and sampler.order > 0, rule,
                    f"`order` must be a positive int; got {sampler.order!r}")
    checked.append(rule)

    for steps in (1, 2, 7):
        sigmas = schedule.sigma_grid(steps)
        results = {}
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            rule = f"shapes and dtype {str(dtype).replace('torch.', '')}"
            x = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(1)).to(dtype) * float(sigmas[0])
            calls: list[dict] = []
            torch.manual_seed(1)
            out = subject.run(rule, lambda: subject.make()(denoise, x.clone(), sigmas,
                                                            generator=torch.Generator().manual_seed(0),
                                                            callback=calls.append))
            subject.require(out.shape == x.shape and out.dtype == dtype, rule,
                            f"changed shape/dtype {tuple(x.shape)}/{dtype} -> {tuple(out.shape)}/{out.dtype}")
            subject.require(bool(torch.isfinite(out).all()), rule, f"non-finite values with {steps} step(s)")
            checked.append(rule)
            rule = "callback"
            subject.require([c.get("i") for c in calls] == list(range(steps)), rule,
                            f"called the callback with i={[c.get('i') for c in calls]} for {steps} steps")
            subject.require(all({"x", "i", "sigma", "denoised"} <= set(c) for c in calls), rule,
                            "callback dicts lack some of x, i, sigma, denoised")
            checked.append(rule)
            rule = "determinism"
            torch.manual_seed(2)
            again = subject.make()(denoise, x.clone(), sigmas, generator=torch.Generator().manual_seed(0))
            subject.require(torch.equal(out, again), rule,
                            "not reproducible with a seeded generator (does it draw from the global RNG?)")
            checked.append(rule)
            results[dtype] = out
        rule = "dtype bfloat16"
        low, high = results[torch.bfloat16], results[torch.float32]
        subject.require(close(low, high, BFLOAT16_RELATIVE_ERROR), rule,
                        lambda: f"bfloat16 sample far from float32 with {steps} step(s): {describe_difference(low, high)}")
        checked.append(rule)

    sigmas = schedule.sigma_grid(4)
    x = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(2)) * float(sigmas[0])
    if not sampler.stochastic:
        rule = "deterministic when it declares stochastic=False"
        first = subject.make()(denoise, x.clone(), sigmas, generator=torch.Generator().manual_seed(0))
        second = subject.make()(denoise, x.clone(), sigmas, generator=torch.Generator().manual_seed(99))
        subject.require(torch.equal(first, second), rule, "depends on the generator")
        checked.append(rule)

    rule = "bad sigma grids are refused"
    for bad in (torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0, 0.0])):
        try:
            subject.make()(denoise, x, bad)
        except ValueError:
            continue
        subject.fail(rule, f"accepted the invalid sigma grid {bad.tolist()}")
    checked.append(rule)

    def outputs(scheduler: Scheduler) -> torch.Tensor:
        return scheduler(denoise, x.clone(), sigmas, generator=torch.Generator().manual_seed(0))

    check_rebuilds(subject, sampler, outputs, checked,
                   declared=lambda scheduler: (type(scheduler), scheduler.stochastic, scheduler.order))
    return list(dict.fromkeys(checked))
