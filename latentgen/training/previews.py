"""The PNG grid each training stage writes: reconstructions after stage 1, samples after stage 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from latentgen.contracts import Codec
from latentgen.imaging import grid, to_pil
from latentgen.pipeline import LatentDiffusionPipeline


def first_items(dataset: Dataset, count: int) -> dict[str, Any]:
    return default_collate([dataset[i] for i in range(min(count, len(dataset)))])


@torch.no_grad()
def reconstruction_grid(codec: Codec, dataset: Dataset, count: int, path: Path) -> Path:
    """Originals and their reconstructions side by side (deterministic encoding)."""
    images = first_items(dataset, count)["image"].to(next(codec.parameters()).device)
    reconstructions = codec.decode(codec.encode(images)).clamp(-1, 1)
    tiles = [tile for pair in zip(to_pil(images), to_pil(reconstructions)) for tile in pair]
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(tiles, columns=16).save(path)
    return path


def sample_grid(pipe: LatentDiffusionPipeline, dataset: Dataset, count: int, seed: int, path: Path) -> tuple[Path, list[str]]:
    """One sample per conditioning input of the first `count` items, captioned; returns the captions."""
    items = first_items(dataset, count)
    prompts = items.get("prompt") if "prompt" in pipe.conditioner.input_keys else None
    labels = items.get("label") if "label" in pipe.conditioner.input_keys else None
    images = pipe(prompts, labels=labels, num_images=1 if (prompts or labels is not None) else count, seed=seed)
    if prompts:
        captions = list(prompts)
    elif labels is not None:
        names = getattr(dataset, "class_names", None)
        captions = [names[int(label)] if names else str(int(label)) for label in labels]
    else:
        captions = [""] * len(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, columns=8, labels=captions if any(captions) else None).save(path)
    return path, captions
