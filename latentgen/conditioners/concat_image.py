"""Aligned-image conditioning: a map (a low-resolution image, a depth map, ...) resized to the latent grid and
concatenated to the denoiser's input, as in LDM's super-resolution models (Rombach et al. 2022, Sec. 4.4) and
Stable Diffusion's x4 upscaler and depth-to-image models.

Noise augmentation follows the x4 upscaler (itself after Ho et al. 2022, "Cascaded Diffusion Models", Sec. 3.2,
conditioning augmentation): in training each map is noised to a random level of a fixed variance-preserving
process, at sampling to one fixed level, and the level can be given to the denoiser as a "vector" so it knows
how much to trust the map.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from latentgen.contracts import Conditioner
from latentgen.diffusion.noise_schedule import scaled_linear_betas
from latentgen.nn.timestep_embedding import timestep_embedding

# The batch key under which a caller gives the latent grid (h, w) the map is resized to. The pipeline sets it
# when sampling; without it the map keeps its own size, so a trainer that does not set it needs maps already
# on the latent grid (as in the x4 upscaler: a 16 px input for 16x16 latents of 64 px images).
LATENT_SIZE_KEY = "latent_size"

MODES = ("bicubic", "bilinear", "nearest", "area")
UNCONDITIONAL = ("keep", "zeros")

# The augmentation process of Stable Diffusion's x4 upscaler (its low_scale_config): 1000 levels of betas
# from 1e-4 to 0.02 spaced as square roots. Level l is l steps of it, so level 0 leaves the map untouched.
NOISE_LEVELS = 1000
NOISE_BETA_START, NOISE_BETA_END = 1e-4, 0.02

# At sampling the noise of the fixed level comes from this seed, so the conditional and unconditional
# passes see the same map and a pipeline seed alone fixes the result.
SAMPLING_NOISE_SEED = 0


class ConcatImageConditioner(Conditioner):
    """Reads a map (B, channels, H, W) under `input_key` -> "concat" (B, channels, h, w) on the latent grid,
    and with `noise_level_dim` also "vector" (B, noise_level_dim): the sinusoidal embedding of its noise level.

    `mode` is the resize filter (bicubic, bilinear, nearest, area; area for maps larger than the grid).
    Training noises each map to a level drawn uniformly from 0..`max_noise_level` (0: no augmentation);
    sampling uses `sampling_noise_level` (the x4 upscaler used 350 and 20). Values are taken as given
    (images in [-1, 1]); the map is not clamped after resizing.

    `unconditional` "keep" (the default) gives the same map to both guidance branches, as LDM's
    super-resolution models and the x4 upscaler do: a super-resolution model has nothing sensible to do
    without its input, so guidance then acts on the stack's other members (e.g. the text). "zeros"
    replaces the map by zeros and, with `dropout` > 0, trains for that, so guidance can push along the map.
    """

    def __init__(self, channels: int = 3, input_key: str = "low_res", mode: str = "bicubic",
                 max_noise_level: int = 0, sampling_noise_level: int = 0, noise_level_dim: int | None = None,
                 unconditional: str = "keep", dropout: float = 0.0):
        super().__init__()

        def fail(message: str) -> None:
            raise ValueError(f"conditioner 'concat_image': {message}")

        if isinstance(channels, bool) or int(channels) < 1:
            fail(f"channels must be a positive integer (the map's channels); got {channels!r}")
        if mode not in MODES:
            fail(f"unknown mode '{mode}'; valid values: {', '.join(MODES)}")
        for option, level in (("max_noise_level", max_noise_level), ("sampling_noise_level", sampling_noise_level)):
            if not 0 <= int(level) <= NOISE_LEVELS:
                fail(f"{option} must be in 0..{NOISE_LEVELS} (0: no noise); got {level}")
        if noise_level_dim is not None and int(noise_level_dim) < 2:
            fail(f"noise_level_dim must be at least 2, or null for no noise-level output; got {noise_level_dim}")
        if unconditional not in UNCONDITIONAL:
            fail(f"unknown unconditional '{unconditional}'; valid values: {', '.join(UNCONDITIONAL)}")
        if not 0.0 <= float(dropout) <= 1.0:
            fail(f"dropout is a probability in [0, 1]; got {dropout}")
        if dropout and unconditional == "keep":
            fail(f"dropout={dropout} has no effect when the unconditional map is the map itself "
                 f"(unconditional: keep); set unconditional: zeros, or dropout: 0")
        if not input_key or input_key == LATENT_SIZE_KEY:
            fail(f"input_key must name the batch entry of the map (e.g. low_res, depth); got {input_key!r}")
        self.channels = int(channels)
        self.input_keys = (input_key,)
        self.mode = mode
        self.max_noise_level = int(max_noise_level)
        self.sampling_noise_level = int(sampling_noise_level)
        self.noise_level_dim = None if noise_level_dim is None else int(noise_level_dim)
        self.unconditional_mode = unconditional
        self.dropout = float(dropout)
        betas = scaled_linear_betas(NOISE_LEVELS, NOISE_BETA_START, NOISE_BETA_END)
        # float64 on the CPU: in a low-precision copy the first levels' abar would round to 1.
        self.noise_alphas_cumprod = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, dim=0)])
        # Follows .to(): its device and dtype are those of the outputs. Not saved (no information).
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    @property
    def input_key(self) -> str:
        return self.input_keys[0]

    @property
    def outputs(self) -> dict[str, int]:
        widths = {"concat": self.channels}
        if self.noise_level_dim is not None:
            widths["vector"] = self.noise_level_dim
        return widths

    def resized(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The map of `batch` on the latent grid, float32 (B, channels, h, w), before any noise."""
        self.check_inputs(batch)
        value = batch[self.input_key]
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        if not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[1] != self.channels \
                or not value.is_floating_point():
            raise ValueError(
                f"conditioner '{self.name}' reads '{self.input_key}' as a float tensor (B, {self.channels}, H, W); "
                f"got {shape}{'' if not isinstance(value, torch.Tensor) else ' ' + str(value.dtype)}. Pass a "
                f"{self.channels}-channel map (images in [-1, 1]; the pipeline converts PIL images), or set "
                f"channels to the map's channel count")
        if value.shape[0] == 0 or value.shape[2] == 0 or value.shape[3] == 0:
            raise ValueError(f"conditioner '{self.name}': '{self.input_key}' is empty: {tuple(value.shape)}")
        maps = value.to(self.anchor.device, torch.float32)
        size = _latent_size(batch.get(LATENT_SIZE_KEY), self.name)
        if size is None or size == tuple(maps.shape[-2:]):
            return maps
        corners = {"align_corners": False} if self.mode in ("bilinear", "bicubic") else {}
        return F.interpolate(maps, size=size, mode=self.mode, **corners)

    def noised(self, maps: torch.Tensor, levels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """sqrt(abar_l) * map + sqrt(1 - abar_l) * noise for each item's level l (B,): q(x_l | x_0) of DDPM."""
        if not bool(levels.any()):
            return maps
        abar = self.noise_alphas_cumprod[levels.cpu()].view(-1, 1, 1, 1)  # float64
        signal, spread = (scale.to(maps.device, maps.dtype) for scale in (abar.sqrt(), (1 - abar).sqrt()))
        # Drawn on the generator's device (the CPU) and moved, so a seed means the same noise on every device.
        noise = torch.randn(maps.shape, generator=generator).to(maps.device)
        return signal * maps + spread * noise

    def _outputs(self, maps: torch.Tensor, levels: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = self.anchor.dtype
        out = {"concat": maps.to(dtype)}  # (B, C, h, w)
        if self.noise_level_dim is not None:
            out["vector"] = timestep_embedding(levels.to(maps.device), self.noise_level_dim).to(dtype)  # (B, D)
        return out

    def _sampling_levels(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), self.sampling_noise_level, dtype=torch.long)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The map at the fixed `sampling_noise_level` (same noise on every call)."""
        maps = self.resized(batch)
        levels = self._sampling_levels(maps.shape[0])
        generator = torch.Generator().manual_seed(SAMPLING_NOISE_SEED)
        return self._outputs(self.noised(maps, levels, generator), levels)

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        cond = self.forward(batch)
        if self.unconditional_mode == "zeros":
            cond["concat"] = torch.zeros_like(cond["concat"])  # the level's embedding stays: it describes the map
        return cond

    def for_training(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Each map noised to a level drawn uniformly from 0..max_noise_level, then replaced by zeros with
        probability `dropout` (unconditional "zeros" only)."""
        maps = self.resized(batch)
        batch_size = maps.shape[0]
        levels = torch.randint(0, self.max_noise_level + 1, (batch_size,), generator=generator)
        maps = self.noised(maps, levels, generator)
        if self.dropout > 0:
            drop = (torch.rand(batch_size, generator=generator) < self.dropout).to(maps.device)
            maps = torch.where(drop.view(-1, 1, 1, 1), torch.zeros_like(maps), maps)
        return self._outputs(maps, levels)


def _latent_size(value: Any, name: str) -> tuple[int, int] | None:
    """(h, w) from the batch's latent size entry (a pair of positive ints), or None."""
    if value is None:
        return None
    size = tuple(int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value))
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"conditioner '{name}': batch['{LATENT_SIZE_KEY}'] must be the latent grid (h, w); got {value!r}")
    return size
