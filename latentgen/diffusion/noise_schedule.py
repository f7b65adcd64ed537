"""Discrete DDPM noise schedules (Ho et al. 2020) seen as noise levels sigma = sqrt((1 - abar) / abar)."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Betas spaced linearly (Ho et al. 2020, Sec. 4; 1e-4 to 0.02 there)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Square roots of the betas spaced linearly: Stable Diffusion's schedule (0.00085 to 0.012)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, beta_start: float = 0.0, beta_end: float = 0.999) -> torch.Tensor:
    """Nichol and Dhariwal 2021, Eq. 17 with s = 0.008; `beta_end` is the clip (0.999 there)."""
    s = 0.008
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alphas_cumprod = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=beta_end)


BETA_SCHEDULES: dict[str, Callable[[int, float, float], torch.Tensor]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
}

SPACINGS = ("leading", "trailing", "linspace")


class DiscreteNoiseSchedule:
    """The noise levels of a network trained on T discrete timesteps, and the map between them.

    Timestep t (0..T-1) has sigma_t = sqrt((1 - abar_t) / abar_t), the noise level of the
    variance-exploding form x = x0 + sigma * noise of the same process. Between grid points,
    t is interpolated linearly in log sigma (as k-diffusion's discrete wrappers do). Everything is
    kept in float64: the grid's small sigmas lose digits in float32.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 steps; got shape {tuple(alphas_cumprod.shape)}")
        if not bool(torch.all((alphas_cumprod > 0) & (alphas_cumprod <= 1))):
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        self.alphas_cumprod = alphas_cumprod
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()  # (T,) ascending
        self.log_sigmas = self.sigmas.clamp(min=1e-20).log()

    @classmethod
    def from_betas(
        cls,
        schedule: str = "scaled_linear",
        num_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
    ) -> "DiscreteNoiseSchedule":
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta schedule '{schedule}'; choose one of {sorted(BETA_SCHEDULES)}")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2; got {num_timesteps}")
        betas = BETA_SCHEDULES[schedule](num_timesteps, beta_start, beta_end)
        return cls(torch.cumprod(1 - betas, dim=0))

    @classmethod
    def from_settings(cls, diffusion: Mapping[str, Any]) -> "DiscreteNoiseSchedule":
        """The schedule a pipeline's `diffusion` settings (DiffusionSettings, all keys given) describe."""
        schedule = cls.from_betas(diffusion["noise_schedule"], diffusion["num_timesteps"], diffusion["beta_start"],
                                  diffusion["beta_end"])
        return schedule.rescaled_to_zero_terminal_snr() if diffusion["zero_terminal_snr"] else schedule

    def rescaled_to_zero_terminal_snr(self) -> "DiscreteNoiseSchedule":
        """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1.

        Shifts and scales sqrt(abar) so the last timestep is pure noise (SNR 0) and the first is
        unchanged. Pure noise is sigma = infinity, which no sampler can start from, so the last level is
        then set to abar = 2^-24 (sigma = 4096), the value diffusers uses for the same purpose.
        """
        root = self.alphas_cumprod.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * first / (first - last)
        alphas_cumprod = root**2
        alphas_cumprod[-1] = 2.0**-24
        return DiscreteNoiseSchedule(alphas_cumprod)

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for each sigma (exact integers on the grid), float64."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-20).log()
        log_sigmas = self.log_sigmas.to(log_sigma.device)
        low = torch.searchsorted(log_sigmas, log_sigma.contiguous(), right=True).sub(1).clamp(0, self.num_timesteps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low.to(torch.float64) + w

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma of each (possibly fractional) timestep, interpolated in log sigma, float64."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        log_sigmas = self.log_sigmas.to(t.device)
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()

    def timesteps(self, steps: int, spacing: str = "leading") -> torch.Tensor:
        """`steps` descending integer timesteps of the grid.

        leading: 1 + k * (T // steps), the original DDIM/Stable Diffusion choice (the +1 is the
        original's offset); trailing: T - 1 - k * T / steps rounded, which includes the noisiest
        timestep; linspace: evenly from T - 1 down to 0.
        """
        T = self.num_timesteps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        if steps > T:
            raise ValueError(f"steps ({steps}) cannot exceed the model's {T} training timesteps")
        if spacing == "leading":
            t = torch.arange(steps, dtype=torch.float64) * (T // steps) + (1 if T // steps > 1 else 0)
        elif spacing == "trailing":
            t = (torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1).flip(0)
        elif spacing == "linspace":
            t = torch.linspace(0, T - 1, steps, dtype=torch.float64).round()
        else:
            raise ValueError(f"unknown timestep spacing '{spacing}'; choose one of {SPACINGS}")
        return t.clamp(0, T - 1).long().flip(0)

    def sigma_grid(self, steps: int, spacing: str = "leading") -> torch.Tensor:
        """Descending sigmas of `steps` timesteps followed by 0: (steps + 1,) float64."""
        sigmas = self.sigmas[self.timesteps(steps, spacing)]
        return torch.cat([sigmas, sigmas.new_zeros(1)])
