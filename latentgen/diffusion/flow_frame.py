"""Deterministic samplers on a rectified-flow model, integrated in the flow's own coordinates.

Samplers see the variance-exploding form x = x0 + sigma * noise, where the probability-flow ODE is
dx/dsigma = (x - D(x, sigma)) / sigma. A flow model's pure-noise end is t = 1, sigma = t / (1 - t) = infinity
(latentgen clips it at 9999), and a step from there spans a sigma ratio of about a thousand: a second-order
or multistep sampler (heun, lms, plms) multiplies the change of D over that step by about half that ratio,
and its samples are noise. In the coordinates x_f = x / (1 + sigma), t = sigma / (1 + sigma) the same ODE
reads dx_f/dt = (x_f - D) / t (substitute and differentiate), so a sampler written for the first form solves
the second unchanged, over t in [0, 1). Euler and DDIM take the same steps in both; the others now take
bounded ones. Stochastic and consistency samplers add noise in the variance-exploding form, so they keep it.
"""

from __future__ import annotations

import torch

from latentgen.contracts.scheduler import Callback, DenoiseFn, Scheduler

FRAMES = ("ve", "flow")


def uses_flow_frame(scheduler: object, frame: str) -> bool:
    """Whether `scheduler` integrates in flow coordinates under a process whose `sampling_frame` is `frame`:
    a Scheduler that declares itself deterministic and not a consistency sampler, under "flow"."""
    if frame not in FRAMES:
        raise ValueError(f"unknown sampling frame {frame!r}; a process's sampling_frame is one of {', '.join(FRAMES)}")
    return (frame == "flow" and isinstance(scheduler, Scheduler) and not scheduler.stochastic
            and not scheduler.consistency)


def flow_time(sigma):
    """t = sigma / (1 + sigma), for a tensor or a float."""
    return sigma / (1 + sigma)


def flow_sigma(t):
    """sigma = t / (1 - t), the inverse of flow_time, of the type given."""
    return t / (1 - t)


class FlowFrameDenoiser:
    """denoise(x_f, t) for a denoise(x, sigma) of the variance-exploding form; x0 estimates are the same."""

    def __init__(self, denoise: DenoiseFn):
        self.denoise = denoise

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        sigma = flow_sigma(t)  # of the type the scheduler passed (a 0-d tensor of the grid, or a float)
        return self.denoise(x * (1 + sigma), sigma)


def integrate_in_flow_frame(scheduler: Scheduler, denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                            generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """scheduler(denoise, x, sigmas) solved in flow coordinates; the result (at sigma = t = 0) is the same
    variable. The callback still sees x and sigma of the variance-exploding form."""
    reported = None
    if callback is not None:
        def reported(state: dict) -> None:
            sigma = flow_sigma(state["sigma"])
            callback({**state, "x": state["x"] * (1 + sigma), "sigma": sigma})
    return scheduler(FlowFrameDenoiser(denoise), x / (1 + sigmas[0]), flow_time(sigmas), generator=generator,
                     callback=reported)
