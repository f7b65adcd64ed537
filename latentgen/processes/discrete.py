"""The DDPM family (Ho et al. 2020) with discrete timesteps: eps-, v- or x0-prediction on a linear,
scaled_linear or cosine beta schedule, optionally rescaled to zero terminal SNR; Stable Diffusion v1/v2 and
SDXL's process, and the one a pipeline without a `process` gets from its `diffusion` settings."""

from __future__ import annotations

from typing import Any

import torch

from latentgen.config.settings import DiffusionSettings
from latentgen.config.typed import as_plain, parse
from latentgen.contracts.process import Process
from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule
from latentgen.diffusion.scalings import scaling_for
from latentgen.diffusion.sigma_grids import sigma_grid


class DiscreteProcess(Process):
    """Discrete timesteps 0..T-1 with sigma_t = sqrt((1 - abar_t) / abar_t); the network sees x / sqrt(1 +
    sigma^2) and its timestep (interpolated between training levels in log sigma). Parameters are those of
    `diffusion` (latentgen.config.settings.DiffusionSettings)."""

    def __init__(self, noise_schedule: str = "scaled_linear", num_timesteps: int = 1000, beta_start: float = 0.00085,
                 beta_end: float = 0.012, prediction_type: str = "eps", zero_terminal_snr: bool = False,
                 trained_timesteps: int | None = None):
        settings: dict[str, Any] = as_plain(parse(DiffusionSettings, dict(
            noise_schedule=noise_schedule, num_timesteps=num_timesteps, beta_start=beta_start, beta_end=beta_end,
            prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr,
            trained_timesteps=trained_timesteps), "process"))
        self.settings = settings
        self.schedule = DiscreteNoiseSchedule.from_settings(settings)
        self.prediction_type = settings["prediction_type"]
        self._scaling = scaling_for(self.prediction_type)
        # A refiner is trained on the least noisy timesteps only (SDXL's on 200 of 1000).
        self.trained_timesteps = int(settings["trained_timesteps"] or self.schedule.num_timesteps)

    @classmethod
    def of(cls, schedule: DiscreteNoiseSchedule, prediction_type: str = "eps",
           trained_timesteps: int | None = None) -> "DiscreteProcess":
        """The process of a schedule built elsewhere (not a registered configuration: it is not saved)."""
        process = cls.__new__(cls)
        process.settings = None
        process.schedule, process.prediction_type = schedule, prediction_type
        process._scaling = scaling_for(prediction_type)
        process.trained_timesteps = int(trained_timesteps or schedule.num_timesteps)
        return process

    def scalings(self, sigma):
        return self._scaling(sigma)

    def network_time(self, sigma):
        return self.schedule.sigma_to_t(sigma)

    def sample_training_sigmas(self, batch_size, generator=None):
        """Timesteps drawn uniformly from the trained ones, as in DDPM training."""
        t = torch.randint(0, self.trained_timesteps, (batch_size,), generator=generator)
        return self.schedule.sigmas[t]

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    @property
    def trained_sigma_max(self) -> float:
        return float(self.schedule.sigmas[self.trained_timesteps - 1])

    def sigma_grid(self, steps, grid="discrete", spacing="leading", rho=7.0, latent_size=None):
        """The model's own timesteps ("discrete", by `spacing`), "karras", "exponential" or "lcm"."""
        return sigma_grid(self.schedule, steps, grid, spacing, rho)
