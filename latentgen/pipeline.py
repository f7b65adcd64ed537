"""The generic latent diffusion pipeline: any codec, denoiser, conditioner and scheduler together."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentgen import registry
from latentgen.checkpoint import (COMPONENTS_KEY, CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION, load_module_state,
                                  load_tensors, read_checkpoint, save_tensors)
from latentgen.compatibility import check_compatible
from latentgen.conditioners.concat_image import LATENT_SIZE_KEY
from latentgen.config.containers import to_plain
from latentgen.contracts import Codec, Conditioner, Denoiser, Scheduler
from latentgen.diffusion.guidance import ClassifierFreeGuidance
from latentgen.diffusion.inpainting import MaskBlendedDenoiser, latent_mask
from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule
from latentgen.diffusion.prediction import DiscreteTimeDenoiser
from latentgen.diffusion.sigma_grids import sigma_grid
from latentgen.errors import ConfigError
from latentgen.imaging import from_pil, to_pil

MODULE_KINDS = ("codec", "denoiser", "conditioner")
KINDS = (*MODULE_KINDS, "scheduler")
# Conditioner inputs the pipeline fills itself: from its arguments, from image= and mask=, from the latent size.
_OWN_INPUTS = {"prompt": "prompts (the first argument)", "label": "labels=...", "mask": "image=... and mask=...",
               "masked_image_latents": "image=... and mask=...", LATENT_SIZE_KEY: "height= and width="}

DEFAULT_DIFFUSION = {
    # Stable Diffusion's training process (Rombach et al. 2022, App. E).
    "noise_schedule": "scaled_linear",
    "num_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "eps",
    "zero_terminal_snr": False,  # rescale the schedule so its last step is pure noise (Lin et al. 2023)
}
DEFAULT_SAMPLING = {"height": None, "width": None, "steps": 20, "guidance_scale": 5.0, "guidance_rescale": 0.0,
                    "grid": "discrete", "spacing": "leading", "rho": 7.0}


def build_component(kind: str, node: Mapping[str, Any] | None) -> Any:
    """A component from its config node: `{name: ..., **params}`, optionally with Hydra's
    `_target_: latentgen.registry.build` and `kind`. A missing conditioner is the null one."""
    node = to_plain(node)
    if node is None:
        if kind == "conditioner":
            return registry.build("conditioner", "null")
        raise ConfigError(f"the pipeline config has no '{kind}'; choose one, e.g. {kind}={registry.available(kind)[:1]}")
    params = dict(node)
    target = params.pop("_target_", "latentgen.registry.build")
    if target != "latentgen.registry.build":
        raise ConfigError(f"{kind} config names _target_ '{target}'; latentgen configs name components through "
                          f"the registry: _target_: latentgen.registry.build, kind: {kind}, name: <component>")
    declared = params.pop("kind", kind)
    if declared != kind:
        raise ConfigError(f"the '{kind}' config declares kind '{declared}'")
    if "name" not in params:
        raise ConfigError(f"the '{kind}' config has no 'name'; available: {registry.describe(kind)}")
    return registry.build(kind, str(params.pop("name")), **params)


def component_config(kind: str, component: Any) -> dict[str, Any]:
    """{name, **params} that rebuilds a registry-built component."""
    if not hasattr(component, "registry_name"):
        raise ConfigError(
            f"the {kind} {type(component).__name__} was not built through latentgen.registry.build, so "
            f"its configuration is unknown and it cannot be saved; build it with registry.build('{kind}', name, ...)"
        )
    return {"name": component.registry_name, **component.build_params}


class LatentDiffusionPipeline:
    """Text/label/unconditional generation in a codec's latent space (Rombach et al. 2022).

    Holds `codec`, `denoiser`, `conditioner`, `scheduler`, the discrete noise schedule the denoiser
    was trained on and its `prediction_type`. Refuses an incompatible assembly at construction.
    """

    def __init__(self, codec: Codec, denoiser: Denoiser, conditioner: Conditioner | None = None,
                 scheduler: Scheduler | None = None, diffusion: Mapping[str, Any] | None = None,
                 sampling: Mapping[str, Any] | None = None):
        self.codec = codec
        self.denoiser = denoiser
        self.conditioner = conditioner if conditioner is not None else registry.build("conditioner", "null")
        self.scheduler = scheduler if scheduler is not None else registry.build("scheduler", "ddim")
        for kind, base in (("codec", Codec), ("denoiser", Denoiser), ("conditioner", Conditioner), ("scheduler", Scheduler)):
            if not isinstance(getattr(self, kind), base):
                raise TypeError(f"the pipeline's {kind} must be a latentgen.{base.__name__}; got {type(getattr(self, kind)).__name__}")
        check_compatible(self.codec, self.denoiser, self.conditioner)
        self.diffusion = {**DEFAULT_DIFFUSION, **(to_plain(diffusion) or {})}
        unknown = set(self.diffusion) - set(DEFAULT_DIFFUSION)
        if unknown:
            raise ConfigError(f"unknown diffusion settings {sorted(unknown)}; the settings are {sorted(DEFAULT_DIFFUSION)}")
        self.sampling = {**DEFAULT_SAMPLING, **(to_plain(sampling) or {})}
        self.schedule = DiscreteNoiseSchedule.from_betas(
            self.diffusion["noise_schedule"], int(self.diffusion["num_timesteps"]),
            float(self.diffusion["beta_start"]), float(self.diffusion["beta_end"]))
        if self.diffusion["zero_terminal_snr"]:
            self.schedule = self.schedule.rescaled_to_zero_terminal_snr()
        self.model = DiscreteTimeDenoiser(self.denoiser, self.schedule, self.diffusion["prediction_type"])

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LatentDiffusionPipeline":
        """From a config with `codec`, `denoiser`, `conditioner`, `scheduler` nodes (each
        `{name, **params}` or Hydra's `{_target_: latentgen.registry.build, kind, name, ...}`) and
        optional `diffusion` and `sampling` settings; other keys (dataset, training) are ignored."""
        config = to_plain(config)
        components = {kind: build_component(kind, config.get(kind)) for kind in ("codec", "denoiser", "conditioner")}
        scheduler = build_component("scheduler", config.get("scheduler") or {"name": "ddim"})
        return cls(**components, scheduler=scheduler, diffusion=config.get("diffusion"), sampling=config.get("sampling"))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        scheduler: Scheduler | None = None, dtype: torch.dtype | None = None,
                        original_config: Any = None, compile: bool = False) -> "LatentDiffusionPipeline":
        """A latentgen checkpoint, or an original Stable Diffusion single file (.safetensors or .ckpt,
        loaded through `latentgen.interop.stable_diffusion.load_pipeline`, with its inference YAML
        as `original_config` when it is not a standard v1/v2 model). `compile=True` compiles the
        denoiser with torch.compile (`latentgen.fast_path`)."""
        from latentgen.fast_path import optimize_for_inference
        from latentgen.interop.stable_diffusion import is_original_checkpoint, load_pipeline

        path = Path(path)
        if is_original_checkpoint(path):
            pipe = load_pipeline(path, original_config=original_config, dtype=dtype, device=device, compile=compile)
        elif original_config is not None:
            raise ConfigError(f"original_config applies to original Stable Diffusion files; '{path}' is not one")
        else:
            pipe = cls._from_latentgen_checkpoint(path, device)
            if dtype is not None:
                pipe.to(dtype=dtype)
            if compile:  # the channels-last layout was measured only on SD-sized models: left as it is
                optimize_for_inference(pipe, channels_last=False, compile=True)
        if scheduler is not None:
            pipe.scheduler = scheduler
        return pipe

    @classmethod
    def _from_latentgen_checkpoint(cls, path: Path, device: str | torch.device) -> "LatentDiffusionPipeline":
        config, provenance = read_checkpoint(path)
        _check_provenance(provenance, path)
        pipe = cls.from_config(config)
        tensors = load_tensors(path, device)
        for kind in MODULE_KINDS:
            prefix = f"{kind}."
            state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            load_module_state(getattr(pipe, kind), state, kind, path)
        return pipe.to(device).eval()

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config that rebuilds this pipeline (what a checkpoint stores)."""
        return {**{kind: component_config(kind, getattr(self, kind)) for kind in KINDS},
                "diffusion": dict(self.diffusion), "sampling": dict(self.sampling)}

    def save(self, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write weights, config and component versions to one safetensors file, atomically."""
        config = self.config  # first: it explains what is missing if a component is not registry-built
        tensors = {f"{kind}.{key}": value for kind in MODULE_KINDS
                   for key, value in getattr(self, kind).state_dict().items()}
        provenance = {kind: {"name": getattr(self, kind).registry_name,
                             "distribution": getattr(self, kind).registry_distribution,
                             "version": getattr(self, kind).registry_version} for kind in KINDS}
        header = {FORMAT_KEY: FORMAT_VERSION, CONFIG_KEY: config, COMPONENTS_KEY: provenance, **(metadata or {})}
        return save_tensors(path, tensors, header)

    # ---- module plumbing ----------------------------------------------------------------------

    def modules(self) -> list[torch.nn.Module]:
        return [self.codec, self.denoiser, self.conditioner]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LatentDiffusionPipeline":
        for module in self.modules():
            module.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "LatentDiffusionPipeline":
        for module in self.modules():
            module.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    # ---- sampling -----------------------------------------------------------------------------

    def inputs(self, prompts: str | Sequence[str] | None, labels: int | Sequence[int] | torch.Tensor | None,
               num_images: int, conditioning: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The conditioner's input batch, each prompt or label repeated `num_images` times.

        `conditioning` holds the other inputs the conditioner reads, by key (e.g. {"low_res": image}):
        PIL image(s) (mode "L" gives one channel, others RGB, in [-1, 1]), a tensor (B, C, H, W) or
        (C, H, W), or a list of values. Each gives one item for all, one per prompt/label (or, with
        neither, one per request item), or one per output image.
        """
        reads = set(self.conditioner.input_keys)
        given = {"prompt": prompts, "label": labels}
        for key, value in given.items():
            if value is not None and key not in reads:
                what = "an unconditional model" if not reads else f"a model whose conditioner reads {sorted(reads)}"
                raise ValueError(
                    f"a {key} was given to {what} (conditioner '{self.conditioner.name}'); "
                    + (f"pass {sorted(reads)[0]}=... instead" if reads else f"drop the {key}, or load a model trained with a {key} conditioner")
                )
        missing = [key for key in reads if key in given and given[key] is None]
        if missing:
            hint = ' (an empty prompt "" gives unconditional samples)' if missing[0] == "prompt" else ""
            raise ValueError(f"conditioner '{self.conditioner.name}' needs {missing[0]}=...{hint}")
        batch: dict[str, Any] = {}
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            batch["prompt"] = [p for p in prompts for _ in range(num_images)]
        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1)
            batch["label"] = labels.repeat_interleave(num_images)
        batch.update(self._conditioning_inputs(conditioning or {}, batch, num_images))
        return batch

    def _conditioning_inputs(self, conditioning: Mapping[str, Any], batch: Mapping[str, Any],
                             num_images: int) -> dict[str, Any]:
        """`conditioning` checked against what the conditioner reads, batched like the prompts/labels."""
        reads = self.conditioner.input_keys
        for key in conditioning:
            if key in _OWN_INPUTS:
                raise ValueError(f"conditioning['{key}'] is filled by the pipeline: pass {_OWN_INPUTS[key]} instead")
            if key not in reads:
                raise ValueError(f"conditioning['{key}'] was given but conditioner '{self.conditioner.name}' reads only "
                                 f"{list(reads) or 'nothing'}; drop it, or load a model whose conditioner reads '{key}'")
        for key in reads:
            if key not in _OWN_INPUTS and conditioning.get(key) is None:
                reader = _reader(self.conditioner, key)
                raise ValueError(
                    f"conditioner '{reader}' needs the input '{key}', which was not given: pass "
                    f"conditioning={{'{key}': <PIL image or tensor (B, C, H, W)>}} to the pipeline "
                    f"(latentgen-sample: conditioning.{key}=<path.png>)")
        values = {key: _as_conditioning(key, value) for key, value in conditioning.items()}
        if batch:
            items = len(next(iter(batch.values()))) // num_images
        else:  # no prompts or labels: the conditioning inputs are the request's items
            items = max((_count(value) for value in values.values()), default=1)
        return {key: _batched(key, value, items, num_images, self.device) for key, value in values.items()}

    def _image_batch(self, image: Any, batch_size: int, height: int | None, width: int | None) -> torch.Tensor:
        """PIL image(s) or a (B, 3, H, W) tensor in [-1, 1] -> (batch_size, 3, H, W) on the codec's device."""
        if isinstance(image, torch.Tensor):
            images = image if image.ndim == 4 else image[None]
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"an image tensor must be (B, 3, H, W) in [-1, 1]; got {tuple(image.shape)}")
            if height and width and tuple(images.shape[2:]) != (height, width):
                images = F.interpolate(images.float(), size=(height, width), mode="bicubic").clamp(-1, 1)
        else:
            pictures = list(image) if isinstance(image, (list, tuple)) else [image]
            size = (width, height) if height and width else None
            images = from_pil(pictures, size)
        return _repeat_to(images, batch_size, "image").to(self.codec_device)

    def _mask_batch(self, mask: Any, batch_size: int, height: int, width: int) -> torch.Tensor:
        """PIL mask(s) (white = repaint) or a tensor (B, 1, H, W) in [0, 1] -> (batch_size, 1, H, W)."""
        if isinstance(mask, torch.Tensor):
            masks = mask.float()
            while masks.ndim < 4:
                masks = masks[None]
            if masks.shape[1] != 1:
                raise ValueError(f"a mask tensor must be (B, 1, H, W) in [0, 1]; got {tuple(mask.shape)}")
        else:
            pictures = list(mask) if isinstance(mask, (list, tuple)) else [mask]
            masks = (from_pil([p.convert("L").convert("RGB") for p in pictures])[:, :1] + 1) / 2
        masks = F.interpolate(masks, size=(height, width), mode="nearest") if tuple(masks.shape[2:]) != (height, width) else masks
        return _repeat_to(masks, batch_size, "mask").to(self.codec_device)

    @property
    def codec_device(self) -> torch.device:
        return next(self.codec.parameters(), torch.empty(0, device=self.device)).device

    @torch.inference_mode()
    def sample_latents(self, prompts=None, *, labels=None, negative_prompts=None, num_images: int = 1,
                       steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
                       generator: torch.Generator | None = None, height: int | None = None,
                       width: int | None = None, spacing: str | None = None, grid: str | None = None,
                       guidance_rescale: float | None = None, image: Any = None,
                       strength: float | None = None, mask: Any = None,
                       conditioning: Mapping[str, Any] | None = None,
                       callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Scaled latents (B, C, h, w) for the given prompts/labels; see `__call__`."""
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1; got {num_images}")
        if mask is not None and image is None:
            raise ValueError("a mask needs the image it applies to: pass image=... as well")
        steps = int(steps if steps is not None else self.sampling["steps"])
        if steps < 1:
            raise ValueError(f"steps must be at least 1; got {steps}")
        guidance_scale = float(guidance_scale if guidance_scale is not None else self.sampling["guidance_scale"])
        strength = float(strength if strength is not None else (1.0 if mask is not None else 0.8))
        if image is not None and not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1] (the fraction of the sampling path redone); got {strength}")

        batch = self.inputs(prompts, labels, num_images, conditioning)
        batch_size = len(next(iter(batch.values()))) if batch else num_images
        images = None
        if image is not None:
            images = self._image_batch(image, batch_size, height, width)
            height, width = height or images.shape[2], width or images.shape[3]
        height = height or self.sampling["height"]
        width = width or self.sampling["width"]
        if height is None or width is None:
            raise ValueError("pass height= and width= (this pipeline's config has no default image size)")
        latent_h, latent_w = self.codec.latent_size(int(height), int(width))
        multiple = self.denoiser.latent_size_multiple
        if latent_h % multiple or latent_w % multiple:
            step = multiple * self.codec.downsampling_factor
            raise ValueError(f"denoiser '{self.denoiser.name}' needs latents divisible by {multiple}, so the image size "
                             f"must be a multiple of {step}; got {height}x{width}")
        batch[LATENT_SIZE_KEY] = (latent_h, latent_w)  # for conditioners that resize a map to the latent grid
        masks = self._mask_batch(mask, batch_size, int(height), int(width)) if mask is not None else None
        if "masked_image_latents" in self.conditioner.input_keys:
            # An inpainting model (e.g. SD's 9-channel one) reads the mask and the masked image's latents.
            if masks is None:
                raise ValueError(f"conditioner '{self.conditioner.name}' belongs to an inpainting model: pass image= and mask=")
            batch["mask"] = masks
            batch["masked_image_latents"] = self.codec.encode(images * (masks < 0.5).to(images.dtype)).float()

        if generator is None:
            generator = torch.Generator("cpu")
            if seed is not None:
                generator.manual_seed(int(seed))
            else:
                generator.seed()  # a fresh random seed for this generator only, not the global RNG
        device = self.device

        cond = self.conditioner(batch)
        uncond = None
        if guidance_scale != 1.0 and cond:
            if negative_prompts is not None:
                if "prompt" not in batch:
                    raise ValueError("negative prompts need a text-conditioned model")
                negatives = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
                if len(negatives) == 1:
                    negatives = negatives * (batch_size // num_images)
                uncond = self.conditioner({**batch, "prompt": [n for n in negatives for _ in range(num_images)]})
            else:
                uncond = self.conditioner.unconditional(batch)
        rescale = float(guidance_rescale if guidance_rescale is not None else self.sampling["guidance_rescale"])
        denoise = ClassifierFreeGuidance(self.model, cond, uncond, guidance_scale, rescale)

        sigmas = sigma_grid(self.schedule, steps, grid or self.sampling["grid"], spacing or self.sampling["spacing"],
                            float(self.sampling["rho"])).to(device)
        # Noise is drawn on the CPU generator so a seed means the same image on every device.
        noise = torch.randn((batch_size, self.codec.latent_channels, latent_h, latent_w), generator=generator).to(device)
        if images is None:
            return self.scheduler(denoise, noise * sigmas[0].to(torch.float32), sigmas, generator=generator,
                                  callback=callback)
        # img2img (Meng et al. 2022, SDEdit): noise the image's latents part-way, redo the rest of the path.
        known = self.codec.encode(images).float().to(device)
        sigmas = sigmas[steps - max(1, round(steps * strength)):]
        x = known + noise * sigmas[0].to(torch.float32)
        if masks is not None and "masked_image_latents" not in self.conditioner.input_keys:
            blended = MaskBlendedDenoiser(denoise, known, latent_mask(masks, (latent_h, latent_w)).to(device))
            return blended.blend(self.scheduler(blended, x, sigmas, generator=generator, callback=callback))
        return self.scheduler(denoise, x, sigmas, generator=generator, callback=callback)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        codec_dtype = next(self.codec.parameters(), latents).dtype
        return self.codec.decode(latents.to(codec_dtype)).float().clamp(-1, 1)

    def __call__(self, prompts: str | Sequence[str] | None = None, *, output_type: str = "pil",
                 **options: Any) -> list[Image.Image] | torch.Tensor:
        """Generate images: `pipe(["a red circle"], steps=20, guidance_scale=5, seed=0)`.

        Options: labels, negative_prompts, num_images (per prompt/label, or in all for an
        unconditional model), steps, guidance_scale, guidance_rescale, seed or generator, height,
        width, grid ("discrete", "karras", "exponential") and spacing, callback; `image` (PIL or (B, 3, H, W) tensor) with `strength` for img2img, and `mask`
        (white / 1 = repaint) with it for inpainting; `conditioning` for the conditioner's other inputs, e.g.
        `conditioning={"low_res": pil_image}` for a super-resolution model (see `inputs`). `output_type` "pil"
        (default), "tensor" ((B, 3, H, W) in [-1, 1]) or "latent".
        """
        if output_type not in ("pil", "tensor", "latent"):
            raise ValueError(f"output_type must be 'pil', 'tensor' or 'latent'; got {output_type!r}")
        latents = self.sample_latents(prompts, **options)
        if output_type == "latent":
            return latents
        images = self.decode(latents)
        return images if output_type == "tensor" else to_pil(images)


def _reader(conditioner: Conditioner, key: str) -> str:
    """The name of the (stack member) conditioner that reads `key`."""
    members = getattr(conditioner, "conditioners", None) or [conditioner]
    return next((member.name for member in members if key in member.input_keys), conditioner.name)


def _as_conditioning(key: str, value: Any) -> torch.Tensor | list:
    """A conditioning input as a batch: PIL images and arrays -> float tensor (B, C, H, W), else a list."""
    if isinstance(value, Image.Image) or (isinstance(value, (list, tuple)) and value
                                          and all(isinstance(v, Image.Image) for v in value)):
        pictures = [value] if isinstance(value, Image.Image) else list(value)
        if len({picture.size for picture in pictures}) > 1:
            raise ValueError(f"conditioning['{key}'] holds images of different sizes "
                             f"{sorted({p.size for p in pictures})}; resize them to one size")
        if all(picture.mode == "L" for picture in pictures):  # a one-channel map, e.g. a depth map
            arrays = np.stack([np.asarray(picture, dtype=np.float32) for picture in pictures])[:, None]
            return torch.from_numpy(arrays) / 127.5 - 1
        return from_pil(pictures)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) and v.ndim in (3, 4) for v in value):
        value = torch.cat([v if v.ndim == 4 else v[None] for v in value])  # maps of one size, e.g. one per prompt
    if isinstance(value, torch.Tensor):
        if value.ndim == 3:  # one (C, H, W) map
            value = value[None]
        return value.float() if value.dtype == torch.float64 else value
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _count(value: torch.Tensor | list) -> int:
    return value.shape[0] if isinstance(value, torch.Tensor) else len(value)


def _batched(key: str, value: torch.Tensor | list, items: int, num_images: int,
             device: torch.device) -> torch.Tensor | list:
    """One value for all, one per item (repeated `num_images` times) or one per image -> one per image."""
    count, batch_size = _count(value), items * num_images
    if count not in (1, items, batch_size):
        raise ValueError(f"conditioning['{key}'] has {count} items for {items} prompt(s)/label(s) x {num_images} "
                         f"image(s): pass one, one per prompt/label ({items}) or one per image ({batch_size})")
    if isinstance(value, torch.Tensor):
        if count == batch_size:
            return value.to(device)
        repeats = batch_size if count == 1 else num_images
        return value.repeat_interleave(repeats, dim=0).to(device)
    if count == batch_size:
        return list(value)
    return [v for v in value for _ in range(batch_size if count == 1 else num_images)]


def _repeat_to(tensor: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    """One item for the whole batch, or exactly one per item."""
    if tensor.shape[0] == batch_size:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch_size, *tensor.shape[1:])
    raise ValueError(f"got {tensor.shape[0]} {what}s for a batch of {batch_size}: pass one, or one per image")


def _check_provenance(provenance: Mapping[str, Mapping[str, str]], path: Path) -> None:
    """Say which distribution to install when a checkpoint's component is missing; warn on version drift."""
    for kind, info in provenance.items():
        if kind not in KINDS:
            continue
        name, distribution, version = info.get("name"), info.get("distribution"), info.get("version")
        if name not in registry.available(kind):
            raise ConfigError(f"checkpoint '{path}' needs {kind} '{name}' from distribution '{distribution}' "
                              f"{version}, which is not installed here: pip install {distribution}")
        entry = registry.resolve(kind, name)
        if (entry.distribution, entry.version) != (distribution, version):
            warnings.warn(f"checkpoint '{path}' was written with {kind} '{name}' from {distribution} {version}; "
                          f"this environment has {entry.provenance}", stacklevel=3)
