"""A second pipeline that finishes a request: the base denoises the noisy part of the sigma grid and hands its
latents to the refiner at `refiner_switch` (SDXL's base and refiner; any two models in one latent space).

The pair is checked before anything runs: the same latent space (codec kind, channels, downsampling, scale),
conditioning inputs split by which model reads them, and each model asked only for the noise levels it was
trained on (`diffusion.trained_timesteps`: the SDXL refiner knows the 200 least noisy of 1000). The checks
take the sigma-space model (`pipe.model`) alone, so `latentgen-sample` runs them from checkpoint headers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from latentgen.diffusion.experts import NoiseLevelExperts, first_index_within, switch_index

if TYPE_CHECKING:
    from latentgen.diffusion.prediction import DiscreteTimeDenoiser
    from latentgen.pipeline import LatentDiffusionPipeline
    from latentgen.pipeline_inputs import Request

DEFAULT_SWITCH = 0.8  # the refiner redoes the last 20 % of the grid: about the noise levels it knows
_LATENT_SPACE = ("latent_channels", "downsampling_factor", "scale_factor", "shift_factor")
_ROUNDING = 1 + 1e-5  # grid sigmas reach a denoiser as float32


def check_same_latent_space(base: Any, refiner: Any) -> None:
    """Refuse a refiner whose codec encodes another latent space than the base's (works on meta modules)."""
    ours, theirs = ({"codec": getattr(codec, "name", type(codec).__name__),
                     **{key: getattr(codec, key, None) for key in _LATENT_SPACE}} for codec in (base, refiner))
    differ = [f"{key} {ours[key]} vs {theirs[key]}" for key in ours if ours[key] != theirs[key]]
    if differ:
        raise ValueError(f"the refiner works in another latent space than the base ({', '.join(differ)}); a refiner "
                         f"must share the base's codec (SDXL's base and refiner do)")


def _trained_range(model: "DiscreteTimeDenoiser") -> str:
    if model.schedule is None:  # a continuous process
        return f"noise levels up to sigma {model.trained_sigma_max:.3g} only"
    return (f"its {model.trained_timesteps} least noisy of {model.schedule.num_timesteps} timesteps only (sigma <= "
            f"{model.trained_sigma_max:.3g})")


def check_start(model: "DiscreteTimeDenoiser", grid: torch.Tensor, start: float, img2img: str | None = None,
                refined: bool = False, role: str = "this model") -> None:
    """Refuse sampling a model from a noise level it was never trained on (a refiner from pure noise).
    `img2img`: the strength setting, for an img2img start; `refined`: the model is the base of a pair."""
    limit = model.trained_sigma_max
    if start <= limit * _ROUNDING:
        return
    where = f"img2img at {img2img}" if img2img else "from pure noise"
    problem = f"{role} was trained on {_trained_range(model)}, so it cannot start {where} (sigma {start:.3g})"
    if refined:
        raise ValueError(f"{problem}: it is a refiner; pass a base model as the checkpoint and this one as refiner=")
    steps = len(grid) - 1
    strength = math.floor((steps - first_index_within(grid, limit)) / steps * 100) / 100  # never past the limit
    fix = f"img2img with strength <= {strength:.2f} (at {steps} steps)" if strength > 0 else "img2img with more steps"
    raise ValueError(f"{problem}: use it as the refiner of a base model (refiner=...), or for {fix}")


def switch_sigma(grid: torch.Tensor, fraction: float, start: float, base: "DiscreteTimeDenoiser",
                 refiner: "DiscreteTimeDenoiser", img2img: str | None = None) -> float:
    """The sigma at and below which the refiner denoises, both models' ranges checked."""
    steps = len(grid) - 1
    index = switch_index(steps, fraction)
    if index in (0, steps):
        idle = "refiner" if index == steps else "base"
        raise ValueError(f"refiner_switch={fraction} at {steps} steps leaves the {idle} no step: use more steps or a "
                         f"refiner_switch nearer 0.5")
    switch = float(grid[index])
    if start > switch:
        check_start(base, grid, start, img2img, refined=True, role="the base model")
    handed = min(switch, start)
    if handed > refiner.trained_sigma_max * _ROUNDING:
        first = first_index_within(grid, refiner.trained_sigma_max)
        fix = f"raise refiner_switch to at least {math.ceil(first / steps * 100) / 100:.2f} (at {steps} steps)" \
            if first < steps \
            else "use more steps"
        raise ValueError(f"refiner_switch={fraction} hands sigma {handed:.3g} to the refiner, which was trained on "
                         f"{_trained_range(refiner)}: {fix}")
    return switch


class Refinement:
    """A request's base and refiner: built (and checked) before the base reads its inputs."""

    def __init__(self, base: "LatentDiffusionPipeline", request: "Request"):
        refiner = request.refiner  # a pipeline (LatentDiffusionPipeline checks the type)
        fraction = request.refiner_switch if request.refiner_switch is not None else DEFAULT_SWITCH
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"refiner_switch={fraction!r}: must be a number in (0, 1), the fraction of the sigma grid "
                             f"after which the refiner takes over ({DEFAULT_SWITCH} by default)")
        check_same_latent_space(base.codec, refiner.codec)
        self.base, self.refiner, self.fraction = base, refiner, float(fraction)
        self.base_conditioning, self.refiner_conditioning = self._split(request.conditioning or {})

    def _split(self, conditioning: Mapping[str, Any]) -> tuple[dict, dict]:
        """Each `conditioning=` input goes to the model(s) that read it (the refiner's aesthetic score to it)."""
        reads = {"base": set(self.base.input_keys), "refiner": set(self.refiner.input_keys)}
        unread = [key for key in conditioning if not any(key in keys for keys in reads.values())]
        if unread:
            raise ValueError(f"conditioning['{unread[0]}'] is read by neither the base (reads {sorted(reads['base'])}) "
                             f"nor the refiner (reads {sorted(reads['refiner'])}); drop it")
        return tuple({key: value for key, value in conditioning.items() if key in reads[model]} for model in reads)

    def experts(self, high: Any, prompts: str | Sequence[str] | None, request: "Request", batch: Mapping[str, Any],
                batch_size: int, grid: torch.Tensor, sigmas: torch.Tensor, images: torch.Tensor | None,
                masks: torch.Tensor | None) -> tuple[NoiseLevelExperts, bool]:
        """denoise(x, sigma) of the pair, and whether the refiner applies an inpainting mask itself."""
        img2img = f"strength={request.strength}" if request.image is not None else None
        switch = switch_sigma(grid, self.fraction, float(sigmas[0]), self.base.model, self.refiner.model, img2img)
        refiner = self.refiner
        try:
            theirs = refiner.inputs(prompts, request.labels, request.num_images, self.refiner_conditioning)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"the refiner: {exc}") from None
        theirs.update(latent_size=batch["latent_size"], image_size=batch["image_size"])
        refiner._check_memory(batch_size, batch["latent_size"], request)
        applies_mask = refiner._fill_mask_inputs(theirs, images, masks)
        low = refiner._guided(theirs, request, batch_size, sigmas)
        if refiner.device != self.base.device:
            low = _on_device(low, refiner.device)
        return NoiseLevelExperts(high, low, switch), applies_mask


def _on_device(denoise: Any, device: torch.device) -> Any:
    def moved(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return denoise(x.to(device), torch.as_tensor(sigma).to(device)).to(x.device)

    return moved
