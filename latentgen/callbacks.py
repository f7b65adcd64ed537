"""Per-step sampling callbacks: a progress bar, and preview images of the current denoised estimate."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from latentgen.imaging import grid, to_pil


class ProgressBar:
    """tqdm over sampling steps, showing the current sigma."""

    def __init__(self, total: int, description: str = "sampling"):
        self.bar = tqdm(total=total, desc=description, dynamic_ncols=True, leave=False)

    def __call__(self, info: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(sigma=f"{float(info['sigma']):.3g}", refresh=False)
        if self.bar.n >= self.bar.total:
            self.bar.close()


class PreviewWriter:
    """Every `every` steps, decode the denoised estimate with the codec and save a grid PNG
    (`step_<i>.png`): what the sample will look like, long before the last step."""

    def __init__(self, codec, directory: str | Path, every: int):
        if every < 1:
            raise ValueError(f"preview every must be at least 1 step; got {every}")
        self.codec, self.directory, self.every = codec, Path(directory), every
        self.written: list[Path] = []

    @torch.no_grad()
    def __call__(self, info: dict) -> None:
        if info["i"] % self.every:
            return
        latents = info["denoised"]
        images = self.codec.decode(latents.to(next(self.codec.parameters(), latents).dtype)).float()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step_{info['i']:04d}.png"
        grid(to_pil(images)).save(path)
        self.written.append(path)


def chain(callbacks: Sequence[Callable[[dict], None] | None]) -> Callable[[dict], None] | None:
    """One callback calling each given one in turn (None when there are none)."""
    active = [callback for callback in callbacks if callback is not None]
    if not active:
        return None

    def each(info: dict) -> None:
        for callback in active:
            callback(info)

    return each
