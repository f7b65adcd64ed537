"""latentgen-sample: images from a checkpoint (`latentgen-sample checkpoint=... prompt="a red circle"`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from latentgen.cli.errors import reported
from latentgen.config import register_component_options

log = logging.getLogger("latentgen.sample")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        return torch.from_numpy(np.load(file, allow_pickle=False)).float()
    with Image.open(file) as image:
        image.load()
        return image if image.mode in ("L", "RGB") else image.convert("RGB")


def _conditioning(node) -> dict:
    """conditioning.<key>=path (or a list of paths) -> {key: PIL image(s) or tensor} for the pipeline."""
    loaded = {}
    for key, value in (OmegaConf.to_container(node) if OmegaConf.is_config(node) else dict(node or {})).items():
        if value is None:
            continue
        loaded[key] = [_load_map(key, path) for path in _as_list(value)]  # the pipeline batches a list
    return loaded


@hydra.main(config_path="pkg://latentgen.conf", config_name="sample", version_base="1.3")
def _sample(cfg: DictConfig) -> None:
    from latentgen.callbacks import PreviewWriter, ProgressBar, chain
    from latentgen.devices import resolve_device
    from latentgen.imaging import grid
    from latentgen.pipeline import LatentDiffusionPipeline, build_component

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with reported():
        if cfg.dtype is not None and cfg.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or null; got {cfg.dtype!r}")
        device = resolve_device(cfg.device)
        scheduler = build_component("scheduler", cfg.scheduler) if cfg.get("scheduler") else None
        dtype = _DTYPES[cfg.dtype] if cfg.dtype is not None else None
        pipe = LatentDiffusionPipeline.from_checkpoint(cfg.checkpoint, device=device, scheduler=scheduler, dtype=dtype,
                                                       original_config=cfg.original_config, compile=bool(cfg.compile))
        prompts, labels = _as_list(cfg.prompt), _as_list(cfg.label)
        steps = int(cfg.steps if cfg.steps is not None else pipe.sampling["steps"])
        callback = chain([ProgressBar(steps) if cfg.progress else None,
                          PreviewWriter(pipe.codec, run_dir / "previews", int(cfg.preview_every)) if cfg.preview_every else None])
        images = pipe(prompts, labels=labels, negative_prompts=cfg.negative_prompt, num_images=int(cfg.num_images),
                      steps=steps, guidance_scale=cfg.guidance_scale, guidance_rescale=cfg.guidance_rescale,
                      grid=cfg.grid, seed=int(cfg.seed), height=cfg.height, width=cfg.width,
                      conditioning=_conditioning(cfg.get("conditioning")), callback=callback)
    captions = [str(c) for c in (prompts or labels or [""]) for _ in range(int(cfg.num_images))][: len(images)]
    out = run_dir / "images"
    out.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(out / f"{index:04d}.png")
    grid(images, columns=int(cfg.num_images) if (prompts or labels) else None,
         labels=captions if any(captions) else None).save(run_dir / "grid.png")
    (run_dir / "sample.json").write_text(json.dumps({
        "checkpoint": str(cfg.checkpoint), "scheduler": pipe.scheduler.name, "seed": int(cfg.seed),
        "images": [str(out / f"{i:04d}.png") for i in range(len(images))], "captions": captions}, indent=2))
    log.info("%d images in %s, grid %s", len(images), out, run_dir / "grid.png")


def main() -> None:
    register_component_options()
    _sample()


if __name__ == "__main__":
    main()
