"""Scheduler (sampler) contract, k-diffusion style: integrate the reverse process in sigma space."""

from __future__ import annotations

import abc
import functools
from typing import Callable

import torch

# denoise(x, sigma) -> x0_hat, for x = x0 + sigma * noise (the variance-exploding form).
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback({"x": ..., "i": ..., "sigma": ..., "denoised": ...}) after each step.
Callback = Callable[[dict], None]


class Scheduler(abc.ABC):
    """A sampling algorithm over a descending sigma grid ending in 0.

    `scheduler(denoise, x, sigmas, *, generator=None, callback=None)` is the contract. A subclass
    implements either `sample(denoise, x, sigmas, generator, callback)`, which the base class's
    `__call__` calls after checking the grid, or `__call__` itself (k-diffusion's style); both are
    public API. `x` starts as noise * sigmas[0] (or a partly noised image for img2img, which is just
    a shorter grid). Declared, for users and for the accuracy tests: `stochastic` (whether it
    injects fresh noise), `order` (its convergence order as an ODE solver; stochastic samplers
    converge weakly and declare the order of their deterministic skeleton) and `consistency` (it needs
    a consistency-distilled model, as LCM does).
    """

    stochastic: bool = False
    order: int = 1
    # True for a sampler meant for consistency-distilled models (LCM): denoise must then be a consistency
    # function (any point of an ODE trajectory -> its end), which an ordinary denoiser is not.
    consistency: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own_call = cls.__dict__.get("__call__")
        if own_call is not None and not getattr(own_call, "_checks_sigmas", False):
            # A scheduler written in k-diffusion's style gets the grid check the base class's __call__ does.
            @functools.wraps(own_call)
            def checked(self, denoise, x, sigmas, *args, **kwargs):
                self.check_sigmas(sigmas)
                return own_call(self, denoise, x, sigmas, *args, **kwargs)

            checked._checks_sigmas = True
            cls.__call__ = checked

    def __new__(cls, *args, **kwargs):
        if cls.sample is Scheduler.sample and cls.__call__ is Scheduler.__call__:
            raise TypeError(f"scheduler class {cls.__module__}.{cls.__qualname__} implements neither "
                            f"sample(denoise, x, sigmas, generator, callback) nor __call__(denoise, x, sigmas, *, "
                            f"generator=None, callback=None); implement one of them")
        return super().__new__(cls)

    def sample(
        self,
        denoise: DenoiseFn,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        generator: torch.Generator | None,
        callback: Callback | None,
    ) -> torch.Tensor:
        """Integrate from sigmas[0] to sigmas[-1] == 0 and return the final sample (the hook `__call__`
        calls; a scheduler that implements `__call__` itself need not implement it)."""
        raise NotImplementedError(f"scheduler '{self.name}' implements __call__, not sample; call it as "
                                  f"scheduler(denoise, x, sigmas, generator=..., callback=...)")

    @property
    def name(self) -> str:
        return getattr(self, "registry_name", type(self).__name__)

    def __call__(
        self,
        denoise: DenoiseFn,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        self.check_sigmas(sigmas)
        return self.sample(denoise, x, sigmas, generator, callback)

    def check_sigmas(self, sigmas: torch.Tensor) -> None:
        """Refuse a grid that is too short, does not descend, or does not end in 0."""
        if sigmas.ndim != 1 or sigmas.numel() < 2:
            raise ValueError(
                f"scheduler '{self.name}' needs a 1-D sigma grid of at least 2 values (1 step); "
                f"got shape {tuple(sigmas.shape)}"
            )
        if not bool(torch.all(sigmas[:-1] > sigmas[1:])):
            raise ValueError(f"scheduler '{self.name}' needs a strictly descending sigma grid; got {sigmas.tolist()}")
        if float(sigmas[-1]) != 0.0:
            raise ValueError(f"scheduler '{self.name}' needs a sigma grid ending in 0; it ends in {float(sigmas[-1])}")

    @staticmethod
    def report(callback: Callback | None, i: int, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
        """Call the per-step callback, if any, with the step's state."""
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})

    @staticmethod
    def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal noise shaped like x, drawn on the generator's device for reproducibility."""
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)
