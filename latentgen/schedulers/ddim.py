"""DDIM sampler (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12) in sigma space."""

from __future__ import annotations

from latentgen.schedulers.euler_ancestral import EulerAncestralScheduler


class DDIMScheduler(EulerAncestralScheduler):
    """DDIM: move along the predicted noise direction to the next sigma; eta > 0 re-injects noise.

    For x = x0 + sigma * noise, DDIM's update is exactly an Euler step to sigma_down followed by
    sigma_up of fresh noise (`ancestral_step`): the Euler ancestral sampler with DDIM's default eta = 0
    (deterministic, first order). eta = 1 matches DDPM's ancestral sampling.
    """

    def __init__(self, eta: float = 0.0):
        super().__init__(eta=eta, s_noise=1.0)
