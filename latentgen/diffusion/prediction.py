"""A network trained with a diffusion process (latentgen.contracts.process) as the samplers' denoise(x, sigma).

Karras et al. 2022 (EDM), Eq. 7: D(x, sigma) = c_skip * x + c_out * F(c_in * x, c_noise), the coefficients
and c_noise given by the process (the discrete DDPM family's eps / v / x0 forms: latentgen.diffusion.scalings;
EDM's; rectified flow's). One set of samplers and one trainer then serve every process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch

from latentgen.contracts import Denoiser
from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule

# Their home before processes were a kind; code and plugins import them from here.
from latentgen.diffusion.scalings import (  # noqa: F401
    PREDICTION_TYPES,
    EpsScaling,
    Scaling,
    VScaling,
    X0Scaling,
    scaling_for,
)

if TYPE_CHECKING:
    from latentgen.contracts.process import Process


class ProcessDenoiser:
    """Wraps a `Denoiser` trained with a `Process` (latentgen.contracts.process) into the sigma-space contract.

    `wrapper(x, sigma, cond)` returns x0_hat = c_skip * x + c_out * F(c_in * x, network_time(sigma));
    `training_target(x0, x, sigma)` is what the raw network output must equal for that x0, so training and
    sampling share one set of equations whatever the process.
    """

    def __init__(self, network: Denoiser, process: "Process"):
        self.network = network
        self.process = process

    @property
    def prediction_type(self) -> str:
        return self.process.prediction_type

    @property
    def schedule(self) -> DiscreteNoiseSchedule | None:
        """The discrete schedule of a discrete process (timestep-based samplers read it), else None."""
        return getattr(self.process, "schedule", None)

    @property
    def trained_timesteps(self) -> int | None:
        return getattr(self.process, "trained_timesteps", None)

    def _coefficients(self, x: torch.Tensor, sigma: torch.Tensor):
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma64 = sigma.to(torch.float64)
        c_skip, c_out, c_in = (c.view(-1, *([1] * (x.ndim - 1))) for c in self.process.scalings(sigma64))
        return c_skip, c_out, c_in, self.process.network_time(sigma64)

    def network_output(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        """The raw network output F(c_in * x, t(sigma)) and the coefficients that go with it."""
        c_skip, c_out, c_in, t = self._coefficients(x, sigma)
        dtype = next(self.network.parameters(), x).dtype
        time_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # a float64 network gets exact times
        out = self.network((x * c_in.to(x.dtype)).to(dtype), t.to(time_dtype), cond)
        return out.to(x.dtype), c_skip.to(x.dtype), c_out.to(x.dtype)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out, c_skip, c_out = self.network_output(x, sigma, cond)
        return c_skip * x + c_out * out

    def training_target(self, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """F_target with c_skip * x + c_out * F_target = x0 (eps, v, x0, velocity, ...)."""
        c_skip, c_out, _, _ = self._coefficients(x, sigma)
        return ((x0 - c_skip.to(x.dtype) * x) / c_out.to(x.dtype))

    @property
    def trained_sigma_max(self) -> float:
        """The largest sigma the network was trained on (a refiner's is far below the schedule's)."""
        return self.process.trained_sigma_max

    def sample_training_sigmas(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.process.sample_training_sigmas(batch_size, generator)


class DiscreteTimeDenoiser(ProcessDenoiser):
    """The discrete process's wrapper built from a schedule and a prediction type (what code written before
    processes were a kind constructs)."""

    def __init__(self, network: Denoiser, schedule: DiscreteNoiseSchedule, prediction_type: str = "eps",
                 trained_timesteps: int | None = None):
        from latentgen.processes.discrete import DiscreteProcess

        if trained_timesteps is not None and not 1 <= int(trained_timesteps) <= schedule.num_timesteps:
            raise ValueError(f"trained_timesteps={trained_timesteps}: must be in 1..{schedule.num_timesteps}")
        super().__init__(network, DiscreteProcess.of(schedule, prediction_type, trained_timesteps))
