"""latentgen-sample: images from a checkpoint (`latentgen-sample checkpoint=... prompt="a red circle"`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from latentgen.cli.adapter_options import adapter_nodes, build_adapters
from latentgen.cli.errors import reported
from latentgen.config import register_component_options
from latentgen.config.settings import SampleAppSettings, app_settings

log = logging.getLogger("latentgen.sample")


def _as_list(value):
    if value is None:
        return None
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return value if isinstance(value, list) else [value]


def _map_file(key: str, path: str) -> Path:
    file = Path(str(path))
    if not file.is_file():
        raise FileNotFoundError(f"conditioning.{key}: no file '{file}'; give the path of an image or a .npy array")
    return file


def _load_map(key: str, path: str):
    """An image file as a PIL image, or a .npy array (C, H, W) / (B, C, H, W) as a tensor."""
    import numpy as np
    from PIL import Image

    file = _map_file(key, path)
    if file.suffix.lower() == ".npy":
        import torch

        return torch.from_numpy(np.load(file, allow_pickle=False)).float()
    with Image.open(file) as image:
        image.load()
        return image if image.mode in ("L", "RGB") else image.convert("RGB")


def _load_picture(path: str, mode: str):
    """img2img's image (RGB) or inpainting's mask (L) from a file."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert(mode)


def _numbers(key: str) -> bool:
    """Whether conditioning.<key> takes numbers (SDXL's sizes and scores) rather than files."""
    from latentgen.contracts.input_keys import INPUT_KEYS

    return key in INPUT_KEYS and INPUT_KEYS[key].value == "numbers"


def _conditioning(node) -> dict:
    """conditioning.<key>=path (or a list of paths) -> {key: PIL image(s) or tensor} for the pipeline; a key
    that takes numbers keeps them (conditioning.original_size=[768,1344])."""
    loaded = {}
    for key, value in dict(node or {}).items():
        if value is None:
            continue
        if _numbers(key):
            loaded[key] = _as_list(value)
        else:
            loaded[key] = [_load_map(key, path) for path in _as_list(value)]  # the pipeline batches a list
    return loaded


def _check_conditioning(node) -> None:
    """Every conditioning file exists; every numbers key holds numbers."""
    for key, value in dict(node or {}).items():
        values = _as_list(value) or []
        if not _numbers(key):
            for path in values:
                _map_file(key, path)
            continue
        flat = [v for item in values for v in (item if isinstance(item, list) else [item])]
        if not flat or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise ValueError(f"conditioning.{key}={value!r}: must be numbers, e.g. conditioning.{key}="
                             f"{'[1024,1024]' if key != 'aesthetic_score' else '6'}")


def _load_options(settings: SampleAppSettings, refiner: bool = False) -> dict:
    """What the checkpoint format's `load` is given (for the refiner's file: its own original_config)."""
    import torch

    from latentgen.devices import resolve_device

    options = {"device": resolve_device(settings.device),
               "dtype": getattr(torch, settings.dtype) if settings.dtype is not None else None}
    original_config = settings.refiner_original_config if refiner else settings.original_config
    if original_config is not None:  # only formats of original files take it
        options["original_config"] = original_config
    if not refiner:
        taken = sorted(set(settings.format_options) & {"device", "dtype", "original_config"})
        if taken:
            from latentgen.errors import ConfigError

            raise ConfigError(f"format_options: {taken} are settings of their own: pass {taken[0]}=... instead")
        options.update(settings.format_options)
    return options


def load(settings: SampleAppSettings, scheduler: object = None, refiner: bool = False) -> object:
    """The checkpoint (or the refiner's) as a pipeline, through whichever registered format reads it; then the
    speed-ups asked for."""
    from latentgen.pipeline import LatentDiffusionPipeline

    path, format = (settings.refiner, None) if refiner else (settings.checkpoint, settings.format)
    pipe = LatentDiffusionPipeline.from_checkpoint(path, format=format, scheduler=scheduler,
                                                   **_load_options(settings, refiner))
    if settings.process and not refiner:
        pipe.replace_process(**settings.process)
    if settings.compile:
        from latentgen.fast_path import optimize_for_inference

        optimize_for_inference(pipe, channels_last=None, compile=True)
    return pipe


