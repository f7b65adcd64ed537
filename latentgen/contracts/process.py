"""Diffusion process contract: how data is noised for training and what the network predicts, given to every
sampler as denoise(x, sigma) -> x0_hat in the variance-exploding form x = x0 + sigma * noise."""

from __future__ import annotations

import abc

import torch


class Process(abc.ABC):
    """A noising process and its network parameterisation (Karras et al. 2022, Eq. 7 and Table 1):

        D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, network_time(sigma))

    for x = x0 + sigma * noise. Training draws sigmas (`sample_training_sigmas`), feeds the network
    c_in * x, and regresses F on F_target = (x0 - c_skip * x) / c_out with `loss_weight(sigma)`; samplers get
    D and a grid (`sigma_grid`). So every scheduler and the trainer serve every process unchanged.

    Subclasses implement `scalings`, `network_time`, `sample_training_sigmas`, `sigma_min`, `sigma_max`;
    `loss_weight` (1), `sigma_grid` (Karras et al.'s over the range) and `trained_sigma_max` (sigma_max) have
    defaults. `prediction_type` names what F is, for the loss weightings that depend on it.
    """

    prediction_type: str = "x0"
    # "ve": samplers integrate in the form above. "flow" (rectified flow, whose pure-noise end is sigma = infinity):
    # deterministic samplers integrate the same ODE in x / (1 + sigma), t = sigma / (1 + sigma), where it has the
    # same form and bounded steps (latentgen/diffusion/flow_frame.py).
    sampling_frame: str = "ve"

    @abc.abstractmethod
    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in), each shaped like sigma (float64)."""

    @abc.abstractmethod
    def network_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's own noise-level input for each sigma (c_noise), float64."""

    @abc.abstractmethod
    def sample_training_sigmas(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) float64 noise levels to train on, from this process's training distribution."""

    @property
    @abc.abstractmethod
    def sigma_min(self) -> float:
        """The smallest noise level sampling starts the last step from."""

    @property
    @abc.abstractmethod
    def sigma_max(self) -> float:
        """The noise level sampling starts from."""

    @property
    def trained_sigma_max(self) -> float:
        """The largest noise level the network was trained on (a refiner's is below sigma_max)."""
        return self.sigma_max

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) float32 weight of each sample's squared error of F (default 1)."""
        return torch.ones_like(torch.as_tensor(sigma), dtype=torch.float32)

    def sigma_grid(self, steps: int, grid: str = "discrete", spacing: str = "leading", rho: float = 7.0,
                   latent_size: tuple[int, int] | None = None) -> torch.Tensor:
        """`steps` descending noise levels then 0, float64. Default: Karras et al.'s rho-spaced grid over
        [sigma_min, sigma_max] for "discrete" (the process's own grid) and "karras", log-spaced for
        "exponential"."""
        from latentgen.diffusion.sigma_grids import exponential, karras

        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        if grid in ("discrete", "karras"):
            return karras(steps, self.sigma_min, self.sigma_max, rho)
        if grid == "exponential":
            return exponential(steps, self.sigma_min, self.sigma_max)
        raise ValueError(f"process '{self.name}' has no sigma grid '{grid}'; choose discrete (its own), karras or "
                         f"exponential")

    @property
    def name(self) -> str:
        return getattr(self, "registry_name", type(self).__name__)
