"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Table 1):
continuous noise levels with preconditioning that keeps the network's input and target at unit variance.

    c_skip = sd^2 / (sigma^2 + sd^2)   c_out = sigma * sd / sqrt(sigma^2 + sd^2)   c_in = 1 / sqrt(sigma^2 + sd^2)

Training draws ln(sigma) ~ N(P_mean, P_std^2) (-1.2, 1.2). The paper's loss weight lambda(sigma) = (sigma^2 +
sd^2) / (sigma * sd)^2 is 1 / c_out^2, so on the network output F it is 1 everywhere: the default weight.
Its c_noise = ln(sigma) / 4 is multiplied here by `time_scale` (1000 by default: c_noise spans about
[-1.6, 1.1], and latentgen's timestep embeddings, sinusoids made for DDPM's 0..999, barely vary over that).
Sampling uses Karras et al.'s grid (rho 7) over [sigma_min, sigma_max] = [0.002, 80].
"""

from __future__ import annotations

import math

import torch

from latentgen.contracts.process import Process


class EDMProcess(Process):
    """Karras et al.'s preconditioned continuous-sigma process (x0-space denoiser of unit-variance data)."""

    prediction_type = "edm"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 p_mean: float = -1.2, p_std: float = 1.2, time_scale: float = 1000.0):
        for name, value in (("sigma_data", sigma_data), ("sigma_min", sigma_min), ("sigma_max", sigma_max),
                            ("p_std", p_std), ("time_scale", time_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"process 'edm': {name} must be a positive number; got {value!r}")
        if not sigma_min < sigma_max:
            raise ValueError(f"process 'edm': sigma_min ({sigma_min}) must be below sigma_max ({sigma_max})")
        self.sigma_data, self._sigma_min, self._sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)
        self.p_mean, self.p_std, self.time_scale = float(p_mean), float(p_std), float(time_scale)

    def scalings(self, sigma):
        sd2 = self.sigma_data ** 2
        total = sigma ** 2 + sd2
        return sd2 / total, sigma * self.sigma_data * total.rsqrt(), total.rsqrt()

    def network_time(self, sigma):
        return self.time_scale * sigma.clamp(min=1e-20).log() / 4

    def sample_training_sigmas(self, batch_size, generator=None):
        return (torch.randn(batch_size, generator=generator, dtype=torch.float64) * self.p_std + self.p_mean).exp()

    @property
    def sigma_min(self) -> float:
        return self._sigma_min

    @property
    def sigma_max(self) -> float:
        return self._sigma_max