RESULTS = ("sample.json",)  # what a finished run leaves; an earlier run's is kept unless overwrite=true
OUTPUTS = ("sample.json", "grid.png", "images", "previews")  # all a run writes


def accept(config: dict, run_dir: Path) -> tuple[SampleAppSettings, list]:
    """Every setting checked, the scheduler built, the checkpoint's format found (from its header), the
    conditioning files found and the adapters built (their files read and checked), and the run directory
    claimed, before any weight is read or Hydra writes; the settings and the adapters."""
    settings = app_settings(SampleAppSettings, config)  # before torch is imported: a bad value costs a second
    # `process` is a component group, which app_settings leaves out: options of the checkpoint's own process
    settings.process = {key: value for key, value in (config.get("process") or {}).items()
                        if key not in ("_target_", "kind")}
    from latentgen.assembly import build_component
    from latentgen.errors import ConfigError
    from latentgen.formats.dispatch import build_format, check_options, format_for
    from latentgen.registry import available
    from latentgen.run_dir import claim, refuse_finished

    if config.get("scheduler"):
        build_component("scheduler", config["scheduler"])
    reader = format_for(settings.checkpoint, settings.format)
    if settings.format is not None and not reader.sniff(Path(settings.checkpoint)):
        claims = [name for name in available("format") if name != settings.format
                  and build_format(name).sniff(Path(settings.checkpoint))]
        hint = f"; format {claims[0]} reads it: drop format=" if claims else ""
        raise ConfigError(f"format={settings.format}: '{settings.checkpoint}' is not a file of this format (it does "
                          f"not recognise it){hint}")
    check_options(reader, "load", (Path(settings.checkpoint),), _load_options(settings))
    for key in ("image", "mask"):
        if getattr(settings, key) is not None and not Path(getattr(settings, key)).is_file():
            raise FileNotFoundError(f"{key}: no file '{getattr(settings, key)}'; give the path of an image")
    config = reader.config(Path(settings.checkpoint), **_load_options(settings))
    if config is not None and settings.process:  # another process than the checkpoint's: refused before loading
        from latentgen.config.settings import DiffusionSettings
        from latentgen.config.typed import as_plain, parse
        from latentgen.processes.override import overridden_process

        trained = config.get("process") or {"name": "discrete",
                                            **as_plain(parse(DiffusionSettings, config.get("diffusion"), "diffusion"))}
        config = {**config, "process": overridden_process(trained, settings.process, f"'{settings.checkpoint}'")}
    check_request(settings, config)
    refiner_config = None
    if settings.refiner is not None:
        if not Path(settings.refiner).exists():
            raise FileNotFoundError(f"refiner: no file '{settings.refiner}'; give the path of the refiner's checkpoint")
        refiner = format_for(settings.refiner)
        check_options(refiner, "load", (Path(settings.refiner),), _load_options(settings, refiner=True))
        refiner_config = refiner.config(Path(settings.refiner), **_load_options(settings, refiner=True))
        check_request(settings, refiner_config)
    check_noise_levels(settings, config, refiner_config)
    _check_conditioning(settings.conditioning)
    adapters = build_adapters(adapter_nodes(settings))
    claim(run_dir)
    refuse_finished(run_dir, RESULTS, settings.overwrite, "latentgen-sample run")
    return settings, adapters


