"""The generic latent diffusion pipeline: any codec, denoiser, conditioner and scheduler together.

It assembles and checks the parts, turns a request into latents and images, and loads and saves through
the registered checkpoint formats; it imports no format, no interop and no training code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from latentgen.assembly import build_component, component_config
from latentgen.compatibility import check_compatible
from latentgen.config.containers import to_plain
from latentgen.config.settings import DiffusionSettings, SamplingDefaults
from latentgen.config.typed import as_plain, parse
from latentgen.contracts import Adapter, Codec, Conditioner, Denoiser, Scheduler
from latentgen.contracts.input_keys import INPUT_KEYS
from latentgen.diffusion.guidance import ClassifierFreeGuidance
from latentgen.diffusion.inpainting import latent_mask
from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule
from latentgen.diffusion.prediction import ProcessDenoiser
from latentgen.diffusion.sampling import img2img_sigmas, sample
from latentgen.errors import AdapterError, CheckpointError
from latentgen.formats.dispatch import call_with_options, format_for
from latentgen.imaging import to_pil
from latentgen.kinds import kind, module_parts, pipeline_parts
from latentgen.memory import check_fits, sampling_bytes
from latentgen.nn.packed_convolution import forget_packed_weights
from latentgen.pipeline_inputs import Request, conditioner_batch, image_batch, mask_batch
from latentgen.pipeline_refiner import Refinement, check_start

__all__ = ["LatentDiffusionPipeline", "build_component", "component_config"]


class LatentDiffusionPipeline:
    """Text/label/unconditional generation in a codec's latent space (Rombach et al. 2022).

    Holds one part per kind the kinds table gives a pipeline slot (`codec`, `denoiser`, `conditioner`,
    `scheduler`, `process`, ...); without a process, the discrete one its `diffusion` settings describe (what
    every checkpoint written before processes were a kind holds). Refuses an incompatible assembly at
    construction.
    """

    def __init__(self, codec: Codec, denoiser: Denoiser, conditioner: Conditioner | None = None,
                 scheduler: Scheduler | None = None, diffusion: Mapping[str, Any] | None = None,
                 sampling: Mapping[str, Any] | None = None, **parts: Any):
        parts.update(codec=codec, denoiser=denoiser, conditioner=conditioner, scheduler=scheduler)
        self.diffusion = as_plain(parse(DiffusionSettings, to_plain(diffusion), "diffusion"))
        if parts.get("process") is None:  # no process named: the discrete one the `diffusion` settings describe
            parts["process"] = build_component("process", {"name": "discrete", **self.diffusion})
        unknown = sorted(set(parts) - set(pipeline_parts()))
        if unknown:
            raise TypeError(f"a pipeline has no part {unknown}; its parts are {', '.join(pipeline_parts())}")
        for name in pipeline_parts():
            part = parts.get(name) if parts.get(name) is not None else build_component(name, None)
            base = kind(name).base_class()
            if not isinstance(part, base):
                raise TypeError(f"the pipeline's {name} must be a latentgen.{base.__name__}; got {type(part).__name__}")
            setattr(self, name, part)
        check_compatible(self.codec, self.denoiser, self.conditioner)
        self.sampling = as_plain(parse(SamplingDefaults, to_plain(sampling), "sampling"))
        self.model = ProcessDenoiser(self.denoiser, self.process)
        self._adapters: list[Adapter] = []

    def replace_process(self, **options: Any) -> None:
        """Sample with other options of the same process (e.g. `shift=4.0` for rectified flow). Another process
        or prediction target is refused: the denoiser predicts what its process trained it to."""
        from latentgen.processes.override import overridden_process

        config = overridden_process(component_config("process", self.process), options, "this pipeline's denoiser")
        self.process = build_component("process", config)
        self.model = ProcessDenoiser(self.denoiser, self.process)

    # ---- construction and checkpoints ---------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LatentDiffusionPipeline":
        """From a config with one node per part (`codec`, `denoiser`, `conditioner`, `scheduler`: each
        `{name, **params}` or Hydra's `{_target_: latentgen.registry.build, kind, name, ...}`) and
        optional `diffusion` and `sampling` settings; other keys (dataset, training) are ignored."""
        config = to_plain(config)
        # a config that names no process (any written before processes were a kind): the constructor makes the
        # discrete one of its `diffusion` settings
        parts = {name: build_component(name, config.get(name)) for name in pipeline_parts()
                 if name != "process" or config.get(name) is not None}
        return cls(**parts, diffusion=config.get("diffusion"), sampling=config.get("sampling"))

    @classmethod
    def from_checkpoint(cls, path: str | Path, format: str | None = None, *,
                        scheduler: Scheduler | str | None = None, **options: Any) -> "LatentDiffusionPipeline":
        """The pipeline stored at `path`, read by the registered checkpoint format that claims the file
        (or the one named by `format`). `scheduler` replaces the stored one (a Scheduler, or a registered
        name such as "ddim"). `options` go to that format's `load`: `device`, `dtype`, and its
        own (the original Stable Diffusion file takes `original_config`, `use_ema`, ...; both built-in
        formats take `compile=True`, which compiles the denoiser with torch.compile)."""
        if isinstance(scheduler, str):
            scheduler = build_component("scheduler", {"name": scheduler})
        elif scheduler is not None and not isinstance(scheduler, Scheduler):
            raise TypeError(f"scheduler={scheduler!r:.80}: must be a latentgen.Scheduler or a registered scheduler "
                            f"name (e.g. 'ddim')")
        if not isinstance(path, (str, Path)):
            raise TypeError(f"path={path!r:.80}: must be a file path (str or pathlib.Path)")
        reader = format_for(path, format)
        pipe = call_with_options(reader, "load", (Path(path),), options)
        if not isinstance(pipe, cls):
            raise CheckpointError(f"checkpoint format '{reader.name}' returned a {type(pipe).__name__} for '{path}', "
                                  f"not a LatentDiffusionPipeline")
        if scheduler is not None:
            pipe.scheduler = scheduler
        return pipe

    def save(self, path: str | Path, format: str = "latentgen", **options: Any) -> Path:
        """Write the pipeline with the registered checkpoint format `format` (latentgen's own by default:
        weights, config and component versions in one safetensors file), atomically. Refused while adapters
        are attached: a checkpoint holds the components alone."""
        if self._adapters:
            raise AdapterError(f"cannot save with adapters attached ({', '.join(map(repr, self._adapters))}): a "
                               f"checkpoint holds the components alone. Detach them first (pipe.detach(adapter)) "
                               f"and keep the adapter files beside the checkpoint")
        return call_with_options(format_for(path, format), "save", (self, Path(path)), options)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config that rebuilds this pipeline (what a checkpoint stores)."""
        return {**{name: component_config(name, getattr(self, name)) for name in pipeline_parts()},
                "diffusion": dict(self.diffusion), "sampling": dict(self.sampling)}

    # ---- module plumbing ----------------------------------------------------------------------

    def modules(self) -> list[torch.nn.Module]:
        return [getattr(self, name) for name in module_parts()]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LatentDiffusionPipeline":
        """Move every part; attached adapters are detached first and attached again after, so each builds
        what it adds on the new device and dtype."""
        attached = self._adapters[:]
        for adapter in reversed(attached):
            self.detach(adapter)
        for module in self.modules():
            module.to(device=device, dtype=dtype)
        for adapter in attached:
            self.attach(adapter)
        return self

    # ---- adapters (LoRA, ControlNet, embeddings: latentgen.contracts.adapter) -----------------------

    @property
    def adapters(self) -> list[Adapter]:
        """The attached adapters, in the order they were attached."""
        return list(self._adapters)

    def attach(self, adapter: Adapter) -> Adapter:
        """Apply `adapter` (after those already attached); refused, with nothing changed, if it cannot apply."""
        if not isinstance(adapter, Adapter):
            raise TypeError(f"attach() takes a latentgen.Adapter (e.g. registry.build('adapter', 'lora', path=...)); "
                            f"got {type(adapter).__name__}")
        if any(adapter is other for other in self._adapters):
            raise AdapterError(f"{adapter!r} is already attached to this pipeline")
        owner = getattr(adapter, "_attached_to", None)
        if owner is not None and owner is not self:
            raise AdapterError(f"{adapter!r} is attached to another pipeline: detach it there first, or build a "
                               f"second one for this pipeline")
        adapter.check(self)
        try:
            adapter.apply(self)
        except BaseException:
            adapter.remove(self)  # undo what it got to: nothing stays attached half
            raise
        adapter._attached_to = self
        self._adapters.append(adapter)
        forget_packed_weights(self.denoiser)  # an adapter may change weights where no version counter sees it
        return adapter

    def detach(self, adapter: Adapter) -> None:
        """Undo `adapter` exactly. Adapters attached after it are removed first and applied again after, so
        every weight ends as if `adapter` had never been attached."""
        index = next((i for i, other in enumerate(self._adapters) if other is adapter), None)
        if index is None:
            raise AdapterError(f"{adapter!r} is not attached to this pipeline; attached: {self._adapters or 'none'}")
        later = self._adapters[index + 1:]
        for other in reversed(later):
            other.remove(self)
        adapter.remove(self)
        adapter._attached_to = None
        del self._adapters[index]
        for other in later:
            other.apply(self)
        forget_packed_weights(self.denoiser)

    @property
    def input_keys(self) -> tuple[str, ...]:
        """The `conditioning=` inputs this pipeline reads: its conditioner's, then its adapters'."""
        keys = list(self.conditioner.input_keys)
        keys += [key for adapter in self._adapters for key in adapter.input_keys if key not in keys]
        return tuple(keys)

    def eval(self) -> "LatentDiffusionPipeline":
        for module in self.modules():
            module.eval()
        return self

    @property
    def schedule(self) -> DiscreteNoiseSchedule | None:
        """The discrete noise schedule of a discrete process (timestep-based code reads it); None for others."""
        return self.model.schedule

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def codec_device(self) -> torch.device:
        return next(self.codec.parameters(), torch.empty(0, device=self.device)).device

    # ---- sampling -----------------------------------------------------------------------------

    def inputs(self, prompts: str | Sequence[str] | None, labels: int | Sequence[int] | torch.Tensor | None,
               num_images: int, conditioning: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The conditioner's input batch for a request (`latentgen.pipeline_inputs.conditioner_batch`), with the
        attached adapters' inputs (`Adapter.input_keys`) as given, for `_guided` to hand to them."""
        conditioning = dict(conditioning or {})
        adapter_keys = {key for adapter in self._adapters for key in adapter.input_keys}
        for adapter in self._adapters:
            missing = [key for key in adapter.input_keys if key not in conditioning]
            if missing:
                raise ValueError(f"{adapter!r} is attached and reads conditioning['{missing[0]}']: pass "
                                 f"conditioning={{'{missing[0]}': ...}} (the apps: conditioning.{missing[0]}=<file>), "
                                 f"or detach it")
        theirs = {key: conditioning.pop(key) for key in list(conditioning)
                  if key in adapter_keys and key not in self.conditioner.input_keys}
        batch = conditioner_batch(self.conditioner, prompts, labels, num_images, conditioning, self.device)
        return {**batch, **theirs}

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """The latent grid of an image size, refusing one the codec or the denoiser cannot tile."""
        return latent_size(self.codec, self.denoiser, height, width)

    @torch.inference_mode()
    def sample_latents(self, prompts: str | Sequence[str] | None = None, **options: Any) -> torch.Tensor:
        """Scaled latents (B, C, h, w) for the given prompts/labels; the options are `__call__`'s."""
        request = Request.of(options, self.sampling)
        if request.refiner is not None and not isinstance(request.refiner, LatentDiffusionPipeline):
            raise TypeError(f"refiner={request.refiner!r:.80}: must be a LatentDiffusionPipeline (load a file with "
                            f"LatentDiffusionPipeline.from_checkpoint(path))")
        refinement = Refinement(self, request) if request.refiner is not None else None
        conditioning = request.conditioning if refinement is None else refinement.base_conditioning
        batch = self.inputs(prompts, request.labels, request.num_images, conditioning)
        own = [value for key, value in batch.items() if key in self.conditioner.input_keys]
        batch_size = len(own[0]) if own else request.num_images
        images = None
        if request.image is not None:
            images = image_batch(request.image, batch_size, request.height, request.width, self.codec_device)
            request.height, request.width = request.height or images.shape[2], request.width or images.shape[3]
        if request.height is None or request.width is None:
            raise ValueError("pass height= and width= (this pipeline's config has no default image size)")
        latent_size = self.latent_size(request.height, request.width)
        batch["latent_size"] = latent_size  # for conditioners that resize a map to the latent grid (input_keys.py)
        batch["image_size"] = (request.height, request.width)  # for SDXL's size conditioning
        self._check_memory(batch_size, latent_size, request)
        masks = None if request.mask is None else mask_batch(request.mask, batch_size, request.height, request.width,
                                                             self.codec_device)
        model_applies_mask = self._fill_mask_inputs(batch, images, masks)
        generator = request.generator or _generator(request.seed)
        grid = self.process.sigma_grid(request.steps, request.grid, request.spacing, float(self.sampling["rho"]),
                                       latent_size).to(self.device)
        sigmas = grid if images is None else img2img_sigmas(grid, request.strength)
        denoise = self._guided(batch, request, batch_size, sigmas)
        if refinement is None:
            check_start(self.model, grid, float(sigmas[0]), None if images is None else f"strength={request.strength}")
        else:  # the refiner takes the noise levels below the switch
            denoise, refiner_applies_mask = refinement.experts(denoise, prompts, request, batch, batch_size, grid,
                                                               sigmas, images, masks)
            model_applies_mask = model_applies_mask and refiner_applies_mask
        # Noise is drawn on the CPU generator so a seed means the same image on every device.
        noise = torch.randn((batch_size, self.codec.latent_channels, *latent_size), generator=generator).to(self.device)
        known = repaint = None
        if images is not None:
            known = self.codec.encode(images).float().to(self.device)
            if masks is not None and not model_applies_mask:
                repaint = latent_mask(masks, latent_size).to(self.device)
        return sample(denoise, self.scheduler, sigmas, noise, known=known, repaint=repaint, generator=generator,
                      callback=request.callback, frame=getattr(self.process, "sampling_frame", "ve"))

    def _check_memory(self, batch_size: int, latent_size: tuple[int, int], request: Request) -> None:
        """Refuse a batch that cannot fit before anything is allocated for it (latentgen.memory)."""
        needed = sampling_bytes(self.codec, self.denoiser, self.codec.latent_channels, batch_size, latent_size,
                                request.height, request.width, guided=request.guidance_scale != 1.0)
        check_fits(needed, self.device, f"generating {batch_size} image(s) of {request.height}x{request.width}")

    def _fill_mask_inputs(self, batch: dict[str, Any], images: torch.Tensor | None, masks: torch.Tensor | None) -> bool:
        """Put the mask inputs a conditioner reads (an inpainting model's) into `batch`; whether it reads any."""
        reads = [key for key in self.conditioner.input_keys if key in INPUT_KEYS and INPUT_KEYS[key].applies_mask]
        if not reads:
            return False
        if masks is None:
            raise ValueError(f"conditioner '{self.conditioner.name}' belongs to an inpainting model: pass image= and mask=")
        derived = {"mask": lambda: masks,
                   "masked_image_latents": lambda: self.codec.encode(images * (masks < 0.5).to(images.dtype)).float()}
        batch.update({key: derived[key]() for key in reads})
        return True

    def _guided(self, batch: Mapping[str, Any], request: Request, batch_size: int,
                sigmas: torch.Tensor) -> ClassifierFreeGuidance:
        """denoise(x, sigma) for the request: the conditional model, guided by the unconditional (or
        negative-prompt) conditioning unless the scale is 1; the attached adapters' cond entries on both sides."""
        cond = self.conditioner(batch)
        uncond = self._unconditional(batch, request, cond)
        cond, uncond = self._with_adapter_conditioning(batch, batch_size, sigmas, cond, uncond)
        return ClassifierFreeGuidance(self.model, cond, uncond, request.guidance_scale, request.guidance_rescale)

    def _with_adapter_conditioning(self, batch: Mapping[str, Any], batch_size: int, sigmas: torch.Tensor,
                                   cond: dict, uncond: dict | None) -> tuple[dict, dict | None]:
        for adapter in self._adapters:
            if not adapter.input_keys:
                continue
            ours, theirs = adapter.conditioning({key: batch[key] for key in adapter.input_keys}, batch_size=batch_size,
                                                image_size=tuple(batch["image_size"]), sigmas=sigmas, device=self.device)
            cond = {**cond, **ours}
            uncond = None if uncond is None else {**uncond, **theirs}
        return cond, uncond

    def _unconditional(self, batch: Mapping[str, Any], request: Request, cond: Mapping[str, Any]) -> dict | None:
        uncond = None
        if request.guidance_scale != 1.0 and cond:
            if request.negative_prompts is not None:
                if "prompt" not in batch:
                    raise ValueError("negative prompts need a text-conditioned model")
                negatives = [request.negative_prompts] if isinstance(request.negative_prompts, str) \
                    else list(request.negative_prompts)
                if len(negatives) == 1:
                    negatives = negatives * (len(batch["prompt"]) // request.num_images)
                uncond = self.conditioner({**batch, "prompt": [n for n in negatives for _ in range(request.num_images)]})
            else:
                uncond = self.conditioner.unconditional(batch)
        return uncond

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
        (default), "tensor" ((B, 3, H, W) in [-1, 1]) or "latent". `refiner`: a second pipeline in the same latent
        space that denoises the grid after the fraction `refiner_switch` (default 0.8), as SDXL's refiner does.
        """
        if output_type not in ("pil", "tensor", "latent"):
            raise ValueError(f"output_type must be 'pil', 'tensor' or 'latent'; got {output_type!r}")
        latents = self.sample_latents(prompts, **options)
        if output_type == "latent":
            return latents
        images = self.decode(latents)
        return images if output_type == "tensor" else to_pil(images)


def latent_size(codec: Codec, denoiser: Denoiser, height: int, width: int) -> tuple[int, int]:
    """The latent grid of an image size, refusing one the codec or the denoiser cannot tile."""
    latent_h, latent_w = codec.latent_size(int(height), int(width))
    multiple = denoiser.latent_size_multiple
    if latent_h % multiple or latent_w % multiple:
        step = multiple * codec.downsampling_factor
        raise ValueError(f"denoiser '{denoiser.name}' needs latents divisible by {multiple}, so the image size "
                         f"must be a multiple of {step}; got {height}x{width}")
    return latent_h, latent_w


def _generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or with a fresh random seed of its own (not the global RNG's)."""
    generator = torch.Generator("cpu")
    if seed is not None:
        generator.manual_seed(int(seed))
    else:
        generator.seed()
    return generator
