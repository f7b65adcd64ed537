"""Classifier-free guidance (Ho and Salimans 2022): x0 = uncond + scale * (cond - uncond), optionally rescaled (Lin et al. 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

import torch

if TYPE_CHECKING:
    from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule

Cond = Mapping[str, torch.Tensor]


def concat_cond(first: Cond, second: Cond) -> dict[str, torch.Tensor]:
    """Stack two cond dicts along the batch, so cond and uncond run as one network call."""
    if set(first) != set(second):
        raise ValueError(f"conditional and unconditional inputs have different keys: {sorted(first)} vs {sorted(second)}")
    return {key: torch.cat([first[key], second[key].to(first[key].dtype)]) for key in first}


class ClassifierFreeGuidance:
    """Binds conditioning to a sigma-space model and applies guidance.

    `model(x, sigma, cond) -> x0_hat`; calling the guidance object gives `denoise(x, sigma)`, the
    scheduler contract. With scale 1 or an empty cond (an unconditional model) it makes one pass.
    """

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor], cond: Cond,
                 uncond: Cond | None, scale: float, rescale: float = 0.0):
        if not 0 <= rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1]; got {rescale}")
        self.model = model
        self.cond = dict(cond)
        self.uncond = dict(uncond) if uncond is not None else None
        self.scale = float(scale)
        self.rescale = float(rescale)

    @property
    def noise_schedule(self) -> DiscreteNoiseSchedule | None:
        """The model's discrete noise schedule (a DiscreteNoiseSchedule), or None if the model has none: the
        optional `denoise.noise_schedule` protocol, read by samplers that need the model's timesteps (lcm, tcd)."""
        return getattr(self.model, "schedule", None)

    @property
    def guided(self) -> bool:
        return self.scale != 1.0 and bool(self.cond) and self.uncond is not None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return self.model(x, sigma, self.cond)
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma_in = torch.cat([sigma.expand(x.shape[0])] * 2)
        uncond, cond = self.model(torch.cat([x, x]), sigma_in, concat_cond(self.uncond, self.cond)).chunk(2)
        guided = uncond + self.scale * (cond - uncond)
        if self.rescale > 0:
            guided = self._rescaled(x, sigma, guided, cond)
        return guided

    def _rescaled(self, x: torch.Tensor, sigma: torch.Tensor, guided: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Lin et al. 2023, Sec. 3.4 (Eq. 15-16): bring the guided noise prediction back to the standard
        deviation of the conditional one, per sample, and mix by `rescale` (they use 0.7); this counters
        the over-exposure large scales cause. Done on eps = (x - x0) / sigma, as in the paper."""
        sigma = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        eps_guided, eps_cond = (x - guided) / sigma, (x - cond) / sigma
        dims = tuple(range(1, x.ndim))
        factor = eps_cond.std(dim=dims, keepdim=True) / eps_guided.std(dim=dims, keepdim=True).clamp(min=1e-12)
        eps = self.rescale * eps_guided * factor + (1 - self.rescale) * eps_guided
        return x - sigma * eps