def check_request(settings: SampleAppSettings, config: dict | None) -> None:
    """The image size and the memory of the request checked against the model a checkpoint's header
    describes (`CheckpointFormat.config`), before any weight is read. The codec and denoiser are built on the
    meta device, which allocates nothing; where that or the header cannot tell, the checks run after loading."""
    if config is None:
        return
    import torch

    from latentgen.assembly import build_component
    from latentgen.devices import resolve_device
    from latentgen.memory import check_fits, sampling_bytes
    from latentgen.pipeline import latent_size

    try:
        with torch.device("meta"):
            codec, denoiser = (build_component(kind, config.get(kind)) for kind in ("codec", "denoiser"))
    except Exception:  # a part that needs real memory to be built: checked once loaded
        return
    sampling = config.get("sampling") or {}
    height, width = settings.height or sampling.get("height"), settings.width or sampling.get("width")
    if not (height and width):
        return
    try:
        latents = latent_size(codec, denoiser, height, width)
    except ValueError as exc:
        raise ValueError(f"height={height}, width={width}: {exc}") from None
    items = len(_as_list(settings.prompt) or _as_list(settings.label) or [None])
    guidance = settings.guidance_scale if settings.guidance_scale is not None else sampling.get("guidance_scale")
    needed = sampling_bytes(codec, denoiser, codec.latent_channels, items * settings.num_images, latents, height, width,
                            guided=guidance != 1.0)
    check_fits(needed, resolve_device(settings.device),
               f"num_images={settings.num_images} for {items} prompt(s) or label(s) at {height}x{width}")


def check_noise_levels(settings: SampleAppSettings, config: dict | None, refiner_config: dict | None) -> None:
    """From the headers' configs: a refiner is not sampled from pure noise, shares the base's latent space and
    gets only the noise levels it was trained on (`latentgen.pipeline_refiner`). Where a header cannot tell, the
    pipeline checks the same once loaded."""
    if config is None or (settings.refiner is not None and refiner_config is None):
        return
    import torch

    from latentgen.assembly import build_component
    from latentgen.config.settings import DiffusionSettings, SamplingDefaults
    from latentgen.config.typed import as_plain, parse
    from latentgen.diffusion.prediction import ProcessDenoiser
    from latentgen.pipeline_refiner import check_same_latent_space, check_start, switch_sigma

    def model(of: dict) -> ProcessDenoiser:  # the sigma-space model without its network
        node = of.get("process") or {"name": "discrete",
                                     **as_plain(parse(DiffusionSettings, of.get("diffusion"), "diffusion"))}
        return ProcessDenoiser(None, build_component("process", node))

    sampling = as_plain(parse(SamplingDefaults, config.get("sampling"), "sampling"))
    base = model(config)
    grid = base.process.sigma_grid(settings.steps or sampling["steps"], settings.grid or sampling["grid"],
                                   sampling["spacing"], sampling["rho"])
    img2img = None
    if settings.image is not None:
        from latentgen.diffusion.sampling import img2img_sigmas

        strength = settings.strength if settings.strength is not None else 1.0 if settings.mask is not None else 0.8
        img2img, start = f"strength={strength}", float(img2img_sigmas(grid, strength)[0])
    else:
        start = float(grid[0])
    if refiner_config is None:
        check_start(base, grid, start, img2img)
        return
    try:
        with torch.device("meta"):
            codecs = [build_component("codec", of.get("codec")) for of in (config, refiner_config)]
    except Exception:  # a codec that needs real memory to be built: checked once loaded
        codecs = None
    if codecs:
        check_same_latent_space(*codecs)
    switch_sigma(grid, settings.refiner_switch, start, base, model(refiner_config), img2img)


