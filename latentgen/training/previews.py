"""The PNG grids a training run writes: reconstructions (stage 1) and samples (stage 2), at the end of
each stage and, smaller and with fewer sampling steps, every `train.sample_every` steps during it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, default_collate

from latentgen.contracts import Codec
from latentgen.imaging import grid, to_pil
from latentgen.pipeline import LatentDiffusionPipeline


def first_items(dataset: Dataset, count: int) -> dict[str, Any]:
    return default_collate([dataset[i] for i in range(min(count, len(dataset)))])


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode inside the block (no dropout in a preview taken mid-training), the previous mode after."""
    modes = [(module, module.training) for module in modules]
    for module, _ in modes:
        module.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)


@torch.no_grad()
def reconstruction_sheet(codec: Codec, dataset: Dataset, count: int) -> Image.Image:
    """Originals and their reconstructions side by side (deterministic encoding)."""
    images = first_items(dataset, count)["image"].to(next(codec.parameters()).device)
    with evaluating(codec):
        reconstructions = codec.decode(codec.encode(images)).clamp(-1, 1)
    tiles = [tile for pair in zip(to_pil(images), to_pil(reconstructions)) for tile in pair]
    return grid(tiles, columns=16)


def reconstruction_grid(codec: Codec, dataset: Dataset, count: int, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    reconstruction_sheet(codec, dataset, count).save(path)
    return path


def sample_sheet(pipe: LatentDiffusionPipeline, dataset: Dataset, count: int, seed: int,
                 steps: int | None = None) -> tuple[Image.Image, list[str]]:
    """One sample per conditioning input of the first `count` items, captioned; `steps` None: the
    pipeline's default. Returns the grid and its captions."""
    items = first_items(dataset, count)
    prompts = items.get("prompt") if "prompt" in pipe.conditioner.input_keys else None
    labels = items.get("label") if "label" in pipe.conditioner.input_keys else None
    options = {} if steps is None else {"steps": int(steps)}
    # Image-like inputs (e.g. a super-resolution model's low_res) come from the same items.
    conditioning = {key: items[key] for key in pipe.conditioner.input_keys
                    if key in items and key not in ("prompt", "label")}
    with evaluating(pipe.denoiser, pipe.conditioner):
        images = pipe(prompts, labels=labels, num_images=1 if (prompts or labels is not None or conditioning) else count,
                      seed=seed, conditioning=conditioning, **options)
    if prompts:
        captions = list(prompts)
    elif labels is not None:
        names = getattr(dataset, "class_names", None)
        captions = [names[int(label)] if names else str(int(label)) for label in labels]
    else:
        captions = [""] * len(images)
    return grid(images, columns=8, labels=captions if any(captions) else None), captions


def sample_grid(pipe: LatentDiffusionPipeline, dataset: Dataset, count: int, seed: int, path: Path,
                steps: int | None = None) -> tuple[Path, list[str]]:
    """`sample_sheet` saved to `path`; returns the path and the captions."""
    sheet, captions = sample_sheet(pipe, dataset, count, seed, steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path, captions
