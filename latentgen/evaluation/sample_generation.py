"""Generating an evaluation set from a pipeline: fixed seeds, fixed batches, tensors out."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from latentgen.pipeline import LatentDiffusionPipeline


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """The generator of one batch: a function of (seed, batch index) only, so a run is reproducible
    for a given seed and batch size, and different seeds share no batch."""
    state = np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state) & (2**63 - 1))


def generate(pipe: LatentDiffusionPipeline, *, prompts: Sequence[str] | None = None,
             labels: Sequence[int] | None = None, count: int | None = None, seed: int = 0, batch_size: int = 36,
             progress: bool = False, **options: Any) -> torch.Tensor:
    """One image per prompt / label (or `count` unconditional ones), (N, 3, H, W) in [-1, 1] on the CPU.

    `options` go to the pipeline call (steps, guidance_scale, height, width, ...).
    """
    total = len(prompts) if prompts is not None else len(labels) if labels is not None else int(count or 0)
    if total < 1:
        raise ValueError("generate needs at least one prompt, label or image to make")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    chunks = []
    starts = range(0, total, batch_size)
    for batch_index, start in enumerate(tqdm(starts, desc="sampling", unit="batch", disable=not progress)):
        stop = min(start + batch_size, total)
        images = pipe(list(prompts[start:stop]) if prompts is not None else None,
                      labels=list(labels[start:stop]) if labels is not None else None,
                      num_images=1 if (prompts is not None or labels is not None) else stop - start,
                      generator=batch_generator(seed, batch_index), output_type="tensor", **options)
        chunks.append(images.float().cpu())
    return torch.cat(chunks)
