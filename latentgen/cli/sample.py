"""latentgen-sample: images from a checkpoint (`latentgen-sample checkpoint=... prompt="a red circle"`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from latentgen.cli.errors import reported
from latentgen.config import register_component_options
from latentgen.config.settings import SampleAppSettings, app_settings

log = logging.getLogger("latentgen.sample")


def _as_list(value):
    if value is None:
        return None
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return value if isinstance(value, list) else [value]


def _load_map(key: str, path: str):
    """An image file as a PIL image, or a .npy array (C, H, W) / (B, C, H, W) as a tensor."""
    import numpy as np
    from PIL import Image

    file = Path(str(path))
    if not file.is_file():
        raise FileNotFoundError(f"conditioning.{key}: no file '{file}'; give the path of an image or a .npy array")
    if file.suffix.lower() == ".npy":
        import torch

        return torch.from_numpy(np.load(file, allow_pickle=False)).float()
    with Image.open(file) as image:
        image.load()
        return image if image.mode in ("L", "RGB") else image.convert("RGB")


def _conditioning(node) -> dict:
    """conditioning.<key>=path (or a list of paths) -> {key: PIL image(s) or tensor} for the pipeline."""
    loaded = {}
    for key, value in dict(node or {}).items():
        if value is None:
            continue
        loaded[key] = [_load_map(key, path) for path in _as_list(value)]  # the pipeline batches a list
    return loaded


def load(settings: SampleAppSettings, scheduler: object = None) -> object:
    """The checkpoint as a pipeline, through whichever registered format reads it; then the speed-ups asked for."""
    import torch

    from latentgen.devices import resolve_device
    from latentgen.pipeline import LatentDiffusionPipeline

    options = {"device": resolve_device(settings.device),
               "dtype": getattr(torch, settings.dtype) if settings.dtype is not None else None}
    if settings.original_config is not None:  # only formats of original files take it
        options["original_config"] = settings.original_config
    pipe = LatentDiffusionPipeline.from_checkpoint(settings.checkpoint, format=settings.format, scheduler=scheduler,
                                                   **options)
    if settings.compile:
        from latentgen.fast_path import optimize_for_inference

        optimize_for_inference(pipe, channels_last=None, compile=True)
    return pipe


@hydra.main(config_path="pkg://latentgen.conf", config_name="sample", version_base="1.3")
def _sample(cfg: DictConfig) -> None:
    from latentgen.config.containers import to_plain

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with reported():
        settings = app_settings(SampleAppSettings, to_plain(cfg))  # every setting checked before torch is imported
        from latentgen.assembly import build_component
        from latentgen.callbacks import PreviewWriter, ProgressBar, chain
        from latentgen.imaging import grid

        scheduler = build_component("scheduler", cfg.scheduler) if cfg.get("scheduler") else None
        pipe = load(settings, scheduler)
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
                      conditioning=_conditioning(settings.conditioning), callback=callback)
    captions = [str(c) for c in (prompts or labels or [""]) for _ in range(settings.num_images)][: len(images)]
    out = run_dir / "images"
    out.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(out / f"{index:04d}.png")
    grid(images, columns=settings.num_images if (prompts or labels) else None,
         labels=captions if any(captions) else None).save(run_dir / "grid.png")
    (run_dir / "sample.json").write_text(json.dumps({
        "checkpoint": str(settings.checkpoint), "scheduler": pipe.scheduler.name, "seed": settings.seed,
        "images": [str(out / f"{i:04d}.png") for i in range(len(images))], "captions": captions}, indent=2))
    log.info("%d images in %s, grid %s", len(images), out, run_dir / "grid.png")


def main() -> None:
    register_component_options()
    _sample()


if __name__ == "__main__":
    main()
