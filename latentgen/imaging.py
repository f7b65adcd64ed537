"""Conversions between image tensors in [-1, 1] and PIL images, and labelled grids."""

from __future__ import annotations

import math
import textwrap
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB images (values outside the range are clipped)."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]


def from_pil(images: Sequence[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB images -> (B, 3, H, W) in [-1, 1]; resized to size = (width, height) when given."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if size is not None and image.size != tuple(size):
            image = image.resize(tuple(size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def grid(images: Sequence[Image.Image], columns: int | None = None, labels: Sequence[str] | None = None,
         padding: int = 2, min_tile: int = 96) -> Image.Image:
    """Images tiled row by row, each enlarged (nearest neighbour) to at least `min_tile` pixels
    wide so small samples stay visible, with an optional caption wrapped under each."""
    if not images:
        raise ValueError("grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    scale = max(1, math.ceil(min_tile / images[0].size[0]))
    width, height = images[0].size[0] * scale, images[0].size[1] * scale
    wrapped = [textwrap.wrap(str(label), width=max(4, width // 6))[:3] for label in labels] if labels else []
    label_height = 11 * max((len(lines) for lines in wrapped), default=0)
    sheet = Image.new("RGB", (columns * (width + padding) + padding,
                              rows * (height + label_height + padding) + padding), "white")
    draw = ImageDraw.Draw(sheet)
    for index, image in enumerate(images):
        x = padding + (index % columns) * (width + padding)
        y = padding + (index // columns) * (height + label_height + padding)
        sheet.paste(image.convert("RGB").resize((width, height), Image.Resampling.NEAREST), (x, y))
        for line_number, line in enumerate(wrapped[index] if wrapped else []):
            draw.text((x + 1, y + height + 11 * line_number), line, fill="black")
    return sheet
