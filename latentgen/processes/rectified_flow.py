"""Rectified flow (Liu et al. 2023; Esser et al. 2024, "Scaling Rectified Flow Transformers", Sec. 2-3 and
5.3.2): x_t = (1 - t) x0 + t noise, the network predicting the velocity noise - x0; Stable Diffusion 3's
process.

In the variance-exploding form the samplers work in, x = x_t / (1 - t) and sigma = t / (1 - t), so

    c_in = 1 / (1 + sigma) (= 1 - t)    c_skip = 1 / (1 + sigma)    c_out = -sigma / (1 + sigma) (= -t)

and D = x_t - t * v. The network's time input is `timestep_scale` * t (SD3: 1000 t). Training draws
t = sigmoid(u), u ~ N(logit_mean, logit_std^2) (SD3's logit-normal, Sec. 3.1), then the timestep shift
t' = shift t / (1 + (shift - 1) t) (Sec. 5.3.2; SD3 samples with shift 3). With `shift_base_tokens`, the
shift grows with the latent's size: shift * sqrt(tokens / base) (Eq. 23: sqrt(m / n)), applied when a grid
is made for a given latent size.

Pure noise (t = 1) is sigma = infinity, which no sampler can start from: the noisiest level is t = 1 - 1e-4
(sigma ~ 1e4), where the data's share of x_t is 1e-4 and Euler's first step differs from the t = 1 one by that.
"""

from __future__ import annotations

import math

import torch

from latentgen.contracts.process import Process

T_MAX = 1.0 - 1e-4


class RectifiedFlowProcess(Process):
    """Straight-line interpolation between data and noise, velocity prediction, logit-normal shifted training."""

    prediction_type = "velocity"
    sampling_frame = "flow"  # heun, lms, plms step across sigma 9999 -> 8 otherwise (latentgen/diffusion/flow_frame.py)

    def __init__(self, shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0,
                 timestep_scale: float = 1000.0, shift_base_tokens: int | None = None, t_min: float = 1e-3):
        for name, value in (("shift", shift), ("logit_std", logit_std), ("timestep_scale", timestep_scale),
                            ("t_min", t_min)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"process 'rectified_flow': {name} must be a positive number; got {value!r}")
        if not t_min < 0.5:
            raise ValueError(f"process 'rectified_flow': t_min must be below 0.5; got {t_min}")
        if shift_base_tokens is not None and (not isinstance(shift_base_tokens, int) or shift_base_tokens < 1):
            raise ValueError(f"process 'rectified_flow': shift_base_tokens must be a positive integer (the latent "
                             f"pixels the shift was set for) or null; got {shift_base_tokens!r}")
        self.shift, self.logit_mean, self.logit_std = float(shift), float(logit_mean), float(logit_std)
        self.timestep_scale, self.shift_base_tokens, self.t_min = float(timestep_scale), shift_base_tokens, float(t_min)

    @staticmethod
    def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
        """SD3's timestep shift: shift t / (1 + (shift - 1) t)."""
        return shift * t / (1 + (shift - 1) * t)

    @staticmethod
    def sigma_of(t: torch.Tensor) -> torch.Tensor:
        return t / (1 - t)

    def scalings(self, sigma):
        c_in = 1 / (1 + sigma)
        return c_in, -sigma * c_in, c_in

    def network_time(self, sigma):
        return self.timestep_scale * sigma / (1 + sigma)

    def sample_training_sigmas(self, batch_size, generator=None):
        u = torch.randn(batch_size, generator=generator, dtype=torch.float64) * self.logit_std + self.logit_mean
        t = self.shifted(torch.sigmoid(u), self.shift).clamp(max=T_MAX)
        return self.sigma_of(t)

    @property
    def sigma_min(self) -> float:
        return float(self.sigma_of(self.shifted(torch.tensor(self.t_min, dtype=torch.float64), self.shift)))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma_of(torch.tensor(T_MAX, dtype=torch.float64)))

    def grid_shift(self, latent_size: tuple[int, int] | None) -> float:
        if self.shift_base_tokens is None or latent_size is None:
            return self.shift
        return self.shift * math.sqrt(latent_size[0] * latent_size[1] / self.shift_base_tokens)

    def sigma_grid(self, steps, grid="discrete", spacing="leading", rho=7.0, latent_size=None):
        """"discrete" (the process's own): evenly spaced in t from 1 to t_min, shifted (SD3's sampling grid);
        "karras" and "exponential" over [sigma_min, sigma_max]."""
        if grid != "discrete":
            return super().sigma_grid(steps, grid, spacing, rho, latent_size)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        t = self.shifted(torch.linspace(1.0, self.t_min, steps, dtype=torch.float64), self.grid_shift(latent_size))
        return torch.cat([self.sigma_of(t.clamp(max=T_MAX)), torch.zeros(1, dtype=torch.float64)])