@hydra.main(config_path="pkg://latentgen.conf", config_name="sample", version_base="1.3")
def _sample(cfg: DictConfig) -> None:
    from latentgen.config.containers import to_plain
    from latentgen.run_dir import clear

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with reported():
        settings, adapters = accept(to_plain(cfg), run_dir)  # again: a sweep's job is checked only here
        clear(run_dir, OUTPUTS)  # accepted: what an earlier run here left goes
        from latentgen.assembly import build_component
        from latentgen.threads import configure_threads

        configure_threads(settings.threads)
        from latentgen.callbacks import PreviewWriter, ProgressBar, chain
        from latentgen.imaging import grid

        scheduler = build_component("scheduler", cfg.scheduler) if cfg.get("scheduler") else None
        conditioning = _conditioning(settings.conditioning)  # a missing map fails before the weights are read
        start = {key: _load_picture(getattr(settings, key), mode) for key, mode in (("image", "RGB"), ("mask", "L"))
                 if getattr(settings, key) is not None}
        pipe = load(settings, scheduler)
        for adapter in adapters:
            pipe.attach(adapter)
        refiner = {"refiner": load(settings, refiner=True), "refiner_switch": settings.refiner_switch} \
            if settings.refiner is not None else {}
        prompts, labels = _as_list(settings.prompt), _as_list(settings.label)
        height, width = settings.height or pipe.sampling["height"], settings.width or pipe.sampling["width"]
        if height and width:  # before anything runs: a size the codec or denoiser cannot tile
            try:
                pipe.latent_size(height, width)
            except ValueError as exc:
                raise ValueError(f"height={height}, width={width}: {exc}") from None
        steps = settings.steps if settings.steps is not None else pipe.sampling["steps"]
        callback = chain([ProgressBar(steps) if settings.progress else None,
                          PreviewWriter(pipe.codec, run_dir / "previews", settings.preview_every)
                          if settings.preview_every else None])
        images = pipe(prompts, labels=labels, negative_prompts=settings.negative_prompt, num_images=settings.num_images,
                      steps=steps, guidance_scale=settings.guidance_scale, guidance_rescale=settings.guidance_rescale,
                      grid=settings.grid, seed=settings.seed, height=settings.height, width=settings.width,
                      conditioning=conditioning, callback=callback, strength=settings.strength, **start, **refiner)
        captions = [str(c) for c in (prompts or labels or [""]) for _ in range(settings.num_images)][: len(images)]
        out = run_dir / "images"  # file names are numbers: nothing of a prompt becomes a path
        out.mkdir(parents=True, exist_ok=True)
        from PIL.PngImagePlugin import PngInfo

        for index, image in enumerate(images):  # each PNG carries what made it (a "latentgen" text chunk)
            info = PngInfo()
            info.add_text("latentgen", json.dumps({
                "checkpoint": str(settings.checkpoint), "caption": captions[index] if index < len(captions) else "",
                "seed": settings.seed, "index": index, "scheduler": pipe.scheduler.name, "steps": steps,
                "adapters": [adapter.describe() for adapter in adapters]}))
            image.save(out / f"{index:04d}.png", pnginfo=info)
        grid(images, columns=settings.num_images if (prompts or labels) else None,
             labels=captions if any(captions) else None).save(run_dir / "grid.png")
        (run_dir / "sample.json").write_text(json.dumps({
            "checkpoint": str(settings.checkpoint), "scheduler": pipe.scheduler.name, "seed": settings.seed,
            **({"image": settings.image, "mask": settings.mask, "strength": settings.strength} if start else {}),
            **({"refiner": str(settings.refiner), "refiner_switch": settings.refiner_switch} if refiner else {}),
            **({"adapters": [adapter.describe() for adapter in adapters]} if adapters else {}),
            "images": [str(out / f"{i:04d}.png") for i in range(len(images))], "captions": captions}, indent=2))
    log.info("%d images in %s, grid %s", len(images), out, run_dir / "grid.png")


def main() -> None:
    import sys

    from latentgen.cli.preflight import preflight
    from latentgen.run_dir import release_all

    register_component_options()
    try:
        with reported():
            sys.argv = [sys.argv[0], *preflight("sample", sys.argv[1:], accept)]
        _sample()
    finally:
        release_all()


if __name__ == "__main__":
    main()
