"""Control maps for a ControlNet: whatever the user gives (a file, PIL image, array or tensor) as a batch
(B, 3, H, W) in [0, 1] at the request's size, and the canny-edge preprocessor that turns a photo into one."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentgen.errors import AdapterError


def control_batch(value: Any, batch_size: int, size: tuple[int, int], preprocess: str | None = None,
                  what: str = "control") -> torch.Tensor:
    """(batch_size, 3, H, W) float in [0, 1] at `size` (H, W): one map for all images, one per prompt, or one
    per image; a map of another size is resized, with a warning."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    maps = [_one_map(item, what) for item in items]
    maps = torch.cat(maps) if len(maps) > 1 else maps[0]
    if preprocess == "canny":
        maps = canny(maps)
    elif preprocess is not None:
        raise AdapterError(f"{what}: unknown preprocess {preprocess!r}; choose 'canny' or none")
    count = maps.shape[0]
    if batch_size % count:
        raise ValueError(f"conditioning['{what}']: {count} maps for {batch_size} images; give one, one per prompt, "
                         f"or one per image")
    maps = maps.repeat_interleave(batch_size // count, dim=0)
    height, width = size
    if tuple(maps.shape[2:]) != (height, width):
        warnings.warn(f"conditioning['{what}']: the map is {maps.shape[3]}x{maps.shape[2]}, resized to the "
                      f"{width}x{height} the ControlNet reads (8x the latent grid: Stable Diffusion's image size)",
                      stacklevel=4)
        maps = F.interpolate(maps, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return maps.clamp(0, 1)


def _one_map(item: Any, what: str) -> torch.Tensor:
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"conditioning['{what}']: no image file '{path}'")
        with Image.open(path) as image:
            item = image.convert("RGB")
    if isinstance(item, Image.Image):
        item = np.asarray(item.convert("RGB"))
    if isinstance(item, np.ndarray):
        if item.dtype == np.uint8:
            item = item.astype(np.float32) / 255.0
        array = torch.from_numpy(np.ascontiguousarray(item, dtype=np.float32))
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3:
            raise ValueError(f"conditioning['{what}']: an array map must be (H, W) or (H, W, C); got {tuple(array.shape)}")
        item = array.permute(2, 0, 1)  # HWC -> CHW
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"conditioning['{what}'] must be an image (a file path, PIL image, numpy array or tensor "
                        f"(B, 3, H, W) in [0, 1]); got {type(item).__name__}")
    maps = item.float()
    maps = maps[None] if maps.ndim == 3 else maps
    if maps.ndim != 4 or maps.shape[1] not in (1, 3):
        raise ValueError(f"conditioning['{what}']: expected a map (B, 3, H, W) or (3, H, W); got {tuple(item.shape)}")
    if maps.shape[1] == 1:
        maps = maps.expand(-1, 3, -1, -1)
    low, high = float(maps.min()), float(maps.max())
    if low < 0 or high > 1:
        raise ValueError(f"conditioning['{what}']: control maps are in [0, 1] (white = 1); got values in "
                         f"[{low:.3g}, {high:.3g}]. Rescale it (e.g. (x + 1) / 2 for an image in [-1, 1])")
    return maps.cpu()


def canny(maps: torch.Tensor, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> torch.Tensor:
    """Canny edges (Canny 1986) of each map's luminance, white on black, as ControlNet's canny model was
    trained on; scikit-image's implementation (thresholds as fractions of the gradient range)."""
    try:
        from skimage.feature import canny as skimage_canny
    except ImportError:
        raise AdapterError("preprocess='canny' needs scikit-image: pip install 'latentgen[controlnet]' "
                           "(or scikit-image)") from None
    gray = (0.299 * maps[:, 0] + 0.587 * maps[:, 1] + 0.114 * maps[:, 2]).numpy()
    edges = [skimage_canny(image, sigma=sigma, low_threshold=low, high_threshold=high) for image in gray]
    return torch.from_numpy(np.stack(edges).astype(np.float32))[:, None].expand(-1, 3, -1, -1).contiguous()


def active_steps(steps: int, start: float, end: float) -> Sequence[int]:
    """The sampling steps a ControlNet acts on: step i of n when i / n >= start and (i + 1) / n <= end (the rule
    of diffusers' control_guidance_start / end)."""
    return [i for i in range(steps) if i / steps >= start and (i + 1) / steps <= end]
