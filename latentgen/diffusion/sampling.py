"""The sampling loop: noise (or a part-noised image) integrated down a sigma grid by any scheduler."""

from __future__ import annotations

from typing import Callable

import torch

from latentgen.contracts.scheduler import Callback, DenoiseFn
from latentgen.diffusion.flow_frame import integrate_in_flow_frame, uses_flow_frame
from latentgen.diffusion.inpainting import MaskBlendedDenoiser


def img2img_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a grid that redoes the last `strength` of the path (Meng et al. 2022, SDEdit): img2img is
    the same sampling on a shorter grid. At least one step."""
    steps = len(sigmas) - 1
    return sigmas[steps - max(1, round(steps * strength)):]


def sample(denoise: DenoiseFn, scheduler: Callable[..., torch.Tensor], sigmas: torch.Tensor, noise: torch.Tensor, *,
           known: torch.Tensor | None = None, repaint: torch.Tensor | None = None,
           generator: torch.Generator | None = None, callback: Callback | None = None,
           frame: str = "ve") -> torch.Tensor:
    """Latents at sigma 0 from `noise` (B, C, h, w) at sigmas[0], or from the `known` latents noised to sigmas[0].

    `repaint` (B, 1, h, w) in [0, 1], 1 = repaint, keeps the known latents outside the mask at every step
    (Avrahami et al. 2022, Blended Latent Diffusion): inpainting with any denoiser. `frame` is the process's
    `sampling_frame`: under "flow" a deterministic scheduler integrates in flow coordinates (flow_frame.py).
    """
    start = noise * sigmas[0].to(torch.float32)
    x = start if known is None else known + start
    if repaint is not None:
        if known is None:
            raise ValueError("blending with a mask needs the known latents it keeps")
        denoise = MaskBlendedDenoiser(denoise, known, repaint)
    if uses_flow_frame(scheduler, frame):
        x = integrate_in_flow_frame(scheduler, denoise, x, sigmas, generator=generator, callback=callback)
    else:
        x = scheduler(denoise, x, sigmas, generator=generator, callback=callback)
    return denoise.blend(x) if repaint is not None else x
